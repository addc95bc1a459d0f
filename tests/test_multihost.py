"""Multi-process training for real: two processes on localhost (gloo CPU collectives, 2 CPU devices each).

Each runs train_and_evaluate (tests/multihost_worker.py) on a one-level tiny U-Net with its parameters sharded over
all 4 devices (fsdp=4, so each process holds and checkpoints only half of every large tensor), stops at step 4,
and resumes from that checkpoint to step 6. One process training on the same global batches (process 0's shard
of each batch, then process 1's) must end with the same state, read back from the two processes' checkpoint.
"""
import functools
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from jdiff import checkpoint, data, locks, sharding
from jdiff.config import parse_config
from jdiff.schedules import make_schedule
from jdiff.train.step import abstract_train_state, create_train_state, train_step
from tests.multihost_worker import job_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROCESSES, STEPS = 2, 6


def with_devices(count: int) -> str:
  """This process's XLA flags with the CPU device count set to `count`."""
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  return " ".join(kept + [f"--xla_force_host_platform_device_count={count}"])


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def train_processes(workdir, succeed: bool = True) -> list[str]:
  """Runs PROCESSES worker processes of one job and returns their logs; fails with the log of one that fails
  (with succeed=False, of one that does not)."""
  port = free_port()
  env = dict(os.environ, XLA_FLAGS=with_devices(2), JDIFF_COMPILATION_CACHE=os.environ.get(
      "JDIFF_TEST_CACHE", os.path.join(ROOT, ".pytest_cache", "jax")))
  procs = [subprocess.Popen([sys.executable, "-m", "tests.multihost_worker", str(port), str(i), str(PROCESSES),
                             str(workdir)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
           for i in range(PROCESSES)]
  logs = [p.communicate(timeout=500)[0] for p in procs]
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert (p.returncode == 0) == succeed, f"process {i} exited {p.returncode}:\n{log[-3000:]}"
  return logs


def one_process_reference(config):
  """STEPS train steps on one device, each on the concatenation of the two processes' batches."""
  tc = config.training
  iterators = [data.make_train_iterator(config.data, tc.batch_size, config.seed, process_index=i,
                                        process_count=PROCESSES) for i in range(PROCESSES)]
  schedule = make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  state = jax.jit(functools.partial(create_train_state, config))(jax.random.key(config.seed))
  step = jax.jit(functools.partial(train_step, config=config))
  for _ in range(STEPS):
    batches = [next(it) for it in iterators]
    batch = {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}
    state, _ = step(state, batch, jax.random.key(config.seed), schedule)
  return state


@pytest.mark.slow
def test_two_processes_train_and_checkpoint_like_one(tmp_path):
  config = parse_config(job_config())
  reference = one_process_reference(config)  # also prepares the dataset before the two processes read it
  logs = train_processes(tmp_path)
  assert all("resuming from checkpoint at step 4" in log for log in logs)

  manager = checkpoint.make_manager(str(tmp_path), create=False)
  assert manager.all_steps() == [4, 6]
  saved = checkpoint.restore_config(manager, STEPS)["parallel"]
  assert (saved["fsdp"], saved["num_processes"]) == (4, PROCESSES)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  # Restored onto one device, and checked against the checksums the two processes' shards added up to.
  restored = checkpoint.restore_checked(manager, STEPS, sharding.abstract_with_sharding(
      abstract_train_state(config), jax.tree_util.tree_map(lambda _: device, abstract_train_state(config))))
  assert int(restored.step) == STEPS
  # Same maths in another summation order (see test_scale.py for the tolerance).
  for a, b in zip(jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(restored)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
  assert os.path.exists(tmp_path / "samples" / f"step_{STEPS:07d}.png")


@pytest.mark.slow
def test_a_busy_work_dir_stops_every_process_of_a_job(tmp_path):
  """Process 0 takes the work dir's one lock for the job; when it cannot, every process stops and says why."""
  with locks.acquire(locks.workdir_lock(str(tmp_path)), "work dir", "wait"):
    logs = train_processes(tmp_path, succeed=False)
  assert f"LockedError: work dir {tmp_path} is in use by " in logs[0] and f"(pid {os.getpid()} on host" in logs[0]
  assert f"LockedError: work dir {tmp_path} is in use: process 0 of this job could not lock it" in logs[1]
  assert os.listdir(tmp_path) == []
