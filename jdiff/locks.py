"""Locks that keep two jdiff processes from writing one place at once: a training work dir, a sample.py output.

A lock is a file (WORKDIR/jdiff.lock, OUT.lock) that names its holder (program, pid, host, start time) and is held
with flock(2) for as long as the holder runs; releasing it removes the file. The kernel drops an flock when its
holder dies, SIGKILL included, so a lock file left behind by a dead process never blocks the next run. On a file
system without flock (the call fails with ENOLCK, EOPNOTSUPP or ENOSYS) the file's contents decide, best effort:
a lock naming a process of this host that no longer exists is taken over; one naming a live process, or a
process of another host, is refused, and the message says which file to delete once that process is gone.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time

WORKDIR_LOCK = "jdiff.lock"
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class LockedError(RuntimeError):
  """Another process holds the lock; the message names it (program, pid, host, since when)."""


class Lock:
  """A held lock (see acquire); `release` or the end of a `with` block removes its file."""

  def __init__(self, path: str, fd: int, created: list[str]):
    self.path, self._fd, self._created = path, fd, created

  def release(self) -> None:
    if self._fd is None:
      return
    os.unlink(self.path)  # Before unlocking: a process that opened this file meanwhile finds it gone and retries.
    os.close(self._fd)
    self._fd = None
    _remove_empty(self._created)

  def __enter__(self) -> Lock:
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def workdir_lock(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), WORKDIR_LOCK)


def acquire(path: str, what: str, hint: str) -> Lock:
  """Takes the lock at `path`, creating missing directories above it (removed again, if empty, on release), or
  raises LockedError "`what` is in use by <holder>; `hint`"."""
  created = _make_dirs(os.path.dirname(os.path.abspath(path)))
  try:
    fd = _open_locked(path, what, hint)
  except BaseException:
    _remove_empty(created)
    raise
  holder = json.dumps({"program": os.path.basename(sys.argv[0]) or "python", "pid": os.getpid(),
                       "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")})
  os.ftruncate(fd, 0)
  os.pwrite(fd, holder.encode() + b"\n", 0)
  return Lock(path, fd, created)


def check_free(path: str, what: str, hint: str) -> None:
  """Raises LockedError if a live process holds the lock at `path`; creates and changes nothing, so a command can
  ask before it loads anything."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except (FileNotFoundError, NotADirectoryError):
    return
  try:
    _lock_or_refuse(fd, path, what, hint, fcntl.LOCK_SH)
  finally:
    os.close(fd)  # also drops the shared lock taken to look


def _open_locked(path: str, what: str, hint: str) -> int:
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      _lock_or_refuse(fd, path, what, hint, fcntl.LOCK_EX)
      if _is_at(fd, path):
        return fd
    except BaseException:
      os.close(fd)
      raise
    os.close(fd)  # Its holder removed this file between our open and flock: take the one at `path` now.


def _lock_or_refuse(fd: int, path: str, what: str, hint: str, kind: int) -> None:
  try:
    fcntl.flock(fd, kind | fcntl.LOCK_NB)
  except BlockingIOError:
    raise LockedError(f"{what} is in use by {_describe(_holder(fd))}; {hint}") from None
  except OSError as e:
    if e.errno not in NO_FLOCK:
      raise
    holder = _holder(fd)
    if holder is not None and _may_be_alive(holder):
      raise LockedError(f"{what} is in use by {_describe(holder)}; {hint} (this file system has no flock: if "
                        f"that process is gone, delete {path})") from None


def _is_at(fd: int, path: str) -> bool:
  try:
    here = os.stat(path)
  except FileNotFoundError:
    return False
  mine = os.fstat(fd)
  return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)


def _holder(fd: int) -> dict | None:
  try:
    holder = json.loads(os.pread(fd, 4096, 0))
  except ValueError:  # empty (its holder is starting) or not ours
    return None
  return holder if isinstance(holder, dict) else None


def _describe(holder: dict | None) -> str:
  if holder is None:
    return "another process"
  return (f"{holder.get('program', '?')} (pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
          f"since {holder.get('since', '?')})")


def _may_be_alive(holder: dict) -> bool:
  """False only for a process of this host that no longer exists; another host's processes cannot be asked."""
  if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
    return True
  try:
    os.kill(holder["pid"], 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


def _make_dirs(path: str) -> list[str]:
  """Creates `path` and its missing parents; returns the ones it created, deepest first."""
  missing = []
  while not os.path.exists(path):
    missing.append(path)
    path = os.path.dirname(path)
  for directory in reversed(missing):
    os.makedirs(directory, exist_ok=True)
  return missing


def _remove_empty(directories: list[str]) -> None:
  for directory in directories:
    try:
      os.rmdir(directory)
    except OSError:  # not empty (something was written), or already gone
      return
