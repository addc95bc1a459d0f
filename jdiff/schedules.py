"""Noise schedules as pytrees of fp32 arrays.

Convention (as in DDPM and diffusers): discrete timesteps t = 0..T-1, and
alphas_cumprod[t] = prod_{s<=t} (1 - betas[s]) is the signal fraction of x_t:
    x_t = sqrt(alphas_cumprod[t]) * x0 + sqrt(1 - alphas_cumprod[t]) * eps.
The same noise level in k-diffusion's terms is sigma = sqrt((1 - abar) / abar),
and in VDM's terms log_snr = log(abar / (1 - abar)) = -2 log sigma.

With zero terminal SNR (Lin et al., 2024) the last timestep keeps no signal: abar[T-1] = 0, sigma[T-1] = inf
and log_snr[T-1] = -inf. A model trained so must predict v or x0: its noise estimate there is x_t itself.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

SCHEDULE_NAMES = ("linear", "cosine", "scaled_linear")


class Schedule(NamedTuple):
  """Everything the forward process, the losses and the samplers read, each of shape [T]."""
  betas: jnp.ndarray
  alphas: jnp.ndarray
  alphas_cumprod: jnp.ndarray
  alphas_cumprod_prev: jnp.ndarray
  sqrt_alphas_cumprod: jnp.ndarray
  sqrt_one_minus_alphas_cumprod: jnp.ndarray
  sigmas: jnp.ndarray
  log_snr: jnp.ndarray
  posterior_variance: jnp.ndarray
  posterior_log_variance_clipped: jnp.ndarray
  posterior_mean_coef_x0: jnp.ndarray
  posterior_mean_coef_xt: jnp.ndarray

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
  """DDPM's schedule: betas evenly spaced from beta_start to beta_end."""
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def scaled_linear_betas(num_timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> np.ndarray:
  """Stable Diffusion's schedule: sqrt(beta) evenly spaced."""
  return np.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=np.float64) ** 2


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Improved DDPM's schedule: abar(t) = cos^2(((t/T + s) / (1 + s)) pi/2), betas clipped at max_beta."""
  def abar(u):
    return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
  t = np.arange(num_timesteps, dtype=np.float64)
  ratios = np.array([abar((i + 1) / num_timesteps) / abar(i / num_timesteps) for i in t])
  return np.minimum(1.0 - ratios, max_beta)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Lin et al. (2024), Algorithm 1: sqrt(abar) shifted and scaled so that the last timestep keeps no signal
  (SNR 0) and the first keeps its own; the betas of that, the last being 1."""
  root = np.sqrt(np.cumprod(1.0 - np.asarray(betas, np.float64)))
  root = (root - root[-1]) * root[0] / (root[0] - root[-1])
  abar = root**2
  return 1.0 - abar / np.append(1.0, abar[:-1])


def from_betas(betas: np.ndarray) -> Schedule:
  """Derives every schedule array in float64, then stores them as fp32. Only the last beta may be 1 (zero
  terminal SNR: sigma infinite there)."""
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or len(betas) < 2 or np.any(betas <= 0) or np.any(betas[:-1] >= 1) or betas[-1] > 1:
    raise ValueError("betas must be a 1-D array with every value in (0, 1), the last in (0, 1] "
                     "(1: zero terminal SNR)")
  alphas = 1.0 - betas
  abar = np.cumprod(alphas)
  abar_prev = np.append(1.0, abar[:-1])
  post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
  # The posterior variance is 0 at t=0; its log is clipped to the t=1 value, as in DDPM.
  post_log_var = np.log(np.append(post_var[1], post_var[1:]))
  with np.errstate(divide="ignore"):  # abar 0 at zero terminal SNR: sigma inf, log SNR -inf
    arrays = dict(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        sqrt_alphas_cumprod=np.sqrt(abar),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
        sigmas=np.sqrt((1.0 - abar) / abar),
        log_snr=np.log(abar) - np.log1p(-abar),
        posterior_variance=post_var,
        posterior_log_variance_clipped=post_log_var,
        posterior_mean_coef_x0=betas * np.sqrt(abar_prev) / (1.0 - abar),
        posterior_mean_coef_xt=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
    )
  return Schedule(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in arrays.items()})


def make_schedule(name: str, num_timesteps: int = 1000, *, zero_terminal_snr: bool = False, **kwargs) -> Schedule:
  """Builds a schedule by name: 'linear', 'cosine' or 'scaled_linear'; zero_terminal_snr rescales it so the last
  timestep is pure noise (`rescale_zero_terminal_snr`)."""
  makers = {"linear": linear_betas, "cosine": cosine_betas, "scaled_linear": scaled_linear_betas}
  if name not in makers:
    raise ValueError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULE_NAMES)}")
  if num_timesteps < 2:
    raise ValueError(f"num_timesteps must be at least 2, got {num_timesteps}")
  betas = makers[name](num_timesteps, **kwargs)
  return from_betas(rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas)


# An infinite sigma (zero terminal SNR) enters the interpolations as this log sigma: anything beyond the last
# finite level interpolates to infinity, and the last finite level itself stays exact.
_LOG_SIGMA_CAP = 1e4


def sigma_to_t(schedule: Schedule, sigma: jnp.ndarray) -> jnp.ndarray:
  """Continuous timestep for a noise level, by linear interpolation in log sigma (as k-diffusion)."""
  log_sigmas = jnp.minimum(jnp.log(schedule.sigmas), _LOG_SIGMA_CAP)
  log_sigma = jnp.log(jnp.maximum(sigma, 1e-10))
  t = jnp.arange(schedule.num_timesteps, dtype=jnp.float32)
  return jnp.interp(log_sigma, log_sigmas, t)


def t_to_sigma(schedule: Schedule, t: jnp.ndarray) -> jnp.ndarray:
  """Noise level at a (possibly fractional) timestep, interpolating log sigma."""
  grid = jnp.arange(schedule.num_timesteps, dtype=jnp.float32)
  return jnp.exp(jnp.interp(t, grid, jnp.minimum(jnp.log(schedule.sigmas), _LOG_SIGMA_CAP)))
