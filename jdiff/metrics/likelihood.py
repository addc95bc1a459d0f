"""Negative log-likelihood of images under a diffusion model, in bits per dimension, two ways.

The variational bound (DDPM, Ho et al. 2020, eq. 5), for pixel models on 8-bit images scaled to [-1, 1]:
  -log p(x0) <= KL(q(x_T | x0) || N(0, I)) + sum_{t>1} KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) - log p(x0 | x_1)
where p(x_{t-1} | x_t) is the posterior q(x_{t-1} | x_t, x0_hat) around the model's estimate x0_hat, with a fixed
variance: the posterior's ("small") or beta_t ("large"), and p(x0 | x_1) is DDPM's discretised Gaussian decoder: the
mass of N(x0_hat, posterior variance of step 2) over each pixel's bin of width 2/255 (the edge bins reach to
infinity). The sum over t is exact over every step, or estimated from a stratified sample of steps.

The probability-flow ODE (Song et al., 2021): in the samplers' scale x = x0 + sigma eps the ODE is
dx/dsigma = (x - D(x, sigma)) / sigma, and along it d log p / d log sigma = -(dim - div D). Integrating from the
schedule's smallest sigma (where x is the data point) to its largest finite one, where the density is the samplers'
prior N(0, (1 + sigma_max^2) I), gives log p(x0) of the model's density at the smallest noise level. The divergence is
Hutchinson's estimate v.(v - dD/dx v) with Rademacher probes v (one per solve, fixed along it), or the exact trace of
the Jacobian for small dimensions. Dequantised 8-bit data, x0 plus uniform noise over its bin, bounds the discrete
likelihood: -log P(pixels) <= -log p(x0 + u) - dim log(2/255) on average over u.

Both take `model_fn(x_t, t, cond)` and a Schedule, as the samplers do, and return nats or bits per example. A
model_fn that is a jax.tree_util.Partial holding the network's parameters passes them to the compiled programs as
arguments, so they are not baked in as constants.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr
from jax.tree_util import Partial

from jdiff import diffusion
from jdiff.schedules import Schedule, sigma_to_t

BIN_WIDTH = 2.0 / 255.0  # uint8 levels k map to k / 127.5 - 1
VARIANCES = ("small", "large")


def to_bits_per_dim(nats: np.ndarray, dims: int) -> np.ndarray:
  return np.asarray(nats, np.float64) / (dims * math.log(2.0))


# The variational bound.

def discretized_gaussian_log_likelihood(x, *, mean, log_scale):
  """log of the mass of N(mean, exp(log_scale)^2) over x's bin, per value: x on the 8-bit grid in [-1, 1]; the bins
  of -1 and 1 extend to -inf and inf."""
  inv = jnp.exp(-log_scale)
  upper = jnp.where(x > 1.0 - 1e-3, jnp.inf, inv * (x - mean + BIN_WIDTH / 2))
  lower = jnp.where(x < -1.0 + 1e-3, -jnp.inf, inv * (x - mean - BIN_WIDTH / 2))
  # log(Phi(upper) - Phi(lower)), computed in the tail where both are small: mirrored when the bin lies right.
  mirrored = lower > 0
  hi, lo = jnp.where(mirrored, -lower, upper), jnp.where(mirrored, -upper, lower)
  log_hi, log_lo = log_ndtr(hi), log_ndtr(lo)
  return log_hi + jnp.log1p(-jnp.exp(jnp.minimum(log_lo - log_hi, -1e-12)))


def _sum_dims(x):
  return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def prior_kl(schedule: Schedule, x0) -> jax.Array:
  """KL(q(x_T | x0) || N(0, I)) per example, in nats."""
  abar = schedule.alphas_cumprod[-1]
  return 0.5 * _sum_dims(abar * jnp.square(x0) + (1.0 - abar) - 1.0 - jnp.log1p(-abar))


def vlb_terms(model_fn, schedule: Schedule, x0, t, noise, cond=None, *, prediction: str, variance: str = "small"):
  """Each example's term of the bound at its step t (int [B]): the decoder's -log p(x0 | x_1) where t == 0,
  KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) elsewhere; nats [B]. x_t is q_sample(x0, t, noise)."""
  x_t = diffusion.q_sample(schedule, x0, t, noise)
  alpha_bar = diffusion.extract(schedule.alphas_cumprod, t, x0.ndim)
  x0_hat, _ = diffusion.to_x0_eps(model_fn(x_t, t.astype(jnp.float32), cond), x_t=x_t, alpha_bar=alpha_bar,
                                  prediction=prediction)
  mean_q, var_q, log_var_small = diffusion.q_posterior(schedule, x0, x_t, t)
  mean_p, _, _ = diffusion.q_posterior(schedule, x0_hat, x_t, t)
  if variance == "small":
    kl = 0.5 * jnp.square(mean_q - mean_p) / var_q
  else:
    var_p = diffusion.extract(schedule.betas, t, x0.ndim)
    kl = 0.5 * (jnp.log(var_p / var_q) + var_q / var_p - 1.0 + jnp.square(mean_q - mean_p) / var_p)
  # At t == 0 the posterior variance is 0: the decoder's term replaces the KL there (and its NaN).
  decoder = -discretized_gaussian_log_likelihood(x0, mean=x0_hat, log_scale=0.5 * log_var_small)
  return jnp.where(t == 0, _sum_dims(decoder), _sum_dims(jnp.where(var_q > 0, kl, 0.0)))


def vlb_nats(model_fn, schedule: Schedule, x0, cond=None, *, rng, prediction: str, variance: str = "small",
             timesteps: int | None = None, chunk: int = 100):
  """The variational bound on -log p(x0) per example (nats [B]) for x0 on the 8-bit grid in [-1, 1].

  timesteps None sums every step's term; an integer k estimates the sum over t = 1..T-1 from k strata of equal size,
  one step drawn uniformly in each (unbiased). The prior's and the decoder's terms are always exact. The noise is
  fresh for every term. `chunk` steps are evaluated per compiled call.
  """
  if variance not in VARIANCES:
    raise ValueError(f"unknown variance {variance!r}; choose one of {', '.join(VARIANCES)}")
  T = schedule.num_timesteps
  batch = x0.shape[0]
  if timesteps is None:
    steps, weights = jnp.broadcast_to(jnp.arange(1, T), (batch, T - 1)), jnp.ones((batch, T - 1))
  else:
    if not 1 <= timesteps <= T - 1:
      raise ValueError(f"timesteps={timesteps} must be in [1, {T - 1}] (or None for every step)")
    edges = np.linspace(1, T, timesteps + 1)
    rng, draw = jax.random.split(rng)
    u = jax.random.uniform(draw, (batch, timesteps))
    steps = jnp.floor(edges[:-1] + u * np.diff(edges)).astype(jnp.int32)
    weights = jnp.broadcast_to(jnp.asarray(np.diff(edges), jnp.float32), (batch, timesteps))
  steps = jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), steps.astype(jnp.int32)], axis=1)
  weights = jnp.concatenate([jnp.ones((batch, 1)), weights], axis=1)
  model_fn, total = _traceable(model_fn), prior_kl(schedule, x0)
  for start in range(0, steps.shape[1], chunk):
    rng, key = jax.random.split(rng)
    total = total + _vlb_chunk(model_fn, schedule, x0, cond, steps[:, start:start + chunk],
                               weights[:, start:start + chunk], key, prediction=prediction, variance=variance)
  return total


def _traceable(model_fn) -> Partial:
  """model_fn as a pytree the compiled functions take as an argument: its parameters, if any, as leaves."""
  return model_fn if isinstance(model_fn, Partial) else Partial(model_fn)


@functools.partial(jax.jit, static_argnames=("prediction", "variance"))
def _vlb_chunk(model_fn, schedule, x0, cond, steps, weights, key, *, prediction, variance):
  """sum_j weights[:, j] * term(steps[:, j]) per example, the steps of a chunk run one after another."""
  def body(total, column):
    t, w, k = column
    noise = jax.random.normal(k, x0.shape)
    return total + w * vlb_terms(model_fn, schedule, x0, t, noise, cond, prediction=prediction,
                                 variance=variance), None
  keys = jax.random.split(key, steps.shape[1])
  return jax.lax.scan(body, jnp.zeros(x0.shape[0]), (steps.T, weights.T, keys))[0]


# The probability-flow ODE.

def _denoiser(model_fn, schedule: Schedule, cond, prediction: str):
  """D(x, sigma) = E[x0 | x] in the samplers' scale x = x_t / sqrt(abar), unclipped."""
  def denoise(x, sigma):
    alpha_bar = 1.0 / (1.0 + sigma**2)
    x_t = x * jnp.sqrt(alpha_bar)
    t = jnp.full((x.shape[0],), sigma_to_t(schedule, sigma), jnp.float32)
    return diffusion.to_x0_eps(model_fn(x_t, t, cond), x_t=x_t, alpha_bar=alpha_bar, prediction=prediction)[0]
  return denoise


def ode_log_likelihood(model_fn, schedule: Schedule, x0, cond=None, *, prediction: str, steps: int = 100,
                       rng=None, exact_trace: bool = False):
  """log p(x0) per example (nats [B]) of the model's density at the schedule's smallest noise level, by the
  probability-flow ODE solved with `steps` classical Runge-Kutta steps evenly spaced in log sigma.

  rng draws one Rademacher probe per example for Hutchinson's divergence estimate (unbiased; call again with another
  key for another draw); exact_trace=True computes the Jacobian's trace instead (dim model calls per evaluation).
  """
  if not exact_trace and rng is None:
    raise ValueError("Hutchinson's estimator needs rng (or pass exact_trace=True)")
  probe = None if exact_trace else jax.random.rademacher(rng, x0.shape, jnp.float32)
  return _ode(_traceable(model_fn), schedule, x0.astype(jnp.float32), cond, probe, prediction=prediction,
              steps=steps)


@functools.partial(jax.jit, static_argnames=("prediction", "steps"))
def _ode(model_fn, schedule, x0, cond, probe, *, prediction, steps):
  denoise = _denoiser(model_fn, schedule, cond, prediction)
  dims = math.prod(x0.shape[1:])

  def drift(x, log_sigma):
    """(dx / dlog sigma, d log p / dlog sigma) = (x - D, -(dim - div D))."""
    sigma = jnp.exp(log_sigma)
    denoised_along = lambda v: jax.jvp(lambda y: denoise(y, sigma), (x,), (v,))
    if probe is not None:
      d, jvp = denoised_along(probe)
      return x - d, -(dims - _sum_dims(probe * jvp))

    def diagonal(i):  # dD_i / dx_i of every example: the Jacobian is block-diagonal over the batch
      basis = jax.nn.one_hot(jnp.full(x.shape[0], i), dims).reshape(x.shape)
      return _sum_dims(basis * denoised_along(basis)[1])
    return x - denoise(x, sigma), -(dims - jnp.sum(jax.lax.map(diagonal, jnp.arange(dims)), axis=0))

  def rk4(carry, log_sigma):
    x, delta = carry
    h = grid[1] - grid[0]
    k1 = drift(x, log_sigma)
    k2 = drift(x + h / 2 * k1[0], log_sigma + h / 2)
    k3 = drift(x + h / 2 * k2[0], log_sigma + h / 2)
    k4 = drift(x + h * k3[0], log_sigma + h)
    x = x + h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
    return (x, delta + h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])), None

  # A zero-terminal-SNR schedule's last sigma is infinite: the ODE ends at its largest finite one.
  sigma_max = jnp.max(jnp.where(jnp.isfinite(schedule.sigmas), schedule.sigmas, 0.0))
  grid = jnp.linspace(jnp.log(schedule.sigmas[0]), jnp.log(sigma_max), steps + 1)
  (x, delta), _ = jax.lax.scan(rk4, (x0, jnp.zeros(x0.shape[0])), grid[:-1])
  prior_var = 1.0 + sigma_max**2
  log_prior = -0.5 * (_sum_dims(jnp.square(x)) / prior_var + dims * jnp.log(2 * jnp.pi * prior_var))
  # log p(x0) = log p(x_end) + integral of (dim - div D) dlog sigma, and delta accumulated its negative.
  return log_prior - delta


def dequantize(images_uint8: np.ndarray, rng) -> jax.Array:
  """Images on the 8-bit grid in [-1, 1] plus uniform noise over each value's bin of width 2/255."""
  x = jnp.asarray(images_uint8, jnp.float32) / 127.5 - 1.0
  return x + (jax.random.uniform(rng, x.shape) - 0.5) * BIN_WIDTH


def ode_bits_per_dim(model_fn, schedule: Schedule, images_uint8: np.ndarray, cond=None, *, rng, prediction: str,
                     steps: int = 100) -> np.ndarray:
  """Bits per dimension [B] of uint8 images by the ODE on dequantised data: an upper bound on average."""
  dequant, probe = jax.random.split(rng)
  x = dequantize(images_uint8, dequant)
  dims = math.prod(x.shape[1:])
  log_p = ode_log_likelihood(model_fn, schedule, x, cond, prediction=prediction, steps=steps, rng=probe)
  return to_bits_per_dim(-np.asarray(log_p) - dims * math.log(BIN_WIDTH), dims)


def vlb_bits_per_dim(model_fn, schedule: Schedule, images_uint8: np.ndarray, cond=None, *, rng, prediction: str,
                     variance: str = "small", timesteps: int | None = None) -> np.ndarray:
  """Bits per dimension [B] of uint8 images by the variational bound (see vlb_nats)."""
  x0 = jnp.asarray(images_uint8, jnp.float32) / 127.5 - 1.0
  nats = vlb_nats(model_fn, schedule, x0, cond, rng=rng, prediction=prediction, variance=variance,
                  timesteps=timesteps)
  return to_bits_per_dim(nats, math.prod(x0.shape[1:]))
