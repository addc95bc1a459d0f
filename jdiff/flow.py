"""Flow matching (rectified flow: Liu et al., 2023; Esser et al., 2024, Stable Diffusion 3; Flux) as pure functions.

No Flax here; everything in fp32. The forward process interpolates linearly between data and noise,
    x_s = (1 - s) x0 + s eps,   s in [0, 1],
and the network predicts the velocity dx_s/ds = eps - x0. The model reads time as s * T (T = num_timesteps, 1000:
SD3's and Flux's timestep = sigma * 1000).

On jdiff's sigma scale: x_s / (1 - s) = x0 + s / (1 - s) eps, so s is the noise level sigma = s / (1 - s)
(s = sigma / (1 + sigma); s = 1 is sigma infinite, pure noise). A velocity v gives the denoised x0 = x_s - s v and
the noise eps = x_s + (1 - s) v, so every sampler of jdiff/samplers.py runs on a flow model.

Training draws s from a density (uniform, logit-normal, or SD3's "mode" density) and then applies the shift
    s' = a s / (1 + (a - 1) s),
which spends more of training and sampling at high noise when a > 1 (SD3 uses a = 3 at 1024^2). The shift is
either static (a = flow_shift) or resolution-dependent as in Flux and diffusers' `calculate_shift`: the image is
a sequence of L = (H / p) (W / p) patches (p = 2 on SD3's and Flux's latents), and
    mu = base_shift + (max_shift - base_shift) (L - base_seq_len) / (max_seq_len - base_seq_len),   a = exp(mu)
(defaults 0.5, 1.15, 256, 4096). diffusers' exponential time shift exp(mu) / (exp(mu) + 1 / s - 1) is the
static shift with a = exp(mu), so both kinds act through one formula, in training and in sampling alike.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import schedules

DENSITIES = ("uniform", "logit_normal", "mode")


def interpolate(x0, noise, s):
  """x_s = (1 - s) x0 + s noise; s broadcasts against x0."""
  return (1.0 - s) * x0 + s * noise


def velocity(x0, noise):
  """The training target: d x_s / ds = noise - x0."""
  return noise - x0


def x0_from_velocity(x_s, v, s):
  return x_s - s * v


def noise_from_velocity(x_s, v, s):
  return x_s + (1.0 - s) * v


def shift(s, a):
  """The time shift a s / (1 + (a - 1) s): 0 and 1 stay, and a > 1 moves every other s toward 1 (more noise)."""
  return a * s / (1.0 + (a - 1.0) * s)


def resolution_mu(seq_len, *, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                  max_shift: float = 1.15) -> float:
  """mu linear in the image's sequence length L, base_shift at base_seq_len and max_shift at max_seq_len."""
  slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
  return base_shift + slope * (seq_len - base_seq_len)


def resolution_shift(image_size: int, *, patch_size: int = 2, **mu_kwargs) -> float:
  """The shift a = exp(mu) of a square image_size^2 input cut into patch_size^2 patches (see `resolution_mu`)."""
  return math.exp(resolution_mu((image_size // patch_size) ** 2, **mu_kwargs))


def sigma_of(s):
  """jdiff's noise level s / (1 - s) (infinite at s = 1)."""
  return s / (1.0 - s)


def s_of(sigma):
  """s = sigma / (1 + sigma), 1 where sigma is infinite."""
  return jnp.where(jnp.isfinite(sigma), sigma / (1.0 + sigma), 1.0)


def draw_s(rng, shape, *, density: str, logit_mean: float = 0.0, logit_std: float = 1.0,
           mode_scale: float = 1.29):
  """s in (0, 1) from a training density (Esser et al., 2024, section 3.1), before any shift.

  uniform; logit_normal: sigmoid(N(logit_mean, logit_std^2)); mode: s = 1 - u - mode_scale (cos^2(pi u / 2) - 1 + u)
  for u uniform, which for mode_scale in [-1, 2 / (pi - 2)] is monotone in u and so a density on [0, 1] with its
  mode moved toward the middle (mode_scale > 0) or the ends (< 0); 0 is uniform.
  """
  if density == "uniform":
    return jax.random.uniform(rng, shape)
  if density == "logit_normal":
    return jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, shape))
  if density == "mode":
    u = jax.random.uniform(rng, shape)
    return 1.0 - u - mode_scale * (jnp.cos(jnp.pi * u / 2) ** 2 - 1.0 + u)
  raise ValueError(f"unknown flow density {density!r}; choose one of {', '.join(DENSITIES)}")


def flow_loss(output, *, x0, noise) -> jnp.ndarray:
  """Mean squared velocity error per example, shape [B], in fp32."""
  err = jnp.square(output.astype(jnp.float32) - velocity(x0, noise))
  return jnp.mean(err, axis=tuple(range(1, x0.ndim)))


def flow_schedule(num_timesteps: int, a: float = 1.0) -> schedules.Schedule:
  """A Schedule whose timestep t has the flow's shifted level s_t = shift((t + 1) / T, a): jdiff's spacings and
  interpolations then run on the flow's levels, and the last timestep is pure noise (s = 1, sigma infinite).

  In the variance-preserving terms of schedules.py, abar = 1 / (1 + sigma^2) = (1 - s)^2 / ((1 - s)^2 + s^2).
  """
  s = shift(np.arange(1, num_timesteps + 1, dtype=np.float64) / num_timesteps, a)
  abar = (1.0 - s) ** 2 / ((1.0 - s) ** 2 + s**2)
  betas = 1.0 - abar / np.append(1.0, abar[:-1])
  return schedules.from_betas(betas)
