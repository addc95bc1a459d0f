"""The networks a typed config describes, their parameters' shapes, and fresh parameters. Inference and training
both build models here; nothing in this module trains."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jdiff.config import Config
from jdiff.models.text import TextToImageUNet
from jdiff.models.unet import UNet
from jdiff.models.vae import AutoencoderKL, VAEConfig, init_vae_params


def make_model(config: Config) -> UNet | TextToImageUNet:
  """The U-Net; with config.model.context_dim > 0, the U-Net and its text encoder (token ids for labels)."""
  remat = config.training.remat
  if config.model.context_dim:
    return TextToImageUNet(config.model, config.text.encoder_config(config.model.dtype), config.text.trainable,
                           remat=remat)
  return UNet(config.model, remat=remat)


def init_params(model: UNet | TextToImageUNet, rng: jax.Array):
  """Fresh parameters of a U-Net (under jax.jit or eval_shape, to compile once or allocate nothing)."""
  mc = model.config
  x = jnp.zeros((1, mc.image_size, mc.image_size, mc.in_channels), jnp.float32)
  labels = jnp.zeros((1,), jnp.int32) if mc.num_classes else None
  if isinstance(model, TextToImageUNet):
    labels = jnp.zeros((1, model.text.max_length), jnp.int32)
  cond = {"timestep_cond": jnp.zeros((1, mc.time_cond_proj_dim), jnp.float32)} if mc.time_cond_proj_dim else {}
  return model.init({"params": rng}, x, jnp.zeros((1,), jnp.float32), labels, **cond)["params"]


def abstract_params(config: Config):
  """jax.ShapeDtypeStruct leaves of the U-Net's parameters: what a checkpoint's params restore onto."""
  return jax.eval_shape(lambda: init_params(make_model(config), jax.random.key(0)))


def abstract_vae_params(vae: VAEConfig):
  return jax.eval_shape(lambda: init_vae_params(AutoencoderKL(vae), jax.random.key(0)))


def param_count(params) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(params))
