"""Multi-process start-up: jax.distributed.initialize from the config or the environment, before JAX runs anything.

Every process runs the same program (train.py with the same config); each feeds its own shard of the global batch
and writes its own shards of the checkpoint. On CPU the processes' collectives go over gloo (TCP), JAX's default.
"""
from __future__ import annotations

import contextlib
import itertools
import os

import jax
import numpy as np
from absl import logging
from jax._src import distributed as jax_distributed
from jax.experimental import multihost_utils

from jdiff import locks
from jdiff.config import ConfigError, ParallelConfig

BARRIER_TIMEOUT_S = 3600
_barrier_ids = itertools.count()


def initialize(cfg: ParallelConfig) -> None:
  """Calls jax.distributed.initialize once when the config asks for it; a no-op for a single process."""
  if not cfg.multi_process() or jax.distributed.is_initialized():
    return
  try:
    jax.distributed.initialize(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                               process_id=cfg.process_id)
  except ValueError as e:  # nothing given and no cluster detected
    raise ConfigError(f"config.parallel: cannot start a multi-process job ({e}); set coordinator_address, "
                      "num_processes and process_id, or distributed='off' for one process") from None
  logging.info("Process %d of %d; %d local and %d global devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def barrier(name: str) -> None:
  """Waits until every process gets here, through the coordination service rather than a collective."""
  if jax.process_count() > 1:
    # JAX has no public handle on its coordination client; orbax and jax's own array serialisation use this one.
    jax_distributed.global_state.client.wait_at_barrier(f"jdiff_{name}_{next(_barrier_ids)}",
                                                        timeout_in_ms=BARRIER_TIMEOUT_S * 1000)


def compile_then_sync(jitted):
  """`jitted`, whose first call compiles, then waits for all processes before running the program.

  Processes compile at different speeds; one that finishes first would wait for the others inside the
  program's first collective, and gloo (JAX's CPU collectives) gives up on a peer after 30 s. A single
  process gets `jitted` back unchanged.
  """
  if jax.process_count() == 1:
    return jitted
  compiled = None

  def call(*args):
    nonlocal compiled
    if compiled is None:
      compiled = jitted.lower(*args).compile()
      barrier("compiled")
    return compiled(*args)
  return call


def any_process(reason: str | None) -> str | None:
  """`reason` if this or any other process has one (e.g. a stop signal), so all processes act on the same step."""
  if jax.process_count() == 1:
    return reason
  flags = multihost_utils.process_allgather(np.int32(reason is not None))
  return reason or ("a signal to another process" if np.any(flags) else None)


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds the work dir's lock (jdiff/locks.py) for the job: process 0 takes it, so a job on a file system its
  hosts share has one lock, not one per host. Every process raises LockedError if process 0 could not take it."""
  lock = error = None
  if jax.process_index() == 0:
    try:
      lock = locks.acquire(locks.workdir_lock(workdir), f"work dir {os.path.abspath(workdir)}",
                           "wait for it to finish, stop it, or train in another work dir")
    except Exception as e:  # The other processes must hear of any failure before it is raised.
      error = e
  failed = error is not None
  if jax.process_count() > 1:
    failed = bool(multihost_utils.broadcast_one_to_all(np.int32(failed)))
  if error is not None:
    raise error
  if failed:
    raise locks.LockedError(f"work dir {os.path.abspath(workdir)} is in use: process 0 of this job could not lock "
                            "it (its log names the holder)")
  try:
    yield
  finally:
    if lock is not None:
      lock.release()
