"""JAX's persistent compilation cache across processes: a restarted run compiles nothing it compiled before.

The program is train.py's: the tiny config's training step, jitted over a 2-device mesh with the state and batch
shardings, its buffers donated. Its lowering must be the same in every process (no Python object ids in it) for
the second process to find the first one's executable.
"""
import os
import subprocess
import sys

import pytest

COMPILE_TRAIN_STEP = """
import functools, sys
import jax
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
events = []
jax.monitoring.register_event_listener(lambda event, **kw: events.append(event))
from jdiff import sharding
from jdiff.config import parse_config
from jdiff.configs import tiny
from jdiff.schedules import make_schedule
from jdiff.train.step import abstract_train_state, train_step
config = parse_config(tiny.get_config())
mesh = sharding.make_mesh(jax.devices()[:2])
state_sharding = sharding.state_sharding(abstract_train_state(config), mesh)
repl = sharding.replicated(mesh)
step = jax.jit(functools.partial(train_step, config=config), donate_argnums=0, out_shardings=(state_sharding, repl),
               in_shardings=(state_sharding, sharding.batch_sharded(mesh), repl, repl))
state = sharding.abstract_with_sharding(abstract_train_state(config), state_sharding)
batch = {"image": jax.ShapeDtypeStruct((16, 8, 8, 1), "float32"), "label": jax.ShapeDtypeStruct((16,), "int32")}
schedule = make_schedule("cosine", 1000)
step.lower(state, batch, jax.random.key(0), schedule).compile()
count = lambda name: sum(e == "/jax/compilation_cache/" + name for e in events)
print(count("cache_hits"), count("cache_misses"))
"""


def with_devices(count: int) -> str:
  """This process's XLA flags with the CPU device count set to `count`."""
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  return " ".join(kept + [f"--xla_force_host_platform_device_count={count}"])


def compile_in_fresh_process(cache_dir) -> tuple[int, int]:
  env = dict(os.environ, XLA_FLAGS=with_devices(2))
  out = subprocess.run([sys.executable, "-c", COMPILE_TRAIN_STEP, str(cache_dir)], env=env, capture_output=True,
                       text=True, check=True).stdout.split()
  return int(out[0]), int(out[1])


@pytest.mark.slow
def test_a_second_process_compiles_nothing(tmp_path):
  cache = tmp_path / "cache"
  hits, misses = compile_in_fresh_process(cache)
  assert hits == 0 and misses >= 1
  entries = set(os.listdir(cache))
  assert len(entries) >= misses
  hits, misses = compile_in_fresh_process(cache)
  assert misses == 0 and hits >= 1
  assert set(os.listdir(cache)) == entries  # nothing new written
