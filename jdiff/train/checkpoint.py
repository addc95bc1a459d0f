"""Orbax checkpoints: the TrainState beside the config (as JSON), so a checkpoint describes itself."""
from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from jdiff.train.state import TrainState

ITEMS = ("state", "config")


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, keep: int = 3, create: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def latest_step(workdir: str) -> int | None:
  """The newest finished checkpoint's step, or None; creates nothing."""
  if not os.path.isdir(checkpoint_dir(workdir)):
    return None
  return make_manager(workdir, create=False).latest_step()


def save(manager: ocp.CheckpointManager, step: int, state: TrainState, raw_config: dict) -> None:
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             config=ocp.args.JsonSave(raw_config)))


def restore_state(manager: ocp.CheckpointManager, step: int, abstract_state: TrainState) -> TrainState:
  """Restores onto the shardings given by `abstract_state` (jax.ShapeDtypeStruct leaves with .sharding)."""
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  return restored.state


def restore_config(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
