"""The diffusion process as pure functions: forward noising, posterior, predictions, losses.

No Flax here. `alpha_bar` arguments are the signal fraction abar of x_t (see schedules.py), already
broadcast against x; `t` arguments are integer timesteps into a Schedule. Everything is computed in
fp32 whatever the dtype of the network's prediction.
"""
from __future__ import annotations

import jax.numpy as jnp

from jdiff.schedules import Schedule

PREDICTIONS = ("eps", "x0", "v")
# Every model's prediction: those above, functions of the variance-preserving x_t, and "flow", flow matching's
# velocity on its own interpolation x_s = (1 - s) x0 + s eps (jdiff/flow.py), which the samplers and the trainer
# treat apart.
MODEL_PREDICTIONS = PREDICTIONS + ("flow",)


def extract(values: jnp.ndarray, t: jnp.ndarray, ndim: int) -> jnp.ndarray:
  """values[t] reshaped to [B, 1, ..., 1] so it broadcasts against an array of rank ndim."""
  out = jnp.take(values, jnp.asarray(t, jnp.int32), axis=0)
  return out.reshape(out.shape + (1,) * (ndim - out.ndim))


def q_sample(schedule: Schedule, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
  """Samples q(x_t | x_0) in closed form: sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
  a = extract(schedule.sqrt_alphas_cumprod, t, x0.ndim)
  s = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
  return a * x0 + s * noise


def q_posterior(schedule: Schedule, x0: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray):
  """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
  mean = (extract(schedule.posterior_mean_coef_x0, t, x_t.ndim) * x0
          + extract(schedule.posterior_mean_coef_xt, t, x_t.ndim) * x_t)
  var = extract(schedule.posterior_variance, t, x_t.ndim)
  log_var = extract(schedule.posterior_log_variance_clipped, t, x_t.ndim)
  return mean, var, log_var


def x0_from_eps(*, x_t, eps, alpha_bar):
  return (x_t - jnp.sqrt(1.0 - alpha_bar) * eps) / jnp.sqrt(alpha_bar)


def eps_from_x0(*, x_t, x0, alpha_bar):
  return (x_t - jnp.sqrt(alpha_bar) * x0) / jnp.sqrt(1.0 - alpha_bar)


def v_from_x0_eps(*, x0, eps, alpha_bar):
  """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho, 2022)."""
  return jnp.sqrt(alpha_bar) * eps - jnp.sqrt(1.0 - alpha_bar) * x0


def x0_from_v(*, x_t, v, alpha_bar):
  return jnp.sqrt(alpha_bar) * x_t - jnp.sqrt(1.0 - alpha_bar) * v


def eps_from_v(*, x_t, v, alpha_bar):
  return jnp.sqrt(1.0 - alpha_bar) * x_t + jnp.sqrt(alpha_bar) * v


def to_x0_eps(output, *, x_t, alpha_bar, prediction: str):
  """(x0, eps) implied by a network output that predicts `prediction` (eps, x0 or v), in fp32."""
  pred = output.astype(jnp.float32)
  x_t = x_t.astype(jnp.float32)
  if prediction == "eps":
    return x0_from_eps(x_t=x_t, eps=pred, alpha_bar=alpha_bar), pred
  if prediction == "x0":
    return pred, eps_from_x0(x_t=x_t, x0=pred, alpha_bar=alpha_bar)
  if prediction == "v":
    return x0_from_v(x_t=x_t, v=pred, alpha_bar=alpha_bar), eps_from_v(x_t=x_t, v=pred, alpha_bar=alpha_bar)
  raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


def training_target(*, x0, noise, alpha_bar, prediction: str):
  """What the network is trained to output for x_t = q_sample(x0, noise)."""
  if prediction == "eps":
    return noise
  if prediction == "x0":
    return x0
  if prediction == "v":
    return v_from_x0_eps(x0=x0, eps=noise, alpha_bar=alpha_bar)
  raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


def loss_weight(snr, *, prediction: str, min_snr_gamma: float | None):
  """Per-example weight. None or 0 gives L_simple (weight 1); otherwise min-SNR-gamma (Hang et al., 2023).

  Min-SNR weights the x0-space error by min(snr, gamma); expressed for each target that is
  min(snr, gamma) / snr for eps, min(snr, gamma) for x0 and min(snr, gamma) / (snr + 1) for v.
  """
  if not min_snr_gamma:
    return jnp.ones_like(snr)
  clipped = jnp.minimum(snr, min_snr_gamma)
  if prediction == "eps":
    return clipped / snr
  if prediction == "x0":
    return clipped
  if prediction == "v":
    return clipped / (snr + 1.0)
  raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


def diffusion_loss(output, *, schedule: Schedule, x0, noise, t, prediction: str = "eps",
                   min_snr_gamma: float | None = None) -> jnp.ndarray:
  """Weighted mean squared error per example, shape [B], in fp32."""
  alpha_bar = extract(schedule.alphas_cumprod, t, x0.ndim)
  target = training_target(x0=x0, noise=noise, alpha_bar=alpha_bar, prediction=prediction)
  err = jnp.mean(jnp.square(output.astype(jnp.float32) - target), axis=tuple(range(1, x0.ndim)))
  snr = jnp.exp(jnp.take(schedule.log_snr, t))
  return loss_weight(snr, prediction=prediction, min_snr_gamma=min_snr_gamma) * err
