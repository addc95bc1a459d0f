"""Orbax checkpoints: the training state beside the config (as JSON), so a checkpoint describes itself.

The state is a pytree with `params` and `ema_params` among its fields; inference restores one of them alone
(`restore_params`), training the whole state. Training writes checkpoints; everything else only reads them.

Saving is atomic: orbax writes step N into `N.orbax-checkpoint-tmp-*` and renames it to `N` when complete, so a
crash mid-save leaves no directory that looks finished (the training manager removes such leftovers). Each
checkpoint also holds the checksums of its arrays and of its config (jdiff/checksums.py). Restoring checks the
stored shapes and dtypes against the expected state first (orbax itself would cast dtypes silently), then the
restored values against the checksums; `restore_latest` falls back from an unreadable (corrupt, truncated,
checksum-failing) checkpoint to the one before it. A save that fails (a full disk) is a CheckpointSaveError
naming the step, the path, the cause and the last good checkpoint, with the partial files removed (`Saver`).
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import time
from typing import Any, Callable, TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from jdiff import checksums
from jdiff.config import ConfigError

T = TypeVar("T")


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used; the message names its path."""


class UnreadableCheckpointError(CheckpointError):
  """A checkpoint's files are missing, truncated or corrupt."""


class CheckpointSaveError(CheckpointError):
  """A checkpoint could not be written (a full disk, say)."""


class IncompatibleCheckpointError(ConfigError):
  """A readable checkpoint of another model: other parameter names, shapes or dtypes."""


ITEMS = ("state", "config", "checksums")


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
  """A writing manager (create=True) also deletes the temporary directories of saves that never finished."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, cleanup_tmp_directories=create)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def latest_step(workdir: str) -> int | None:
  """The newest finished checkpoint's step, or None; creates nothing."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    return None
  return make_manager(workdir, create=False).latest_step()


class Saver:
  """Writes a run's checkpoints, each in the background (orbax) and with the checksums of its arrays and config.

  A save that fails is reported at the first look after it fails: `check` (called after every training step),
  the next `save`, or the end of the `with` block, which waits for the save in flight. The report is one
  CheckpointSaveError naming the step, the path, the cause and the last good checkpoint, raised once the failed
  save's partial files are removed.
  """

  def __init__(self, manager: ocp.CheckpointManager):
    self.manager = manager
    self._pending: int | None = None

  def __enter__(self) -> Saver:
    return self

  def __exit__(self, *exc) -> None:
    self.wait()

  def save(self, step: int, state, raw_config: dict) -> None:
    self.wait()
    sums = {"state": dict(zip(_leaf_names(state), checksums.of_leaves(state))), "config": config_checksum(raw_config)}
    self._pending = step
    try:
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                      config=ocp.args.JsonSave(raw_config),
                                                      checksums=ocp.args.JsonSave(sums)))
    except Exception as e:  # Orbax raises many types (OSError, tensorstore's ValueError) for one cause.
      self._failed(e)

  def check(self) -> None:
    """Raises CheckpointSaveError if the save in flight has failed; returns at once while it is running. In a
    multi-process job all processes call it after the same step, and look at the save once it has finished on
    all of them, so that they stop at the same step."""
    if self._pending is not None and _on_every_process(not self.manager.is_saving_in_progress()):
      self.wait()

  def wait(self) -> None:
    """Waits for the save in flight; raises CheckpointSaveError if it failed."""
    if self._pending is None:
      return
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      self._failed(e)
    self._pending = None

  def _failed(self, error: Exception):
    step, self._pending = self._pending, None
    directory = str(self.manager.directory)
    with contextlib.suppress(Exception):  # Let orbax's other writer threads end before removing their files.
      self.manager.wait_until_finished()
    if jax.process_index() == 0:
      _remove_partial_save(directory, step)
    self.manager.reload()
    good = [s for s in self.manager.all_steps() if s != step]
    last = (f"the last good checkpoint is {os.path.join(directory, str(max(good)))}" if good
            else "there is no earlier checkpoint")
    raise CheckpointSaveError(
        f"could not save the checkpoint of step {step} to {os.path.join(directory, str(step))}: {save_cause(error)}; "
        f"its partial files are removed and {last}. Fix the cause (free disk space, say) and rerun the same "
        "command to resume") from error


def _remove_partial_save(directory: str, step: int, attempts: int = 50) -> None:
  """Removes the temporary directory of a failed save of `step`, again while a straggling writer recreates it."""
  for _ in range(attempts):
    partials = glob.glob(os.path.join(directory, f"{step}.orbax-checkpoint-tmp*"))
    if not partials:
      return
    for partial in partials:
      shutil.rmtree(partial, ignore_errors=True)
    time.sleep(0.1)


def _on_every_process(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  return bool(np.all(multihost_utils.process_allgather(np.int32(flag))))


def save_cause(error: BaseException) -> str:
  """The operating system's reason for a failed save where one is known (orbax wraps OSErrors in tensorstore's
  ValueErrors), else the error's first line."""
  seen = error
  while seen is not None:
    if isinstance(seen, OSError) and seen.errno:
      return os.strerror(seen.errno)
    seen = seen.__cause__ or seen.__context__
  code = re.search(r"os_error_code='?(\d+)", str(error))
  if code:
    return os.strerror(int(code.group(1)))
  return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def config_checksum(raw_config: dict) -> str:
  return hashlib.sha256(json.dumps(raw_config, sort_keys=True).encode()).hexdigest()


def restore_state(manager: ocp.CheckpointManager, step: int, abstract_state):
  """Restores onto the shardings given by `abstract_state` (jax.ShapeDtypeStruct leaves with .sharding)."""
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  return restored.state


def restore_config(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config


def step_path(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(str(manager.directory), str(step))


def restore_checked(manager: ocp.CheckpointManager, step: int, abstract_state):
  """restore_state that refuses a state of other structure, shapes or dtypes (IncompatibleCheckpointError naming
  them) and reports unreadable files as UnreadableCheckpointError naming the step's path."""
  path = step_path(manager, step)
  _refuse_mismatches(path, _stored_state(path), abstract_state)
  try:
    state = restore_state(manager, step, abstract_state)
  except Exception as e:
    raise unreadable(path, e) from e
  _verify(manager, step, state)
  return state


def restore_params(manager: ocp.CheckpointManager, step: int, abstract_params, field: str = "ema_params"):
  """One field of the stored state (the EMA params by default) onto `abstract_params`' shapes and shardings,
  checked as restore_checked checks a whole state; the optimizer state is never read."""
  path = step_path(manager, step)
  _refuse_mismatches(path, {field: _stored_state(path).get(field, {})}, {field: abstract_params})
  item = {field: abstract_params}
  args = ocp.args.PyTreeRestore(item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                partial_restore=True)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(state=args)).state
  except Exception as e:
    raise unreadable(path, e) from e
  _verify(manager, step, restored)
  return restored[field]


def _stored_state(path: str):
  """The stored state's tree of array metadata (shapes and dtypes)."""
  try:
    stored = ocp.StandardCheckpointHandler().metadata(epath.Path(path) / "state")
  except Exception as e:  # Orbax raises many types (JSON, file, tensorstore errors) for damaged files.
    raise unreadable(path, e) from e
  return getattr(stored, "tree", stored)


def _refuse_mismatches(path: str, stored_tree, wanted) -> None:
  mismatches = state_mismatches(stored_tree, wanted)
  if mismatches:
    raise IncompatibleCheckpointError(
        f"checkpoint {path} holds a state of another model ({len(mismatches)} mismatching arrays); use another "
        "--workdir or the checkpoint's settings. First mismatches:\n  " + "\n  ".join(mismatches[:8]))


def restore_config_checked(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  try:
    raw = restore_config(manager, step)
  except Exception as e:
    raise unreadable(step_path(manager, step), e) from e
  stored = _stored_checksums(manager, step, warn=False)
  if stored is not None and stored.get("config") != config_checksum(raw):
    raise UnreadableCheckpointError(f"checkpoint {step_path(manager, step)} is unreadable (its config differs "
                                    "from the checksum saved with it)")
  return raw


def _stored_checksums(manager: ocp.CheckpointManager, step: int, warn: bool = True) -> dict | None:
  """The checksums saved with a checkpoint; None for one saved before jdiff wrote them (with `warn`, logged)."""
  path = step_path(manager, step)
  if not os.path.isdir(os.path.join(path, "checksums")):
    if warn:
      logging.warning("checkpoint %s has no checksums (an older jdiff saved it): its values are not verified",
                      path)
    return None
  try:
    stored = manager.restore(step, args=ocp.args.Composite(checksums=ocp.args.JsonRestore())).checksums
  except Exception as e:
    raise unreadable(path, e) from e
  if not isinstance(stored, dict) or not isinstance(stored.get("state"), dict):
    raise UnreadableCheckpointError(f"checkpoint {path} is unreadable (its checksums file is damaged)")
  return stored


def _verify(manager: ocp.CheckpointManager, step: int, restored) -> None:
  """Raises UnreadableCheckpointError naming the arrays of `restored` (a state, or part of one) whose values
  differ from the checksums saved with them."""
  stored = _stored_checksums(manager, step)
  if stored is None:
    return
  computed = dict(zip(_leaf_names(restored), checksums.of_leaves(restored)))
  bad = [name for name, value in computed.items() if stored["state"].get(name) != value]
  if bad:
    which = f"{bad[0]} and {len(bad) - 1} other arrays differ" if len(bad) > 1 else f"{bad[0]} differs"
    raise UnreadableCheckpointError(f"checkpoint {step_path(manager, step)} is unreadable (checksum mismatch: "
                                    f"{which} from what was saved)")


def unreadable(path: str, error: BaseException) -> UnreadableCheckpointError:
  while error.__cause__ is not None:  # orbax wraps tensorstore's error, which names the file and the array
    error = error.__cause__
  reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return UnreadableCheckpointError(f"checkpoint {path} is unreadable ({type(error).__name__}: {reason[:200]})")


def state_mismatches(stored_tree, abstract_state) -> list[str]:
  """One line per array whose path, shape or dtype differs between a checkpoint's metadata and the state."""
  stored, wanted = _array_specs(stored_tree), _array_specs(abstract_state)
  lines = []
  for name in sorted(set(stored) | set(wanted), key=lambda n: (not n.startswith("params/"), n)):
    if name not in wanted:
      lines.append(f"{name}: in the checkpoint {stored[name]}, not in the model")
    elif name not in stored:
      lines.append(f"{name}: in the model {wanted[name]}, not in the checkpoint")
    elif stored[name] != wanted[name]:
      lines.append(f"{name}: checkpoint has {stored[name]}, model has {wanted[name]}")
  return lines


def _array_specs(tree) -> dict[str, str]:
  leaves = jax.tree_util.tree_leaves(tree)
  return {name: f"{getattr(leaf, 'dtype', '?')}{list(getattr(leaf, 'shape', ()))}"
          for name, leaf in zip(_leaf_names(tree), leaves)}


def _leaf_names(tree) -> list[str]:
  """Each leaf's path, e.g. "params/conv_in/kernel", in tree_leaves order."""
  return ["/".join(_key_name(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def restore_latest(manager: ocp.CheckpointManager, restore: Callable[[int], T],
                   before: int | None = None) -> tuple[int | None, T | None, list[int]]:
  """(step, restore(step), unreadable steps) for the newest step (below `before`, if given) that restores.

  An unreadable step is logged with its path and skipped for the one before; (None, None, []) when there is no
  checkpoint. Raises UnreadableCheckpointError if there are checkpoints but none is readable.
  """
  steps = sorted((s for s in manager.all_steps() if before is None or s < before), reverse=True)
  bad, errors = [], []
  for step in steps:
    try:
      return step, restore(step), bad
    except UnreadableCheckpointError as e:
      logging.warning("%s; trying the checkpoint before it", e)
      bad.append(step)
      errors.append(str(e))
  if bad:
    raise UnreadableCheckpointError("no readable checkpoint: " + "; ".join(errors) + ". Move them out of the way "
                                    "to start afresh, or restore them from a copy")
  return None, None, []


def set_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Renames an unreadable step out of the manager's sight (never deletes it) so the step can be saved again."""
  path = step_path(manager, step)
  target, n = f"{path}.unreadable", 1
  while os.path.exists(target):
    target, n = f"{path}.unreadable-{n}", n + 1
  if jax.process_index() == 0:
    os.rename(path, target)
    logging.warning("moved unreadable checkpoint %s to %s", path, target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"jdiff set aside {path}")
  manager.reload()
  return target
