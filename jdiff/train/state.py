"""Training state (params, EMA params, optimizer state, step) and the optimizer that updates it."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from jdiff.config import Config, TrainingConfig
from jdiff.models.text import TextToImageUNet
from jdiff.models.unet import UNet


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


def learning_rate_schedule(cfg: TrainingConfig) -> optax.Schedule:
  """Linear warmup from 0 to learning_rate over warmup_steps, then constant (as DDPM)."""
  def schedule(step):
    warmup = jnp.minimum(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    return cfg.learning_rate * warmup
  return schedule


def make_optimizer(cfg: TrainingConfig) -> optax.GradientTransformation:
  clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip else optax.identity()
  return optax.chain(clip, optax.adamw(learning_rate_schedule(cfg), weight_decay=cfg.weight_decay))


def ema_decay_at(step: jax.Array, cfg: TrainingConfig) -> jax.Array:
  """EMA decay; with ema_warmup it ramps up so short runs are not dominated by the random init."""
  if not cfg.ema_warmup:
    return jnp.asarray(cfg.ema_decay, jnp.float32)
  step = step.astype(jnp.float32)
  return jnp.minimum(cfg.ema_decay, (1.0 + step) / (10.0 + step))


def make_model(config: Config) -> UNet | TextToImageUNet:
  """The U-Net; with config.model.context_dim > 0, the U-Net and its text encoder (token ids for labels)."""
  remat = config.training.remat
  if config.model.context_dim:
    return TextToImageUNet(config.model, config.text.encoder_config(config.model.dtype), config.text.trainable,
                           remat=remat)
  return UNet(config.model, remat=remat)


def init_params(model: UNet | TextToImageUNet, rng: jax.Array):
  mc = model.config
  x = jnp.zeros((1, mc.image_size, mc.image_size, mc.in_channels), jnp.float32)
  labels = jnp.zeros((1,), jnp.int32) if mc.num_classes else None
  if isinstance(model, TextToImageUNet):
    labels = jnp.zeros((1, model.text.max_length), jnp.int32)
  return model.init({"params": rng}, x, jnp.zeros((1,), jnp.float32), labels)["params"]


def create_train_state(config: Config, rng: jax.Array) -> TrainState:
  """A fresh state; call under jax.jit (or eval_shape) so initialisation compiles once."""
  params = init_params(make_model(config), rng)
  tx = make_optimizer(config.training)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params, opt_state=tx.init(params))


def abstract_train_state(config: Config) -> TrainState:
  """Shapes and dtypes of the state, without allocating it (for restoring checkpoints)."""
  return jax.eval_shape(lambda: create_train_state(config, jax.random.key(0)))


def param_count(params) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(params))
