"""Tests of the U-Net: shapes, zero-init output, DDPM's parameter count, conditioning, dropout, bf16, config checks."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jdiff.models import UNet, UNetConfig, timestep_embedding

TINY = UNetConfig(image_size=16, in_channels=3, channels=32, channel_mults=(1, 2), num_res_blocks=1,
                  attention_resolutions=(8,), num_heads=2, norm_groups=8, dropout=0.1)
DDPM_CIFAR10 = UNetConfig(image_size=32, in_channels=3, channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
                          attention_resolutions=(16,), num_heads=1, dropout=0.1, scale_shift=False)
BATCH = 2


def inputs(cfg: UNetConfig, seed: int = 0):
  x = jax.random.normal(jax.random.key(seed), (BATCH, cfg.image_size, cfg.image_size, cfg.in_channels))
  return x, jnp.array([3.0, 517.25])


def init(cfg: UNetConfig):
  x, t = inputs(cfg)
  return jax.jit(UNet(cfg).init)(jax.random.key(0), x, t)


@jax.jit
def perturb(params, scale: float = 0.05, seed: int = 1):
  flat, unravel = ravel_pytree(params)
  return unravel(flat + scale * jax.random.normal(jax.random.key(seed), flat.shape))


def count_params(cfg: UNetConfig) -> int:
  x, t = inputs(cfg)
  shapes = jax.eval_shape(UNet(cfg).init, jax.random.key(0), x, t)
  return sum(leaf.size for leaf in jax.tree.leaves(shapes))


@pytest.fixture(scope="module")
def conditional():
  """A tiny class-conditional model, its untrained params, and its jitted apply."""
  cfg = dataclasses.replace(TINY, num_classes=3)
  return UNet(cfg), init(cfg), jax.jit(UNet(cfg).apply, static_argnames="train")


@pytest.fixture(scope="module")
def perturbed(conditional):
  """The tiny model with every param perturbed, so its output is nonzero and depends on everything."""
  model, params, apply = conditional
  return model, perturb(params), apply


@pytest.mark.parametrize("cfg", [TINY, dataclasses.replace(TINY, num_classes=10),
                                 dataclasses.replace(TINY, out_channels=6, scale_shift=False)])
def test_output_shape(cfg):
  x, t = inputs(cfg)
  labels = jnp.array([1, 2]) if cfg.num_classes else None
  params = jax.eval_shape(UNet(cfg).init, jax.random.key(0), x, t)
  out = jax.eval_shape(UNet(cfg).apply, params, x, t, labels)
  assert out.shape == x.shape[:3] + (cfg.output_channels,)
  assert out.dtype == jnp.float32


def test_untrained_output_is_zero_until_conv_out_changes(conditional):
  model, params, apply = conditional
  x, t = inputs(model.config)
  np.testing.assert_array_equal(apply(params, x, t), 0.0)
  conv_out = perturb(params["params"]["conv_out"])
  out = apply({"params": {**params["params"], "conv_out": conv_out}}, x, t)
  assert jnp.all(jnp.abs(out) > 0)


def test_ddpm_cifar10_parameter_count():
  assert count_params(DDPM_CIFAR10) == 35_746_307  # DDPM's official TF model: 35.7M.


def test_timestep_embedding():
  t = jnp.array([0.0, 1.0, 2.0, 0.5, 999.0, 999.5])
  emb = timestep_embedding(t, 64)
  assert emb.shape == (6, 64) and emb.dtype == jnp.float32
  assert jnp.all(jnp.abs(emb) <= 1.0)
  distances = jnp.linalg.norm(emb[:, None] - emb[None, :], axis=-1)
  assert jnp.all(distances + jnp.eye(6) > 1e-3)


def test_labels_change_output_and_null_label_means_none(perturbed):
  model, params, apply = perturbed
  x, t = inputs(model.config)
  null = jnp.full((BATCH,), model.config.num_classes)
  out_a = apply(params, x, t, jnp.array([0, 1]))
  out_b = apply(params, x, t, jnp.array([2, 2]))
  assert not jnp.allclose(out_a, out_b)
  np.testing.assert_allclose(apply(params, x, t, null), apply(params, x, t, None), rtol=1e-6, atol=1e-6)


def test_dropout_only_in_training(perturbed):
  model, params, apply = perturbed
  x, t = inputs(model.config)
  labels = jnp.array([0, 1])
  train = [apply(params, x, t, labels, train=True, rngs={"dropout": jax.random.key(i)}) for i in range(2)]
  assert not jnp.allclose(train[0], train[1])
  np.testing.assert_array_equal(apply(params, x, t, labels), apply(params, x, t, labels))


def test_bfloat16_close_to_float32(perturbed):
  model, params, apply = perturbed
  bf16 = UNet(dataclasses.replace(model.config, dtype="bfloat16"))
  x, t = inputs(model.config)
  labels = jnp.array([0, 1])
  out32 = apply(params, x, t, labels)
  out16 = jax.jit(bf16.apply)(params, x, t, labels)
  assert out16.dtype == jnp.float32
  rel = jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32)
  assert rel < 0.05, rel


@pytest.mark.parametrize("field, value", [
    ("image_size", 18),  # three levels need a multiple of 4
    ("attention_resolutions", (16, 5)),
    ("norm_groups", 7),
    ("num_heads", 3),
    ("dropout", 1.0),
    ("dtype", "float64"),
    ("channels", 0),
    ("num_res_blocks", -1),
    ("channel_mults", ()),
    ("out_channels", 0),
    ("num_classes", -2),
])
def test_config_validation_names_the_field(field, value):
  with pytest.raises(ValueError, match=f"UNetConfig.{field}="):
    UNetConfig(**{"image_size": 32, "channel_mults": (1, 2, 2), field: value})


def test_config_accepts_lists_and_lists_occurring_resolutions():
  cfg = UNetConfig(channel_mults=[1, 2], attention_resolutions=[16])
  assert cfg.channel_mults == (1, 2) and cfg.attention_resolutions == (16,)
  with pytest.raises(ValueError, match=r"\(32, 16\)"):
    UNetConfig(channel_mults=[1, 2], attention_resolutions=[8])
