"""Scaling: every mesh layout (data, FSDP) and gradient accumulation match one device; remat, bf16, config errors.

The multi-process test is in test_multihost.py. Tolerances: the layouts compute the same maths, but XLA sums
the batch (and, under FSDP, each gradient's reduce-scatter) in another order, so results differ at fp32
rounding (~1e-7 relative per reduction); three Adam steps divide each gradient by its own running norm, which
keeps that relative size, and atol=1e-6 covers parameters whose gradients are ~0 (Adam's eps then dominates).
"""
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jdiff import generate, sharding
from jdiff.build import make_model
from jdiff.cli import runtime
from jdiff.config import COORDINATOR_ENV, ConfigError, ParallelConfig, parse_config
from jdiff.schedules import make_schedule
from jdiff.train import distributed, train_and_evaluate
from jdiff.train.step import abstract_train_state, create_train_state, loss_and_grads, train_step
from tests.test_train import fixed_batch, tiny_config

STEPS = 3
# The tiny U-Net cut to one level (6 blocks): what is tested is the sharding and the step, and it compiles in half
# the time. Its conv kernels (2,304+ elements) are still split under FSDP.
SMALL_MODEL = dict(channel_mults=(1,), attention_resolutions=())


def parsed(**sections):
  raw = tiny_config()
  raw.model.update(SMALL_MODEL)
  for section, values in sections.items():
    raw[section].update(values)
  return parse_config(raw)


def run_steps(config, devices, fsdp=1):
  """STEPS jitted train steps from the seed-0 state on a (data, fsdp) mesh of `devices`."""
  mesh = sharding.make_mesh(devices, fsdp=fsdp)
  state_sharding = sharding.state_sharding(abstract_train_state(config), mesh)
  repl = sharding.replicated(mesh)
  schedule = make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  state = jax.jit(functools.partial(create_train_state, config), out_shardings=state_sharding)(jax.random.key(0))
  step = jax.jit(functools.partial(train_step, config=config), donate_argnums=0,
                 in_shardings=(state_sharding, sharding.batch_sharded(mesh), repl, repl),
                 out_shardings=(state_sharding, repl))
  for _ in range(STEPS):
    state, metrics = step(state, sharding.global_batch(fixed_batch(), mesh), jax.random.key(3), schedule)
  return state, metrics, state_sharding


@pytest.fixture(scope="module")
def one_device():
  """STEPS on one device: the reference of the mesh layouts."""
  state, metrics, _ = run_steps(parsed(), jax.devices()[:1])
  return jax.device_get(state), jax.device_get(metrics)


def test_fsdp_spec_splits_the_largest_divisible_dimension():
  assert sharding.fsdp_spec((3, 3, 64, 128), 8) == P(None, None, None, "fsdp")
  assert sharding.fsdp_spec((3, 3, 128, 64), 8) == P(None, None, "fsdp")
  assert sharding.fsdp_spec((3, 3, 96, 96), 8) == P(None, None, None, "fsdp")  # ties: the last
  assert sharding.fsdp_spec((33, 99), 8) == P()  # nothing divisible
  assert sharding.fsdp_spec((512,), 8) == P()  # too small to be worth a collective
  assert sharding.fsdp_spec((2048,), 8) == P("fsdp")
  assert sharding.fsdp_spec((3, 3, 64, 128), 1) == P()


# data=8 x fsdp=1 is test_train.py::test_sharded_training_on_8_devices_matches_one_device.
@pytest.mark.parametrize("data, fsdp, accum", [(4, 2, 2), (1, 8, 1)])
@pytest.mark.multidevice
def test_mesh_layouts_match_one_device(one_device, data, fsdp, accum):
  config = parsed(training=dict(grad_accum_steps=accum))
  state, metrics, state_sharding = run_steps(config, jax.devices(), fsdp=fsdp)
  assert dict(jax.tree_util.tree_leaves(state)[1].sharding.mesh.shape) == {"data": data, "fsdp": fsdp}
  # Every leaf is laid out as declared, and most of the state really is split.
  split = 0
  for leaf, declared in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(state_sharding)):
    assert leaf.sharding.spec == declared.spec == sharding.fsdp_spec(leaf.shape, fsdp)
    shard = declared.shard_shape(leaf.shape)
    assert all(s.data.shape == shard for s in leaf.addressable_shards)
    split += leaf.size if shard != leaf.shape else 0
  total = sum(leaf.size for leaf in jax.tree_util.tree_leaves(state))
  assert split / total > 0.9
  reference, reference_metrics = one_device
  np.testing.assert_allclose(metrics["loss"], reference_metrics["loss"], rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(state)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.multidevice
def test_fsdp_divides_the_state_memory_per_device():
  abstract = abstract_train_state(parse_config(tiny_config()))
  full = sharding.per_device_bytes(abstract, sharding.state_sharding(abstract, sharding.make_mesh(fsdp=1)))
  fsdp8 = sharding.per_device_bytes(abstract, sharding.state_sharding(abstract, sharding.make_mesh(fsdp=8)))
  assert full == 4 * sum(x.size for x in jax.tree_util.tree_leaves(abstract))
  # 6.6x for this toy U-Net: its biases, norms, label embedding and 1x1 shortcuts (< 1024 elements) stay
  # replicated; for the cifar10 config's 35.7M parameters it is 7.9x (docs/scaling.md).
  assert full / 8 < fsdp8 < full / 6


@pytest.fixture(scope="module")
def start_state():
  """The seed-0 state with noise added to its params: the zero-initialised output convs would otherwise make
  every prediction 0. Params are fp32 whatever the knobs, so every test below starts from this one state."""
  state = jax.jit(functools.partial(create_train_state, parsed()))(jax.random.key(0))
  leaves, tree = jax.tree_util.tree_flatten(state.params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return state.replace(params=tree.unflatten([x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]))


def loss_and_grads_with(params, **training):
  fn = jax.jit(functools.partial(loss_and_grads, config=parsed(training=training)))
  return fn(params, fixed_batch(), STEP_RNG, make_schedule("cosine", 1000))


@pytest.fixture(scope="module")
def plain_grads(start_state):
  """(loss, grads) of the batch of 16 in one piece, fp32, no remat: the reference of the tests below."""
  return loss_and_grads_with(start_state.params)


STEP_RNG = jax.random.fold_in(jax.random.key(2), 0)  # what train_step draws from at step 0 with key(2)


def assert_grads_close(grads, reference, rtol):
  """Each tensor within rtol of its own largest entry: a summation-order tolerance."""
  for a, b in zip(jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(grads)):
    np.testing.assert_allclose(b, a, rtol=rtol, atol=rtol * float(jnp.max(jnp.abs(a))))


def test_gradient_accumulation_equals_one_larger_batch(start_state, plain_grads):
  """4 micro-batches of 4 give the loss and gradients of the batch of 16, with the same per-example draws."""
  loss, grads = loss_and_grads_with(start_state.params, grad_accum_steps=4)
  assert float(loss) == pytest.approx(float(plain_grads[0]), rel=1e-6)
  assert_grads_close(grads, plain_grads[1], rtol=1e-5)


def test_remat_gives_the_same_gradients(start_state, plain_grads):
  loss_fn = jax.jit(functools.partial(loss_and_grads, config=parsed(training=dict(remat=True))))
  args = (start_state.params, fixed_batch(), STEP_RNG, make_schedule("cosine", 1000))
  loss, grads = loss_fn(*args)
  assert float(loss) == pytest.approx(float(plain_grads[0]), rel=1e-6)
  assert_grads_close(grads, plain_grads[1], rtol=1e-6)
  # jax.checkpoint fences each recomputed block with an optimisation barrier, so XLA cannot undo the remat:
  # one per block of this U-Net (5 ResBlocks and the middle attention).
  assert loss_fn.lower(*args).as_text().count("optimization_barrier") == 6


def test_bf16_training_keeps_fp32_params_and_loss(start_state, plain_grads):
  config = parsed(model=dict(dtype="bfloat16"))
  new, metrics = jax.jit(functools.partial(train_step, config=config))(
      start_state, fixed_batch(), jax.random.key(2), make_schedule("cosine", 1000))
  assert {x.dtype for x in jax.tree_util.tree_leaves((new.params, new.ema_params, new.opt_state))} == {
      jnp.dtype(jnp.float32), jnp.dtype(jnp.int32)}  # int32: Adam's step counter
  loss_bf16, loss_fp32 = float(metrics["loss"]), float(plain_grads[0])
  assert metrics["loss"].dtype == jnp.float32 and np.isfinite(loss_bf16)
  # The same params and draws: bf16 keeps 8 significant bits (~0.4% per rounding) in the convs and matmuls.
  assert loss_bf16 == pytest.approx(loss_fp32, rel=2e-2)
  assert loss_bf16 != loss_fp32  # the switch does change the compute dtype


@pytest.mark.parametrize("section, values, message", [
    ("parallel", dict(fsdp=3), r"config.parallel.fsdp=3 does not divide the 8 devices"),
    ("training", dict(grad_accum_steps=4, batch_size=16), r"batch_size=16 is not divisible by the 8 devices of "
                                                          r"the mesh x 4 gradient-accumulation steps: use a "
                                                          r"multiple of 32"),
])
@pytest.mark.multidevice
def test_mesh_errors_name_the_field_and_write_nothing(tmp_path, section, values, message):
  raw = tiny_config()
  raw[section].update(values)
  with pytest.raises(ConfigError, match=message):
    train_and_evaluate(raw, str(tmp_path))
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("section, values, message", [
    ("training", dict(grad_accum_steps=3), r"config.training: grad_accum_steps=3 .* a divisor of batch_size=16"),
    ("training", dict(grad_accum_steps=0), r"grad_accum_steps=0 .* an integer >= 1"),
    ("parallel", dict(fsdp=0), r"config.parallel: fsdp=0 .* an integer >= 1"),
    ("parallel", dict(distributed="yes"), r"distributed='yes' .* one of auto, on, off"),
    ("parallel", dict(coordinator_address="localhost"), r"coordinator_address='localhost' .* 'host:port'"),
    ("parallel", dict(num_processes=2, process_id=2), r"process_id=2 .* \[0, num_processes=2\)"),
])
def test_parallel_config_errors_name_the_field(section, values, message):
  raw = tiny_config()
  raw[section].update(values)
  with pytest.raises(ConfigError, match=message):
    parse_config(raw)


def test_distributed_starts_only_when_asked(monkeypatch):
  monkeypatch.delenv(COORDINATOR_ENV, raising=False)
  assert not ParallelConfig().multi_process()
  assert ParallelConfig(coordinator_address="host0:1234").multi_process()
  assert not ParallelConfig(distributed="off", coordinator_address="host0:1234").multi_process()
  assert ParallelConfig(distributed="on").multi_process()  # JAX's cluster detection fills in the rest
  monkeypatch.setenv(COORDINATOR_ENV, "host0:1234")
  assert ParallelConfig().multi_process()
  monkeypatch.delenv(COORDINATOR_ENV)
  distributed.initialize(ParallelConfig())  # one process: nothing happens
  assert jax.process_count() == 1 and not jax.distributed.is_initialized()


def test_cpu_device_count_divides_the_micro_batch():
  assert runtime.cpu_device_count(cores=2, micro_batch=32) == 2
  assert runtime.cpu_device_count(cores=8, micro_batch=12) == 6
  assert runtime.cpu_device_count(cores=3, micro_batch=32) == 2
  assert runtime.cpu_device_count(cores=4, micro_batch=7) == 1
  assert runtime.cpu_device_count(cores=8, micro_batch=24, fsdp=4) == 8
  assert runtime.cpu_device_count(cores=6, micro_batch=24, fsdp=4) == 4


@pytest.mark.parametrize("platforms, plugins, expected", [
    ("cpu", ["cuda"], False), ("cuda", [], True), ("", [], False), ("", ["cuda"], True)])
def test_cpu_tuning_happens_only_where_no_accelerator_is_expected(monkeypatch, platforms, plugins, expected):
  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  monkeypatch.setattr(runtime.importlib.metadata, "entry_points", lambda group: plugins)
  monkeypatch.setattr(runtime.importlib.util, "find_spec", lambda name: None)
  assert runtime.accelerator_expected() is expected
  from jax._src import xla_bridge
  monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)  # as in a CLI before JAX starts
  monkeypatch.setenv("XLA_FLAGS", "")
  count = runtime.tune_cpu_process(cpu_devices=3, micro_batch=12, keep_host_memory=False)
  assert (count, os.environ["XLA_FLAGS"]) == ((1, "") if expected else (3, f"{runtime.HOST_DEVICE_COUNT_FLAG}=3"))


def test_library_training_leaves_the_xla_flags_alone(tmp_path, monkeypatch):
  """train_and_evaluate is a library call: the CPU split is the CLI's (runtime.tune_cpu_process), never its own."""
  before = os.environ.get("XLA_FLAGS")
  train_and_evaluate(tiny_config(num_steps=1, sample_every=0, checkpoint_every=1), str(tmp_path))
  assert os.environ.get("XLA_FLAGS") == before


SPLIT_HOST = ("from jdiff.cli import runtime; import jax, sys; "
              "n = runtime.tune_cpu_process(cpu_devices=int(sys.argv[1]), micro_batch=12, keep_host_memory=False); "
              "print(n, jax.device_count())")


@pytest.mark.slow
@pytest.mark.parametrize("cpu_devices", [0, 3])
def test_cpu_split_sets_the_device_count_before_jax_starts(cpu_devices):
  """A fresh CLI process (no XLA_FLAGS) gets the asked count, or one per core dividing the batch."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  out = subprocess.run([sys.executable, "-c", SPLIT_HOST, str(cpu_devices)], env=dict(env, JAX_PLATFORMS="cpu"),
                       capture_output=True, text=True, check=True).stdout.split()
  expected = cpu_devices or runtime.cpu_device_count(runtime.available_cores(), 12)
  assert out == [str(expected), str(expected)]


@pytest.mark.multidevice
def test_sampling_splits_the_batch_over_the_params_devices(start_state):
  """Params replicated on the 8 devices (as jdiff.load puts them): a batch of 8 runs one image per device, with
  the images of a one-device run; a batch of 6, which does not divide, stays whole."""
  config = parsed()
  model, schedule = make_model(config), make_schedule("cosine", 1000)
  mesh = sharding.make_mesh()
  replicated = jax.device_put(start_state.params, sharding.replicated(mesh))
  noise, keys = generate.seeded_noise((8, 8, 1), np.arange(8))
  spread, _ = generate.spread_batch(replicated, noise, keys)
  assert spread.sharding.spec == P("batch")
  assert len(spread.sharding.device_set) == 8
  six = noise[:6]
  assert generate.spread_batch(replicated, six)[0] is six
  assert generate.spread_batch(start_state.params, noise)[0] is noise  # params on one device
  sample = lambda params: generate.sample_unet(model, params, schedule, noise, keys, sampler="ddim", steps=3,
                                               prediction=config.diffusion.prediction)
  split, whole = sample(replicated), sample(jax.device_put(start_state.params, jax.devices()[0]))
  assert len(split.sharding.device_set) == 8
  np.testing.assert_allclose(split, whole, rtol=1e-5, atol=1e-5)
