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
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": learning_rate_schedule(config.training)(state.step),
             "nonfinite_steps": 1 - finite.astype(jnp.int32)}
  new_state = TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state)
  return keep_if_finite(finite, new_state, state), metrics


def keep_if_finite(finite: jax.Array, new_state: TrainState, state: TrainState) -> TrainState:
  """The new state, or (for a step whose loss or gradient is not finite) the old one with the step counted, so
  a NaN never reaches the params or a checkpoint; the loop decides whether to stop or go on (training.nonfinite)."""
  keep = lambda new, old: jnp.where(finite, new, old)
  return new_state.replace(params=jax.tree_util.tree_map(keep, new_state.params, state.params),
                           ema_params=jax.tree_util.tree_map(keep, new_state.ema_params, state.ema_params),
                           opt_state=jax.tree_util.tree_map(keep, new_state.opt_state, state.opt_state))
