"""Data parallelism with jax.sharding: the batch is split over a `data` mesh axis, the state replicated."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jdiff.config import ConfigError


def make_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P("data"))


def check_batch_divides(batch_size: int, mesh: Mesh) -> None:
  if batch_size % mesh.size:
    raise ConfigError(f"config.training.batch_size={batch_size} is not divisible by the {mesh.size} devices "
                     f"of the mesh: use a multiple of {mesh.size}")


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles each process's local batch into one global array sharded over the `data` axis."""
  sharding = batch_sharded(mesh)
  return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
