"""Sharding with jax.sharding over a 2-axis mesh ('data', 'fsdp'): one code path for 1 CPU, 8 GPUs or a TPU slice.

The batch is split over both axes. Each state leaf (params, EMA params, optimizer moments) is either replicated
(fsdp=1: plain data parallelism) or split over 'fsdp' along its largest dimension divisible by the axis size
(FSDP / ZeRO-3 style: XLA gathers the weights for the forward and backward pass and reduce-scatters the gradients).
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jdiff.config import ConfigError

AXES = ("data", "fsdp")
BATCH_AXES = AXES  # the batch dimension is split over every device of the mesh
# Leaves smaller than this stay replicated under FSDP: sharding a bias saves nothing and costs a collective.
FSDP_MIN_SIZE = 1024


def make_mesh(devices=None, fsdp: int = 1) -> Mesh:
  """A (data, fsdp) mesh over `devices` (default: all, of every process); data = len(devices) // fsdp."""
  devices = jax.devices() if devices is None else list(devices)
  if len(devices) % fsdp:
    raise ConfigError(f"config.parallel.fsdp={fsdp} does not divide the {len(devices)} devices: use a divisor of "
                      f"{len(devices)}")
  shape = (len(devices) // fsdp, fsdp)
  try:
    grid = mesh_utils.create_device_mesh(shape, devices)  # follows the physical topology on TPUs
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """Splits the largest dimension divisible by `fsdp` (the last of equals) over 'fsdp'; else replicated."""
  if fsdp == 1 or math.prod(shape) < FSDP_MIN_SIZE:
    return P()
  candidates = [(size, dim) for dim, size in enumerate(shape) if size % fsdp == 0]
  if not candidates:
    return P()
  _, dim = max(candidates)
  return P(*([None] * dim), "fsdp")


def state_sharding(abstract_state, mesh: Mesh):
  """NamedShardings for every leaf of a state (e.g. jax.eval_shape of it): the tree for jit in/out_shardings."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp)), abstract_state)


def abstract_with_sharding(abstract_state, shardings):
  """jax.ShapeDtypeStruct leaves carrying their sharding: what orbax restores onto."""
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                abstract_state, shardings)


def per_device_bytes(abstract_state, shardings) -> int:
  """Bytes of the state held by one device under `shardings` (the largest shard of each leaf)."""
  return sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x, s in zip(jax.tree_util.tree_leaves(abstract_state), jax.tree_util.tree_leaves(shardings)))


def check_batch_divides(batch_size: int, mesh: Mesh, grad_accum_steps: int = 1) -> None:
  """Every micro-batch (batch_size / grad_accum_steps) must split evenly over the mesh's devices."""
  if batch_size % (mesh.size * grad_accum_steps):
    accum = f" x {grad_accum_steps} gradient-accumulation steps" if grad_accum_steps > 1 else ""
    raise ConfigError(f"config.training.batch_size={batch_size} is not divisible by the {mesh.size} devices "
                      f"of the mesh{accum}: use a multiple of {mesh.size * grad_accum_steps}")


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles each process's local batch into one global array sharded over the batch axes."""
  sharding = batch_sharded(mesh)
  return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def over_devices(devices, spec: P = P()) -> NamedSharding:
  """A one-axis ('batch') sharding over `devices`: P() replicates, P('batch') splits the batch over them."""
  return NamedSharding(Mesh(np.array(devices), ("batch",)), spec)


def local_replica(tree, mesh: Mesh):
  """The tree gathered whole onto every device of this process: sampling then runs process-locally and splits its
  batch over those devices (generate.spread_batch)."""
  gathered = jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)
  devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  local = over_devices(devices)

  def on_local_devices(x: jax.Array) -> jax.Array:
    shard = {s.device: s.data for s in x.addressable_shards}
    return jax.make_array_from_single_device_arrays(x.shape, local, [shard[d] for d in devices])

  return jax.tree_util.tree_map(on_local_devices, gathered)
