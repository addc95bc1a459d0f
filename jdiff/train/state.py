"""Training state (params, EMA params, optimizer state, step), the optimizer, and the update every trainer applies."""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from jdiff.config import TrainingConfig


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


def fresh_state(params, cfg: TrainingConfig) -> TrainState:
  """Step 0: the EMA starts at the params, the optimizer state is the optimizer's initial one."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                    opt_state=make_optimizer(cfg).init(params))


def apply_gradients(state: TrainState, loss: jax.Array, grads, cfg: TrainingConfig) -> tuple[TrainState, dict]:
  """(new state, metrics): the optimizer's update and the EMA, unless the loss or gradient is not finite.

  A non-finite step leaves params, EMA and optimizer state as they were and counts only the step, so a NaN never
  reaches the params or a checkpoint; metrics["nonfinite_steps"] is 1 for it, and the loop decides whether to
  stop or go on (training.nonfinite).
  """
  updates, opt_state = make_optimizer(cfg).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = ema_decay_at(state.step, cfg)
  ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                         ema_params=keep(ema, state.ema_params), opt_state=keep(opt_state, state.opt_state))
  metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": learning_rate_schedule(cfg)(state.step),
             "nonfinite_steps": 1 - finite.astype(jnp.int32)}
  return new_state, metrics
