"""One U-Net training step as a pure function: sample t (a flow model: s) and noise, predict, weighted loss, Adam
update, EMA."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jdiff import conditioning, diffusion, flow
from jdiff.build import init_params, make_model
from jdiff.config import Config
from jdiff.schedules import Schedule
from jdiff.train.masks import random_masks
from jdiff.train.state import TrainState, apply_gradients, fresh_state


def drop_labels(rng: jax.Array, labels: jax.Array, num_classes: int, rate: float) -> jax.Array:
  """Replaces a `rate` share of labels by the null class `num_classes`, for classifier-free guidance."""
  if rate == 0.0:
    return labels
  return jnp.where(jax.random.uniform(rng, labels.shape) < rate, num_classes, labels)


def drop_captions(rng: jax.Array, ids: jax.Array, empty_ids: jax.Array, rate: float) -> jax.Array:
  """Replaces a `rate` share of token-id rows [B, L] by the empty prompt's ids [L], for classifier-free guidance."""
  if rate == 0.0:
    return ids
  return jnp.where(jax.random.uniform(rng, ids.shape[:1])[:, None] < rate, empty_ids, ids)


def training_draws(rng: jax.Array, batch: dict, config: Config) -> tuple[dict, jax.Array]:
  """Per-example timesteps `t`, `noise` and the conditioning `labels` (class labels, or caption token ids for a
  text-to-image model, some replaced by the null class or the empty prompt) for the whole batch, an inpainting
  model's `mask`, and the dropout key."""
  dc = config.diffusion
  x0 = batch["image"]
  k_t, k_noise, k_labels, k_dropout = jax.random.split(rng, 4)
  draws = {"noise": jax.random.normal(k_noise, x0.shape, jnp.float32)}
  if dc.prediction == "flow":
    draws["s"] = flow_levels(k_t, x0.shape[0], config)
  else:
    draws["t"] = jax.random.randint(k_t, (x0.shape[0],), 0, dc.num_timesteps)
  if config.conditioning.kind == "inpainting":  # its own stream: the other draws stay as they were
    draws["mask"] = random_masks(jax.random.fold_in(rng, 0x3A5C), *x0.shape[:3], config.conditioning.full_mask_rate)
  if config.model.num_classes:
    draws["labels"] = drop_labels(k_labels, batch["label"], config.model.num_classes, dc.label_dropout)
  if config.model.context_dim:
    empty = jnp.asarray(config.text.tokenizer().encode("")[0])
    draws["labels"] = drop_captions(k_labels, batch["tokens"], empty, config.text.caption_dropout)
  return draws, k_dropout


def flow_levels(rng: jax.Array, batch_size: int, config: Config) -> jax.Array:
  """A flow model's training levels s [B]: drawn from the config's density, then shifted as sampling shifts them."""
  dc = config.diffusion
  s = flow.draw_s(rng, (batch_size,), density=dc.flow_density, logit_mean=dc.flow_logit_mean,
                  logit_std=dc.flow_logit_std, mode_scale=dc.flow_mode_scale)
  return flow.shift(s, dc.flow_shift_for(config.model.image_size))


def loss_on_draws(params, batch: dict, draws: dict, dropout_rng: jax.Array, schedule: Schedule, *, config: Config,
                  train: bool = True) -> jax.Array:
  """Mean loss over the batch for given draws; fp32 arithmetic (the U-Net returns fp32 whatever its compute dtype)."""
  dc = config.diffusion
  x0, noise = batch["image"], draws["noise"]
  cond = image_condition(x0, draws, config)
  with_cond = lambda x: x if cond is None else jnp.concatenate([x, cond], axis=-1)
  if dc.prediction == "flow":
    s = draws["s"]
    x_s = flow.interpolate(x0, noise, s.reshape((-1,) + (1,) * (x0.ndim - 1)))
    pred = make_model(config).apply({"params": params}, with_cond(x_s), s * dc.num_timesteps, draws.get("labels"),
                                    train=train, rngs={"dropout": dropout_rng})
    return jnp.mean(flow.flow_loss(pred, x0=x0, noise=noise))
  t = draws["t"]
  x_t = diffusion.q_sample(schedule, x0, t, noise)
  pred = make_model(config).apply({"params": params}, with_cond(x_t), t.astype(jnp.float32), draws.get("labels"),
                                  train=train, rngs={"dropout": dropout_rng})
  losses = diffusion.diffusion_loss(pred, schedule=schedule, x0=x0, noise=noise, t=t,
                                    prediction=dc.prediction, min_snr_gamma=dc.min_snr_gamma)
  return jnp.mean(losses)


def image_condition(x0: jax.Array, draws: dict, config: Config) -> jax.Array | None:
  """The channels a conditioned U-Net sees beside x_t (jdiff/conditioning.py), made from the clean images; None
  for an unconditioned one."""
  cc = config.conditioning
  if cc.kind == "super_resolution":
    low = conditioning.low_resolution(x0, cc.scale)
    return conditioning.super_resolution_condition(low, *x0.shape[1:3], cc.upsample)
  if cc.kind == "inpainting":
    return conditioning.inpainting_condition(x0, draws["mask"])
  return None


def diffusion_training_loss(params, batch: dict, rng: jax.Array, schedule: Schedule, *, config: Config,
                            train: bool = True) -> jax.Array:
  """Mean loss over the batch for random timesteps, noise and label dropout drawn from `rng`."""
  draws, dropout_rng = training_draws(rng, batch, config)
  return loss_on_draws(params, batch, draws, dropout_rng, schedule, config=config, train=train)


def loss_and_grads(params, batch: dict, rng: jax.Array, schedule: Schedule, *, config: Config):
  """(loss, grads) of the batch mean; with grad_accum_steps = k, summed over k micro-batches in a lax.scan.

  The draws are made for the whole batch first and then sliced, so k micro-batches give the gradient of one
  k-times-larger batch (up to float summation order); only the model's dropout masks differ, being drawn per
  micro-batch. Micro-batch i takes examples i, i+k, i+2k, ...: each device keeps its rows, nothing moves.
  """
  k = config.training.grad_accum_steps
  if k == 1:
    return jax.value_and_grad(diffusion_training_loss)(params, batch, rng, schedule, config=config)
  draws, dropout_rng = training_draws(rng, batch, config)
  micro = jax.tree_util.tree_map(lambda x: jnp.moveaxis(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 1, 0),
                                 (batch, draws))
  grad_fn = jax.value_and_grad(loss_on_draws)

  def add_micro_batch(total, inputs):
    i, (micro_batch, micro_draws) = inputs
    loss, grads = grad_fn(params, micro_batch, micro_draws, jax.random.fold_in(dropout_rng, i), schedule,
                          config=config)
    return jax.tree_util.tree_map(jnp.add, total, (loss, grads)), None

  zeros = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, params))
  total, _ = jax.lax.scan(add_micro_batch, zeros, (jnp.arange(k), micro))
  return jax.tree_util.tree_map(lambda x: x / k, total)


def create_train_state(config: Config, rng: jax.Array) -> TrainState:
  """A fresh state; call under jax.jit (or eval_shape) so initialisation compiles once."""
  return fresh_state(init_params(make_model(config), rng), config.training)


def abstract_train_state(config: Config) -> TrainState:
  """Shapes and dtypes of the state, without allocating it (for restoring checkpoints)."""
  return jax.eval_shape(functools.partial(create_train_state, config), jax.random.key(0))


def train_step(state: TrainState, batch: dict, rng: jax.Array, schedule: Schedule, *, config: Config):
  """Returns (new_state, metrics). Every random draw is a function of (rng, state.step)."""
  step_rng = jax.random.fold_in(rng, state.step)
  loss, grads = loss_and_grads(state.params, batch, step_rng, schedule, config=config)
  return apply_gradients(state, loss, grads, config.training)
