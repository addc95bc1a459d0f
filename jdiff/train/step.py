"""One training step as a pure function: sample t and noise, predict, weighted loss, Adam update, EMA."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jdiff import diffusion
from jdiff.config import Config
from jdiff.schedules import Schedule
from jdiff.train.state import TrainState, ema_decay_at, learning_rate_schedule, make_model, make_optimizer


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


def diffusion_training_loss(params, batch: dict, rng: jax.Array, schedule: Schedule, *, config: Config,
                            train: bool = True) -> jax.Array:
  """Mean loss over the batch for random timesteps, noise and label dropout drawn from `rng`."""
  dc = config.diffusion
  x0 = batch["image"]
  k_t, k_noise, k_labels, k_dropout = jax.random.split(rng, 4)
  t = jax.random.randint(k_t, (x0.shape[0],), 0, dc.num_timesteps)
  noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
  x_t = diffusion.q_sample(schedule, x0, t, noise)
  labels = None
  if config.model.num_classes:
    labels = drop_labels(k_labels, batch["label"], config.model.num_classes, dc.label_dropout)
  if config.model.context_dim:
    empty = jnp.asarray(config.text.tokenizer().encode("")[0])
    labels = drop_captions(k_labels, batch["tokens"], empty, config.text.caption_dropout)
  pred = make_model(config).apply({"params": params}, x_t, t.astype(jnp.float32), labels, train=train,
                                  rngs={"dropout": k_dropout})
  losses = diffusion.diffusion_loss(pred, schedule=schedule, x0=x0, noise=noise, t=t,
                                    parameterisation=dc.prediction, min_snr_gamma=dc.min_snr_gamma)
  return jnp.mean(losses)


def train_step(state: TrainState, batch: dict, rng: jax.Array, schedule: Schedule, *, config: Config):
  """Returns (new_state, metrics). Every random draw is a function of (rng, state.step)."""
  step_rng = jax.random.fold_in(rng, state.step)
  loss, grads = jax.value_and_grad(diffusion_training_loss)(state.params, batch, step_rng, schedule, config=config)
  updates, opt_state = make_optimizer(config.training).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = ema_decay_at(state.step, config.training)
  ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
             "learning_rate": learning_rate_schedule(config.training)(state.step)}
  return TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state), metrics
