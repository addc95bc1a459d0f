"""Checksums of arrays, so that a restored checkpoint can be compared with the state that was saved.

An array's checksum is a weighted sum of its values' bits, mod 2**64:

  checksum = sum_i w_i * (2i + 1)  mod 2**64

where w_i is element i's bit pattern read as an unsigned integer of its own width (a float32 as a uint32, a
bfloat16 as a uint16) and i its index in the whole array, in C order. The multipliers are odd and distinct, so in
an array of fewer than 2**31 elements of 32 bits or fewer any one or two flipped bits change the sum, as does any
swap of two different values; other damage leaves it unchanged with a chance of about 2**-64. A sum does not
depend on the order of its terms, so each process adds up the shards it holds (in blocks of `BLOCK` values, with
numpy: nothing to compile) and the processes' sums add up to the array's: the checksum is the same however the
array is sharded, on one device or over the hosts of a job.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import multihost_utils

BLOCK = 1 << 16
_ODD = np.arange(BLOCK, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
_MASK = (1 << 64) - 1


def of_leaves(tree) -> list[str]:
  """The checksum of each array leaf of `tree` (jax or numpy arrays), in jax.tree_util.tree_leaves order, as 16 hex
  digits. In a multi-process job every process calls it, with the same tree: it adds up their shards."""
  sums = [_local_sum(leaf) for leaf in jax.tree_util.tree_leaves(tree)]
  if jax.process_count() > 1:
    halves = np.array([[s >> 32, s & 0xFFFFFFFF] for s in sums], np.uint32).reshape(-1, 2)
    gathered = np.asarray(multihost_utils.process_allgather(halves)).astype(np.uint64)
    sums = [int(s) for s in ((gathered[..., 0] << np.uint64(32)) | gathered[..., 1]).sum(axis=0, dtype=np.uint64)]
  return [f"{s:016x}" for s in sums]


def _local_sum(leaf) -> int:
  """The sum over the elements this process holds (one copy of each: replica 0 of every shard)."""
  if isinstance(leaf, jax.Array):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    shards = [(np.asarray(s.data), s.index) for s in leaf.addressable_shards if s.replica_id == 0]
  else:
    leaf = np.asarray(leaf)
    shards = [(leaf, ())]
  return sum(_shard_sum(data, index, leaf.shape) for data, index in shards) & _MASK


def _shard_sum(data: np.ndarray, index: tuple, shape: tuple) -> int:
  """The terms of the elements in `data`, the block at `index` (slices) of an array of `shape`."""
  if not data.size:
    return 0
  starts = [s.start or 0 for s in index] + [0] * (len(shape) - len(index))
  strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
  # The shard is a run of consecutive indices for each position in the dimensions before the last one it does not
  # hold whole (p), so it adds up as that many runs.
  p = len(shape) - 1
  while p > 0 and data.shape[p] == shape[p]:
    p -= 1
  runs = _bits(data).reshape(math.prod(data.shape[:p]), -1)
  total = 0
  for run, position in zip(runs, np.ndindex(*data.shape[:p])):
    first = sum((starts[d] + i) * strides[d] for d, i in enumerate(position)) + (starts[p] * strides[p] if shape else 0)
    total += _run_sum(run, first)
  return total


def _run_sum(words: np.ndarray, first: int) -> int:
  """sum_j w_j * (2(first + j) + 1) over consecutive `words`, mod 2**64: each block is its sum with weights 2j + 1
  (numpy's uint64 arithmetic wraps mod 2**64) plus 2 * (its first index) * its plain sum."""
  total = 0
  for k in range(0, words.size, BLOCK):
    block = words[k:k + BLOCK]
    weighted = np.multiply(block, _ODD[:block.size], dtype=np.uint64)
    total += int(weighted.sum(dtype=np.uint64)) + 2 * (first + k) * int(block.sum(dtype=np.uint64))
  return total & _MASK


def _bits(x: np.ndarray) -> np.ndarray:
  """The values' bit patterns as unsigned integers of their width."""
  x = np.ascontiguousarray(x)
  return x.view(np.uint8) if x.dtype == np.bool_ else x.view(f"u{x.dtype.itemsize}")
