"""Training: the step lowers the loss, checkpoints resume exactly, sharding matches one device, config errors."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from jdiff import checkpoint, sharding
from jdiff.config import ConfigError, parse_config
from jdiff.configs import tiny
from jdiff.schedules import make_schedule
from jdiff.train import train_and_evaluate
from jdiff.train.state import ema_decay_at
from jdiff.train.step import create_train_state, diffusion_training_loss, drop_labels, train_step


def tiny_config(**training) -> ConfigDict:
  raw = tiny.get_config()
  raw.training.update(training)
  return raw


def fixed_batch(n=16, size=8):
  """Smooth blobs whose position depends on the label: easy to fit, different per example."""
  labels = np.arange(n) % 10
  yy, xx = np.mgrid[:size, :size] / (size - 1)
  centres = labels[:, None, None] / 9.0
  images = np.exp(-((xx[None] - centres) ** 2 + (yy[None] - 0.5) ** 2) * 20) * 2 - 1
  return {"image": jnp.asarray(images[..., None], jnp.float32), "label": jnp.asarray(labels, jnp.int32)}


@pytest.fixture(scope="module")
def setup():
  config = parse_config(tiny_config())
  schedule = make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  state = jax.jit(functools.partial(create_train_state, config))(jax.random.key(0))
  return config, schedule, state


@pytest.mark.slow  # trains or compiles enough to crowd the fast tier
def test_train_step_lowers_the_loss_on_a_fixed_batch(setup):
  config, schedule, state = setup
  batch = fixed_batch()
  eval_loss = jax.jit(lambda p: jnp.mean(jnp.stack([
      diffusion_training_loss(p, batch, jax.random.key(k), schedule, config=config, train=False)
      for k in range(8)])))
  step = jax.jit(functools.partial(train_step, config=config))
  before = float(eval_loss(state.params))
  for _ in range(60):
    state, metrics = step(state, batch, jax.random.key(1), schedule)
  after = float(eval_loss(state.params))
  assert int(state.step) == 60
  assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["learning_rate"]) == pytest.approx(1e-3)
  assert after < 0.6 * before, (before, after)


def test_ema_tracks_params_with_warmup(setup):
  config, schedule, state = setup
  assert float(ema_decay_at(jnp.array(0), config.training)) == pytest.approx(0.1)
  assert float(ema_decay_at(jnp.array(10_000), config.training)) == pytest.approx(0.99)
  new, _ = jax.jit(functools.partial(train_step, config=config))(state, fixed_batch(), jax.random.key(0), schedule)
  p0, p1, e1 = (jax.tree_util.tree_leaves(t)[0] for t in (state.params, new.params, new.ema_params))
  np.testing.assert_allclose(e1, 0.1 * p0 + 0.9 * p1, rtol=1e-5, atol=1e-7)


def test_label_dropout_uses_the_null_class_at_the_given_rate():
  labels = jnp.zeros((100_000,), jnp.int32)
  dropped = drop_labels(jax.random.key(0), labels, num_classes=10, rate=0.1)
  assert set(np.unique(dropped).tolist()) == {0, 10}
  assert abs(float(jnp.mean(dropped == 10)) - 0.1) < 5 * np.sqrt(0.09 / 100_000)


@pytest.mark.multidevice
def test_sharded_training_on_8_devices_matches_one_device(setup):
  config, schedule, state0 = setup
  assert jax.device_count() == 8
  batch = fixed_batch()

  def run(devices):
    mesh = sharding.make_mesh(devices)
    repl = sharding.replicated(mesh)
    step = jax.jit(functools.partial(train_step, config=config),
                   in_shardings=(repl, sharding.batch_sharded(mesh), repl, repl), out_shardings=(repl, repl))
    state = jax.device_put(state0, repl)
    for _ in range(3):
      state, _ = step(state, sharding.global_batch(batch, mesh), jax.random.key(3), schedule)
    return state

  one, eight = run(jax.devices()[:1]), run(jax.devices())
  assert len(jax.tree_util.tree_leaves(eight.params)[0].sharding.device_set) == 8
  for a, b in zip(jax.tree_util.tree_leaves(one.params), jax.tree_util.tree_leaves(eight.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # trains or compiles enough to crowd the fast tier
def test_resuming_from_a_checkpoint_gives_identical_params(tmp_path):
  straight = train_and_evaluate(tiny_config(num_steps=6, checkpoint_every=3), str(tmp_path / "a")).state
  train_and_evaluate(tiny_config(num_steps=3, checkpoint_every=3), str(tmp_path / "b"))
  resumed = train_and_evaluate(tiny_config(num_steps=6, checkpoint_every=3), str(tmp_path / "b")).state
  assert int(resumed.step) == 6
  for a, b in zip(jax.tree_util.tree_leaves(straight), jax.tree_util.tree_leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  manager = checkpoint.make_manager(str(tmp_path / "b"), create=False)
  assert manager.all_steps() == [3, 6]
  assert checkpoint.restore_config(manager, 6)["model"]["channels"] == 16


def test_resuming_with_another_model_names_the_mismatching_fields(tmp_path):
  train_and_evaluate(tiny_config(num_steps=2, checkpoint_every=2), str(tmp_path))
  other = tiny_config(num_steps=4)
  other.model.channels = 32
  with pytest.raises(ConfigError, match=r"config.model.channels: checkpoint has 16, config has 32"):
    train_and_evaluate(other, str(tmp_path))


@pytest.mark.multidevice
def test_batch_not_divisible_by_devices_is_rejected(tmp_path):
  with pytest.raises(ConfigError, match="batch_size=12 is not divisible by the 8 devices"):
    train_and_evaluate(tiny_config(batch_size=12), str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.parametrize("section, key, value, message", [
    ("training", "batchsize", 4, r"unknown config field config.training.batchsize \(did you mean "
                                 r"training.batch_size\?\)"),
    ("diffusion", "schedule", "quadratic", r"config.diffusion: schedule='quadratic' .* linear, cosine"),
    ("diffusion", "prediction", "score", r"prediction='score' .* eps, x0, v"),
    ("data", "image_size", 16, r"config.model.image_size \(8\) must equal config.data.image_size \(16\)"),
    ("model", "attention_resolutions", (3,), r"attention_resolutions=\(3,\) .* occur in this U-Net: \(8, 4\)"),
    ("sampling", "steps", 5000, r"config.sampling.steps \(5000\) exceeds"),
    ("training", "eval_every", -1, r"config.training: eval_every=-1 is not allowed: must be an integer >= 0"),
    ("training", "eval_samples", 1, r"config.training: eval_samples=1 is not allowed: must be an integer >= 2"),
])
def test_config_errors_name_the_field(section, key, value, message):
  raw = tiny_config()
  with raw.unlocked():
    raw[section][key] = value
  with pytest.raises(ConfigError, match=message):
    parse_config(raw)


def test_guidance_on_an_unconditional_model_is_a_config_error():
  raw = tiny_config()
  raw.model.num_classes = 0
  with pytest.raises(ConfigError, match="guidance_scale=2.0 needs a class-conditional model"):
    parse_config(raw)
