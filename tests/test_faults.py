"""Two processes on one work dir or output file, silent corruption, a full disk and unwritable work dirs: each is
refused, or reported, in one line. In-process tests form the fast tier; real train.py and sample.py processes (two
at once, a tmpfs that fills up, SIGTERM's grace, unusable input end to end) the slow tier."""
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jdiff
from jdiff import checkpoint, checksums, locks, pipeline
from jdiff.cli import sample as sample_cli
from jdiff.cli import train as train_cli
from jdiff.configs import tiny, vae_digits
from jdiff.train import loop, train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = socket.gethostname()
TINY_GRACE_S = 120  # docs/reliability.md: twice the tiny config's slowest SIGTERM-to-exit on a loaded machine


def cli(module, capsys, *args):
  """Runs a CLI's entry point in this process: (exit status, stdout, stderr)."""
  with pytest.raises(SystemExit) as exit_:
    module.run([f"{module.PROGRAM}", *map(str, args)])
  out, err = capsys.readouterr()
  return exit_.value.code or 0, out, err


def script(name, *args, log=None):
  """Starts train.py/sample.py from this tree, its output to `log` (a file) or discarded."""
  return subprocess.Popen([sys.executable, os.path.join(ROOT, name), *map(str, args)], cwd=ROOT, text=True,
                          stdout=log or subprocess.DEVNULL, stderr=log or subprocess.DEVNULL)


def run_script(name, *args):
  """(exit status, stdout, stderr, seconds) of train.py/sample.py run to the end."""
  start = time.monotonic()
  done = subprocess.run([sys.executable, os.path.join(ROOT, name), *map(str, args)], cwd=ROOT, text=True,
                        capture_output=True, timeout=600)
  return done.returncode, done.stdout, done.stderr, time.monotonic() - start


def snapshot(directory) -> dict:
  """Every file and directory below `directory` with its size and modification time."""
  found = {}
  for root, dirs, files in os.walk(directory):
    for name in dirs + files:
      stat = os.stat(os.path.join(root, name))
      found[os.path.relpath(os.path.join(root, name), directory)] = (stat.st_size, stat.st_mtime_ns)
  return found


# ---------------------------------------------------------------- locks

def test_a_held_lock_refuses_others_naming_its_holder_and_leaves_nothing_when_released(tmp_path):
  path = tmp_path / "new" / "dir" / "out.lock"
  with locks.acquire(str(path), "the output", "wait for it"):
    holder = json.loads(path.read_text())
    assert (holder["pid"], holder["host"]) == (os.getpid(), HOST)
    named = rf"the output is in use by \S+ \(pid {os.getpid()} on host {HOST}, since {holder['since']}\); wait for it$"
    with pytest.raises(locks.LockedError, match=named):  # flock: a second open file conflicts, in any process
      locks.acquire(str(path), "the output", "wait for it")
    with pytest.raises(locks.LockedError, match=named):
      locks.check_free(str(path), "the output", "wait for it")
  assert not (tmp_path / "new").exists()  # the lock file and the directories made for it are gone
  locks.check_free(str(path), "the output", "wait for it")


def test_a_lock_left_by_a_dead_process_does_not_block_with_or_without_flock(tmp_path, monkeypatch):
  child = subprocess.Popen(["true"])
  child.wait()  # its pid now names no process
  path = tmp_path / "jdiff.lock"
  record = {"program": "train.py", "pid": child.pid, "host": HOST, "since": "2025-01-01 00:00:00"}
  path.write_text(json.dumps(record))
  with locks.acquire(str(path), "work dir", "wait"):  # nobody holds its flock
    assert json.loads(path.read_text())["pid"] == os.getpid()

  def no_flock(fd, operation):
    raise OSError(errno.ENOLCK, "No locks available")
  monkeypatch.setattr(fcntl, "flock", no_flock)  # a file system without flock: the file's contents decide
  path.write_text(json.dumps(record))
  with locks.acquire(str(path), "work dir", "wait"):  # a dead process of this host: taken over
    pass
  for holder in (dict(record, pid=os.getppid()), dict(record, host="elsewhere")):  # alive here / cannot tell
    path.write_text(json.dumps(holder))
    with pytest.raises(locks.LockedError, match=rf"work dir is in use by train.py \(pid {holder['pid']} on host "
                                                rf"{holder['host']}, .* if that process is gone, delete {path}\)"):
      locks.acquire(str(path), "work dir", "wait")


def test_training_into_a_busy_work_dir_is_refused_before_anything_runs(tmp_path, capsys):
  """Every trainer goes through the loop's lock: the U-Net's, the VAE's; train.py asks before it loads anything."""
  workdir = tmp_path / "run"
  with locks.acquire(locks.workdir_lock(str(workdir)), "work dir", "wait"):
    holder = rf"\S+ \(pid {os.getpid()} on host {HOST}, since [-0-9: ]+\)"
    for raw in (tiny.get_config(), vae_digits.get_config()):
      with pytest.raises(locks.LockedError, match=rf"^work dir {workdir} is in use by {holder}; wait for it to "
                                                  r"finish, stop it, or train in another work dir$"):
        train_and_evaluate(raw, str(workdir))
    code, _, err = cli(train_cli, capsys, "--config", "tiny", "--workdir", workdir)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"train.py: error: --workdir={workdir} is in use by ")
    assert os.listdir(workdir) == ["jdiff.lock"]
  assert not workdir.exists()


def test_sample_py_refuses_an_output_being_written_and_replaces_it_whole_or_not_at_all(tiny_workdir, tmp_path,
                                                                                       capsys, monkeypatch):
  out = tmp_path / "grid.png"
  out.write_bytes(b"the old grid")
  args = ["--workdir", tiny_workdir, "--num", 2, "--steps", 2, "--out", out, "--overwrite"]
  with locks.acquire(f"{out}.lock", "the output", "wait"):
    code, _, err = cli(sample_cli, capsys, *args)
  assert code == 2 and err.count("\n") == 1, err
  assert err.startswith(f"sample.py: error: --out='{out}' is in use by ")
  assert err.endswith("; wait for it to finish or choose another --out\n")

  def fails_midway(samples, path, columns=None):  # a disk that fills up halfway through the file
    with open(path, "wb") as f:
      f.write(b"\x89PNG, half of it")
    raise OSError(errno.ENOSPC, "No space left on device", path)
  monkeypatch.setattr(pipeline.Samples, "save", fails_midway)
  code, _, err = cli(sample_cli, capsys, *args)
  assert code == 2 and "No space left on device" in err and err.count("\n") == 1, err
  monkeypatch.undo()
  assert out.read_bytes() == b"the old grid" and os.listdir(tmp_path) == ["grid.png"]
  code, _, err = cli(sample_cli, capsys, *args)
  assert code == 0, err
  assert out.read_bytes().startswith(b"\x89PNG") and os.listdir(tmp_path) == ["grid.png"]


# ---------------------------------------------------------------- checksums

def reference_checksum(x: np.ndarray) -> str:
  """jdiff/checksums.py's sum as it is written there, over the whole array at once in numpy's wrapping uint64."""
  bits = x.reshape(-1).view(np.uint8 if x.dtype == bool else f"u{x.dtype.itemsize}").astype(np.uint64)
  weights = np.arange(bits.size, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
  return f"{int((bits * weights).sum(dtype=np.uint64)):016x}"


def test_checksums_are_the_documented_sum_and_change_with_one_or_two_flipped_bits():
  rng = np.random.default_rng(0)
  values = rng.normal(size=(37, 5)) * 100
  arrays = [values.astype(np.float32), np.asarray(jnp.asarray(values, jnp.bfloat16)), values.astype(np.int8),
            values > 0, np.float32(2.5), np.zeros((0, 3), np.float32),
            rng.normal(size=3 * checksums.BLOCK + 5).astype(np.float32)]  # blocks, and a part of one
  assert checksums.of_leaves([jnp.asarray(x) for x in arrays]) == [reference_checksum(x) for x in arrays]

  words = arrays[0].view(np.uint32)
  original = reference_checksum(words)
  for flips in [1] * 300 + [2] * 300:
    damaged = words.copy()
    for i in rng.choice(words.size, flips, replace=False):
      damaged.flat[i] ^= np.uint32(1 << int(rng.integers(32)))
    assert reference_checksum(damaged) != original
  swapped = words.copy()
  swapped.flat[[3, 90]] = swapped.flat[[90, 3]]
  assert reference_checksum(swapped) != original


@pytest.mark.multidevice
def test_checksums_do_not_depend_on_the_sharding():
  mesh = jax.make_mesh((4, 2), ("a", "b"))
  x = np.random.default_rng(1).normal(size=(8, 12, 10)).astype(np.float32)
  specs = [P("a"), P(None, "b"), P("a", None, "b"), P(None, "a", "b"), P(("a", "b"))]
  sharded = [jax.device_put(x, NamedSharding(mesh, spec)) for spec in specs]
  assert checksums.of_leaves(sharded) == [reference_checksum(x)] * len(specs)


def test_a_changed_config_is_unreadable_and_a_checkpoint_without_checksums_loads_unverified(tiny_workdir, tmp_path,
                                                                                             caplog):
  workdir = tmp_path / "run"
  shutil.copytree(tiny_workdir, workdir)
  config_file = workdir / "checkpoints" / "20" / "config" / "metadata"
  text = config_file.read_text()
  assert '"learning_rate": 0.001' in text
  config_file.write_text(text.replace('"learning_rate": 0.001', '"learning_rate": 0.002'))  # same size
  with pytest.raises(checkpoint.UnreadableCheckpointError, match=rf"checkpoint {workdir}/checkpoints/20 is "
                                                                 r"unreadable \(its config differs from the checksum"):
    jdiff.load(str(workdir), step=20)
  assert jdiff.load(str(workdir)).step == 10

  shutil.rmtree(workdir / "checkpoints" / "10" / "checksums")  # as a jdiff before checksums saved it
  with caplog.at_level(logging.WARNING):
    assert jdiff.load(str(workdir), step=10).step == 10
  assert f"checkpoint {workdir}/checkpoints/10 has no checksums (an older jdiff saved it)" in caplog.text


# ---------------------------------------------------------------- a full disk

@contextlib.contextmanager
def file_size_limit(nbytes: int):
  """Writes that would make any file of this process larger than `nbytes` fail with EFBIG ("File too large"): a
  disk that fills up, at the file-writing layer, without root."""
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel ends the process
  resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)


def test_a_failed_save_is_noticed_without_waiting_for_it_named_and_its_files_removed(tiny_run, tmp_path):
  directory = tmp_path / "checkpoints"
  manager = checkpoint.make_manager(str(tmp_path))
  with checkpoint.Saver(manager) as saver:
    saver.save(10, tiny_run.state, tiny_run.config)
    saver.wait()
    with file_size_limit(64 * 1024), pytest.raises(checkpoint.CheckpointSaveError) as error:
      saver.save(20, tiny_run.state, tiny_run.config)  # in the background: the data files outgrow the limit
      deadline = time.monotonic() + 120
      while time.monotonic() < deadline:  # the training loop's look after each step
        saver.check()
        time.sleep(0.01)
  assert str(error.value) == (
      f"could not save the checkpoint of step 20 to {directory}/20: File too large; its partial files are removed "
      f"and the last good checkpoint is {directory}/10. Fix the cause (free disk space, say) and rerun the same "
      "command to resume")
  assert os.listdir(directory) == ["10"]
  assert checkpoint.make_manager(str(tmp_path), create=False).all_steps() == [10]


def test_a_file_training_cannot_write_stops_it_naming_the_file_and_the_last_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "samples").write_text("")  # where the sample grids go: a file, not a directory
  raw = tiny.get_config()
  raw.training.update(num_steps=2, checkpoint_every=2)
  with pytest.raises(loop.FileSystemError, match=rf"^training stopped: \[Errno 17\] File exists: '{workdir}/samples'; "
                                                 rf"the last checkpoint is {workdir}/checkpoints/2\. Fix the cause"):
    train_and_evaluate(raw, str(workdir))
  assert not (workdir / "jdiff.lock").exists()


# ---------------------------------------------------------------- work dirs that cannot be written

@contextlib.contextmanager
def read_only(path):
  """`path` read-only: a read-only bind mount where this runs as root (root writes whatever the permission bits
  say), its permission bits otherwise."""
  if os.geteuid() != 0:
    mode = os.stat(path).st_mode
    os.chmod(path, 0o555)
    try:
      yield
    finally:
      os.chmod(path, mode)
    return
  mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(path), str(path)], capture_output=True, text=True)
  if mounted.returncode:
    pytest.skip(f"cannot make a directory read-only as root here: mount says {mounted.stderr.strip()}")
  try:
    yield
  finally:
    subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("part", ["run", "run/checkpoints", "parent"])
def test_train_py_refuses_a_work_dir_it_cannot_write_before_anything_runs(tiny_workdir, tmp_path, capsys, part):
  """A read-only run (to resume), a run whose checkpoints are read-only, a new work dir in a read-only directory."""
  shutil.copytree(tiny_workdir, tmp_path / "run")
  (tmp_path / "parent").mkdir()
  workdir = tmp_path / ("parent/new" if part == "parent" else "run")
  with read_only(tmp_path / part):
    before = snapshot(tmp_path)
    code, _, err = cli(train_cli, capsys, "--config", "tiny", "--workdir", workdir)
    assert snapshot(tmp_path) == before
  assert code == 2 and err == (f"train.py: error: --workdir={str(workdir)!r}: {tmp_path / part} is not writable; "
                               "choose a directory you can write to\n")


# ---------------------------------------------------------------- real processes (slow tier)

def wait_for_lock(path, proc, timeout=300) -> dict:
  """The record of the lock at `path` once `proc` holds it."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and proc.poll() is None:
    with contextlib.suppress(FileNotFoundError, ValueError):
      holder = json.loads(open(path).read())
      if holder["pid"] == proc.pid:
        return holder
    time.sleep(0.05)
  raise AssertionError(f"{proc.args} did not take {path} (exit status {proc.poll()})")


def latest_saved(workdir) -> int:
  names = os.listdir(workdir / "checkpoints") if (workdir / "checkpoints").is_dir() else []
  return max([int(name) for name in names if name.isdigit()], default=0)


@pytest.mark.slow
def test_a_second_train_py_on_a_busy_work_dir_is_refused_at_once_and_a_dead_ones_lock_does_not_block(tmp_path):
  workdir = tmp_path / "run"
  with open(tmp_path / "first.log", "w") as log:
    first = script("train.py", "--config", "configs/tiny.py", "--workdir", workdir,
                   "--config.training.num_steps=100000", "--config.training.checkpoint_every=10", log=log)
  try:
    holder = wait_for_lock(workdir / "jdiff.lock", first)
    line = (f"train.py: error: --workdir={workdir} is in use by train.py (pid {first.pid} on host {HOST}, since "
            f"{holder['since']}); wait for it to finish, stop it, or choose another --workdir\n")
    for config in ("configs/tiny.py", "configs/vae_digits.py"):  # the same run again; another trainer
      before = snapshot(workdir)
      code, _, err, seconds = run_script("train.py", "--config", config, "--workdir", workdir)
      assert (code, err) == (2, line)
      # New files may only be the first run's: its checkpoints, sample grids and (named by its pid) its logs.
      assert seconds < 30 and not [name for name in snapshot(workdir) if name not in before
                                   and not name.startswith(("checkpoints", "samples")) and f".{first.pid}." not in name]
    while latest_saved(workdir) < 10:
      assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
      time.sleep(0.1)
  finally:
    first.kill()
    first.wait()
  assert json.loads((workdir / "jdiff.lock").read_text())["pid"] == first.pid  # left behind by the killed one
  resume_at = latest_saved(workdir)
  code, _, err, _ = run_script("train.py", "--config", "configs/tiny.py", "--workdir", workdir,
                               f"--config.training.num_steps={resume_at + 5}")
  assert code == 0 and f"resuming from checkpoint at step {resume_at}" in err, err[-3000:]
  assert not (workdir / "jdiff.lock").exists()


@pytest.mark.slow
def test_a_second_sample_py_into_a_file_being_written_is_refused_at_once(tiny_workdir, tmp_path):
  """...and the lock the first one leaves when it is killed blocks nobody."""
  out = tmp_path / "grid.png"
  with open(tmp_path / "first.log", "w") as log:  # far more images than it makes before it is killed
    first = script("sample.py", "--workdir", tiny_workdir, "--num", 100000, "--steps", 100, "--out", out, log=log)
  try:
    holder = wait_for_lock(f"{out}.lock", first)
    code, _, err, seconds = run_script("sample.py", "--workdir", tiny_workdir, "--num", 2, "--steps", 2, "--out",
                                       out, "--overwrite")
    assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
  finally:
    first.kill()
    first.wait()
  assert code == 2 and seconds < 30
  assert err == (f"sample.py: error: --out='{out}' is in use by sample.py (pid {first.pid} on host {HOST}, since "
                 f"{holder['since']}); wait for it to finish or choose another --out\n")
  assert sorted(os.listdir(tmp_path)) == ["first.log", "grid.png.lock"]  # the killed one's lock, no output
  code, _, err, _ = run_script("sample.py", "--workdir", tiny_workdir, "--num", 2, "--steps", 2, "--out", out)
  assert code == 0, err[-3000:]
  assert out.read_bytes().startswith(b"\x89PNG") and sorted(os.listdir(tmp_path)) == ["first.log", "grid.png"]


@pytest.fixture
def small_disk(tmp_path):
  """A 6 MB tmpfs (one tiny checkpoint fits, two do not), mounted for the test."""
  disk = tmp_path / "disk"
  disk.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)], capture_output=True,
                           text=True)
  if mounted.returncode:
    pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()}); the fast tier's file size limit stands in")
  yield disk
  subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.slow
def test_train_py_on_a_full_disk_stops_at_once_in_one_line_and_resumes_once_there_is_room(small_disk):
  workdir = small_disk / "run"
  args = ["--config", "configs/tiny.py", "--workdir", workdir, "--config.training.num_steps=300",
          "--config.training.checkpoint_every=50", "--config.training.log_every=1"]
  code, _, err, _ = run_script("train.py", *args)
  progress = [line for line in err.splitlines() if line.startswith(("step ", "U-Net with "))]
  rest = err.splitlines()[len(progress):]
  # A tiny checkpoint takes 3.3 to 4.1 MB: the first or the second save is the one that fills the 6 MB.
  failed = re.fullmatch(r"train.py: error: could not save the checkpoint of step (\d+) to (\S+): No space left on "
                        r"device; its partial files are removed and (.*)\. Fix the cause \(free disk space, say\) "
                        r"and rerun the same command to resume", rest[0]) if len(rest) == 1 else None
  assert code == 1 and failed, err[-3000:]
  step = int(failed[1])
  good = [str(s) for s in range(50, step, 50)]
  assert step in (50, 100) and failed[2] == f"{workdir}/checkpoints/{step}"
  assert failed[3] == (f"the last good checkpoint is {workdir}/checkpoints/{good[-1]}" if good
                       else "there is no earlier checkpoint")
  last_step = int(progress[-1].split()[1].split("/")[0])
  assert last_step < step + 50  # stopped before the next save, where the failure used to come out
  assert sorted(os.listdir(workdir / "checkpoints")) == good and not (workdir / "jdiff.lock").exists()

  subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
  code, _, err, _ = run_script("train.py", *args)
  assert code == 0 and (f"resuming from checkpoint at step {good[-1]}" in err if good else "resuming" not in err)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing config", "work dir is a file", "read-only run"])
def test_unusable_train_py_input_is_refused_up_front_in_a_real_process(tiny_workdir, tmp_path, case):
  shutil.copytree(tiny_workdir, tmp_path / "run")
  (tmp_path / "file").write_text("")
  config, workdir, line = {
      "missing config": ("configs/nope.py", tmp_path / "new", "--config='configs/nope.py': no such file, and no "
                         "bundled config of that name"),
      "work dir is a file": ("configs/tiny.py", tmp_path / "file", f"--workdir='{tmp_path}/file': {tmp_path}/file "
                             "is a file, not a directory; choose another --workdir"),
      "read-only run": ("configs/tiny.py", tmp_path / "run", f"--workdir='{tmp_path}/run': {tmp_path}/run is not "
                        "writable; choose a directory you can write to")}[case]
  with read_only(tmp_path / "run"):
    before = snapshot(tmp_path)
    code, _, err, _ = run_script("train.py", "--config", config, "--workdir", workdir)
    assert snapshot(tmp_path) == before
  assert code == 2 and err.startswith(f"train.py: error: {line}") and err.count("\n") == 1, err


@pytest.mark.slow
def test_sigterm_ends_train_py_within_its_documented_grace(tmp_path):
  """docs/reliability.md gives the grace period per config; the tiny config's, with room for a loaded machine."""
  with open(tmp_path / "log", "w") as log:
    proc = script("train.py", "--config", "configs/tiny.py", "--workdir", tmp_path / "run",
                  "--config.training.num_steps=100000", "--config.training.log_every=1", log=log)
  deadline = time.monotonic() + 300
  while (tmp_path / "log").read_text().count("\nstep ") < 5:
    assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()[-3000:]
    time.sleep(0.05)
  sent = time.monotonic()
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0
  assert time.monotonic() - sent < TINY_GRACE_S
  assert "stopped by SIGTERM after step" in (tmp_path / "log").read_text()

