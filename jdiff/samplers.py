"""Samplers: one pure step per sampler over a sequence of noise levels, driven by one compiled loop.

No Flax here: a sampler takes `model_fn(x_t, t, cond) -> prediction` (x_t in the schedule's variance-preserving
scale, t float32 [B] on the grid 0..T-1, possibly fractional) and the Schedule.

Every sampler works in k-diffusion's variance-exploding scale, x = x_t / sqrt(abar) = x0 + sigma * eps with
sigma = sqrt((1 - abar) / abar), on the denoiser D(x, sigma) = E[x0 | x]. The sampler is handed noise levels
sigma_0 > ... > sigma_{n-1} and takes n steps, each from one level to the next, the last to sigma 0 (or to the
final level a diffusers scheduler config asks for: see `Levels`). On that last step to 0 the one-step samplers
(DDIM, Euler, DDPM, Heun) and the multistep DPM-Solver++ and UniPC land on the denoised estimate D(x, sigma_{n-1});
LMS integrates its polynomial to 0 at full order, and PLMS takes its Adams-Bashforth step. In this scale DDIM is
Euler's method on the probability-flow ODE (Karras et al., 2022), DDIM's eta noise is Euler ancestral's, and DDPM
is DDIM at eta 1: the posterior q(x_s | x_t, x0_hat) of the betas respaced to the chosen timesteps.

A zero-terminal-SNR schedule's last timestep has sigma infinite: a run starting there starts from pure noise x_t,
and its first step is first order (Euler's, DDIM's or the sampler's noise injection), which needs only the
model's prediction there; a multistep sampler's later steps give that first evaluation no weight in their slopes.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import diffusion, flow
from jdiff.schedules import Schedule, sigma_to_t

SAMPLERS = ("ddpm", "ddim", "euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "lms", "plms",
            "flow_euler", "lcm")
# "flow": a flow model's FlowMatchEuler levels (jdiff.schedulers.FlowMatchLevels), which the Pipeline builds from
# the model's shift; the samplers themselves take that rule, not the name.
SPACINGS = ("leading", "trailing", "linspace", "karras", "flow")
DEFAULT_ETA = {"ddpm": 1.0, "ddim": 0.0, "euler_ancestral": 1.0, "dpmpp_2m_sde": 1.0, "lcm": 1.0}
TUNABLE_ETA = ("ddim", "euler_ancestral", "dpmpp_2m_sde")


# Step selection.

def timesteps(*, num_timesteps: int, steps: int, spacing: str) -> np.ndarray:
  """Descending integer timesteps, as diffusers' `timestep_spacing` (T = num_timesteps, n = steps).

  leading: multiples of T // n from 0 (never starts at T - 1); trailing: T - 1 down in strides of T / n
  (starts from pure noise; n = T gives every timestep); linspace: n points rounded from [0, T - 1].
  """
  t, n = num_timesteps, steps
  if spacing == "leading":
    ts = np.arange(n) * (t // n)
  elif spacing == "trailing":
    ts = np.round(t - np.arange(n) * t / n) - 1
  elif spacing == "linspace":
    ts = np.round(np.linspace(0, t - 1, n))
  else:
    raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS[:3])}")
  return np.sort(ts.astype(np.int32))[::-1]


def karras_sigmas(*, sigma_min, sigma_max, steps: int, rho: float = 7.0) -> jnp.ndarray:
  """n descending noise levels evenly spaced in sigma^(1/rho), from sigma_max to sigma_min (Karras et al., 2022)."""
  ramp = jnp.linspace(0.0, 1.0, steps)
  hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
  return (hi + ramp * (lo - hi)) ** rho


def noise_levels(schedule: Schedule, *, steps: int, spacing: str):
  """(sigmas, ts), each [n] and descending: the levels the model is evaluated at, the last step going on to 0.

  Timestep spacings give integer ts and the schedule's sigmas at them; 'karras' spans the schedule's own sigma
  range (its largest finite sigma, for a zero-terminal-SNR schedule) and maps each sigma to a fractional timestep.
  """
  if spacing == "flow":
    raise ValueError("spacing 'flow' depends on the model's shift: pass jdiff.schedulers.FlowMatchLevels(shift=...) "
                     "(jdiff.load(...).generate builds it from the model's config)")
  if spacing == "karras":
    finite = jnp.isfinite(schedule.sigmas)
    sigma_max = jnp.max(jnp.where(finite, schedule.sigmas, 0.0))
    sigmas = karras_sigmas(sigma_min=schedule.sigmas[0], sigma_max=sigma_max, steps=steps)
    return sigmas, sigma_to_t(schedule, sigmas)
  ts = timesteps(num_timesteps=schedule.num_timesteps, steps=steps, spacing=spacing)
  return schedule.sigmas[ts], jnp.asarray(ts, jnp.float32)


class Levels(NamedTuple):
  """The noise levels of one sampling run of n steps: arrays [n], and two scalars.

  Step i evaluates the model at sigmas[i] (timestep ts[i]) and moves x to targets[i]; targets[-1] is where the
  run ends (0: the data). Where a target is not the next level (diffusers' DDIM steps to t - T // n whatever the
  timesteps), x keeps its variance-preserving value x_t and takes the next level. x starts as noise * init_scale
  in the variance-exploding scale (noise itself where sigmas[0] is infinite), and the run returns x * final_scale.
  multistep[i]: whether step i may use earlier evaluations (multistep samplers).
  """
  sigmas: jnp.ndarray
  ts: jnp.ndarray
  targets: jnp.ndarray
  multistep: jnp.ndarray
  init_scale: jnp.ndarray
  final_scale: jnp.ndarray


def sampling_levels(schedule: Schedule, *, steps: int, spacing, lower_order_final: bool = False) -> Levels:
  """The Levels of `steps` steps: a spacing name (see `noise_levels`) ends at sigma 0 from noise in the
  variance-preserving scale; any other spacing is a rule with a `levels(schedule, steps) -> Levels` method, such as
  jdiff.schedulers' diffusers scheduler conventions. lower_order_final makes the last step between nonzero levels
  first order."""
  if isinstance(spacing, str):
    sigmas, ts = noise_levels(schedule, steps=steps, spacing=spacing)
    levels = Levels(sigmas=sigmas, ts=ts, targets=jnp.concatenate([sigmas[1:], jnp.zeros(1)]),
                    multistep=jnp.arange(steps) > 0, init_scale=jnp.sqrt(1.0 + sigmas[0] ** 2),
                    final_scale=jnp.float32(1.0))
  else:
    levels = spacing.levels(schedule, steps)
  if lower_order_final:
    n = levels.sigmas.shape[0]
    last = jnp.where(levels.targets[-1] > 0, n - 1, n - 2)
    levels = levels._replace(multistep=levels.multistep & (jnp.arange(n) != last))
  return levels


class Level(NamedTuple):
  """What one step reads. Stacked over steps, it is the sequence the loop scans."""
  i: jnp.ndarray
  sigma: jnp.ndarray  # where the model is evaluated; infinite only on the first step (zero terminal SNR)
  sigma_next: jnp.ndarray  # where the step lands: 0 on the last step unless the levels say otherwise
  sigma_prev: jnp.ndarray  # the level before sigma (sigma itself on the first step)
  t: jnp.ndarray
  t_next: jnp.ndarray  # the timestep at sigma_next
  multistep: jnp.ndarray  # whether multistep samplers may use earlier evaluations
  relabel: jnp.ndarray  # x's factor from sigma_next to the next step's sigma, keeping x_t (1 where they agree)


def _steps(schedule: Schedule, levels: Levels) -> Level:
  sigmas, ts, targets = levels.sigmas, levels.ts, levels.targets
  relabel = jnp.sqrt((1.0 + sigmas[1:] ** 2) / (1.0 + targets[:-1] ** 2))
  return Level(i=jnp.arange(sigmas.shape[0]), sigma=sigmas, sigma_next=targets,
               sigma_prev=jnp.concatenate([sigmas[:1], sigmas[:-1]]), t=ts,
               t_next=jnp.concatenate([ts[1:], sigma_to_t(schedule, targets[-1:])]),
               multistep=levels.multistep, relabel=jnp.concatenate([relabel, jnp.ones(1)]))


# Shared helpers. Every step is written as the first-order landing m + sigma_next * d plus corrections, with m the
# denoised estimate and d the slope (x - m) / sigma: that form stays finite from an infinite sigma (where x itself
# is not) and to sigma 0.

def _ancestral_sigmas(sigma, sigma_next, eta):
  """(sigma_down, sigma_up): DDIM's eta-scaled posterior noise sigma_up, and the level to move to before adding it."""
  sigma_up = jnp.minimum(sigma_next, eta * sigma_next * jnp.sqrt(1.0 - (sigma_next / sigma) ** 2))
  # Clamped: where sigma_up == sigma_next, a fused multiply-add can leave a tiny negative under the root.
  return jnp.sqrt(jnp.maximum(sigma_next**2 - sigma_up**2, 0.0)), sigma_up


def _slope(m, m_prev, s: Level):
  """(m - m_prev) / r, with r the previous step over this one in log sigma; 0 on first-order steps and on a last
  step to sigma 0 (where r is 0)."""
  h = jnp.log(s.sigma / s.sigma_next)
  second = s.multistep & (s.sigma_next > 0)
  r = jnp.where(second, jnp.log(s.sigma_prev / s.sigma) / h, 1.0)
  return jnp.where(second, (m - m_prev) / r, 0.0)


def _scan(step, carry, levels):
  """The compiled loop: carry = step(carry, level) over the stacked levels, carry[0] being x."""
  def body(c, s):
    c = step(c, s)
    return (c[0] * s.relabel,) + tuple(c[1:]), None
  return jax.lax.scan(body, carry, levels)[0]


# Samplers: each maps x at levels.sigma[0] to x at the last target, calling denoise(x, sigma, t) -> (x0, slope).

def ancestral(denoise, x, levels, *, eta, noise, **_):
  """DDIM with eta (Song et al., 2021): eta 0 is Euler, eta 1 is DDPM's posterior step and Euler ancestral."""
  def step(carry, s):
    m, d = denoise(carry[0], s.sigma, s.t)
    sigma_down, sigma_up = _ancestral_sigmas(s.sigma, s.sigma_next, eta)
    return (m + sigma_down * d + sigma_up * noise(s.i),)
  return _scan(step, (x,), levels)[0]


def heun(denoise, x, levels, **_):
  """Heun's second-order method on the probability-flow ODE (Karras et al., 2022, Algorithm 1): Euler's step to
  sigma 0, and from an infinite sigma, where the trapezoid has no finite width."""
  def step(carry, s):
    x = carry[0]
    m, d = denoise(x, s.sigma, s.t)
    x_euler = m + s.sigma_next * d

    def trapezoid():
      d_next = denoise(x_euler, s.sigma_next, s.t_next)[1]
      return x + (s.sigma_next - s.sigma) * (d + d_next) / 2
    return (jax.lax.cond((s.sigma_next > 0) & jnp.isfinite(s.sigma), trapezoid, lambda: x_euler),)
  return _scan(step, (x,), levels)[0]


def dpmpp_2m(denoise, x, levels, *, eta, noise, **_):
  """DPM-Solver++(2M) (Lu et al., 2022); with eta > 0 its SDE variant with the midpoint correction."""
  def step(carry, s):
    x, m_prev = carry
    m, d = denoise(x, s.sigma, s.t)
    h = jnp.log(s.sigma / s.sigma_next)
    damping = jnp.exp(-jnp.where(eta > 0, eta * h, 0.0))  # e^(-eta h), written so eta 0 stays 1 where h is infinite
    ratio = s.sigma_next / s.sigma * damping
    x = m + (1.0 - ratio) * _slope(m, m_prev, s) / 2 + s.sigma_next * damping * d
    spread = jnp.where(eta > 0, jnp.sqrt(-jnp.expm1(-2.0 * eta * h)), 0.0)
    return x + s.sigma_next * spread * noise(s.i), m
  return _scan(step, (x, jnp.zeros_like(x)), levels)[0]


def _unic(landing, m, m_prev, m_next, s: Level):
  """UniC, bh2 (Zhao et al., 2023): the step from s.sigma, whose first-order landing was `landing`, redone with the
  evaluation m_next at its end."""
  ratio = s.sigma_next / s.sigma
  h = -jnp.log(ratio)
  phi = (1.0 - ratio) / h - 1.0
  b1 = phi / (ratio - 1.0)
  b2 = (2.0 * phi / -h - 1.0) / (ratio - 1.0)
  r = jnp.where(s.multistep, jnp.log(s.sigma_prev / s.sigma) / h, 1.0)
  rho_prev = jnp.where(s.multistep, (b1 - b2) / (1.0 + r), 0.0)
  rho_next = jnp.where(s.multistep, b1 - rho_prev, 0.5)
  return landing + (1.0 - ratio) * (rho_prev * _slope(m, m_prev, s) + rho_next * (m_next - m))


def unipc(denoise, x, levels, **_):
  """UniPC, bh2, order 2: a DPM-Solver++(2M) predictor and the UniC corrector, which costs no extra evaluation."""
  def step(carry, s):
    x, m_prev, m_prev2, landing_prev, s_prev = carry
    m, d = denoise(x, s.sigma, s.t)
    x = jnp.where(s.i > 0, _unic(landing_prev, m_prev, m_prev2, m, s_prev), x)
    # From the corrected x; on the first step, whose sigma may be infinite, x is uncorrected and the slope is d.
    landing = m + jnp.where(s.i > 0, s.sigma_next / s.sigma * (x - m), s.sigma_next * d)
    return landing + (1.0 - s.sigma_next / s.sigma) * _slope(m, m_prev, s) / 2, m, m_prev, landing, s
  zeros = jnp.zeros_like(x)
  first = jax.tree.map(lambda a: a[0], levels)
  return _scan(step, (x, zeros, zeros, zeros, first), levels)[0]


def lms(denoise, x, levels, **_):
  """Linear multistep of order 4 in sigma: integrates the Lagrange polynomial through the last four slopes, the
  last step included (to sigma 0, as k-diffusion and diffusers do). A slope at an infinite sigma takes no part."""
  nodes, weights = np.polynomial.legendre.leggauss(3)  # exact for the cubic Lagrange polynomials
  def step(carry, s):
    x, slopes, sigmas = carry
    m, d = denoise(x, s.sigma, s.t)
    slopes = jnp.concatenate([d[None], slopes[:-1]])
    sigmas = jnp.concatenate([s.sigma[None], sigmas[:-1]])
    used = (jnp.arange(4) < jnp.where(s.multistep, jnp.minimum(s.i + 1, 4), 1)) & jnp.isfinite(sigmas)
    taus = s.sigma + (s.sigma_next - s.sigma) * (nodes + 1) / 2
    pairs = used[None, :] & ~np.eye(4, dtype=bool)  # [j, k]: node k enters node j's polynomial
    gaps = jnp.where(pairs, sigmas[:, None] - sigmas[None, :], 1.0)
    factors = jnp.where(pairs[..., None], (taus - sigmas[None, :, None]) / gaps[..., None], 1.0)
    coeffs = jnp.where(used, jnp.prod(factors, axis=1) @ weights * (s.sigma_next - s.sigma) / 2, 0.0)
    # The coefficients sum to sigma_next - sigma, so x + sum_k c_k d_k is the landing plus the slopes' differences.
    return m + s.sigma_next * d + jnp.tensordot(coeffs[1:], slopes[1:] - d, 1), slopes, sigmas
  return _scan(step, (x, jnp.zeros((4,) + x.shape), jnp.ones(4)), levels)[0]


_ADAMS_BASHFORTH = ((1.0,), (1.5, -0.5), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def plms(denoise, x, levels, *, prediction, **_):
  """Pseudo linear multistep (PLMS, Liu et al., 2022) as diffusers' PNDMScheduler with skip_prk_steps: Adams-Bashforth
  of order up to 4 with equal-step weights on the model's outputs (v for v-prediction, else the noise), each step
  DDIM's; the first averages the outputs at both of its ends (two evaluations), Euler's from an infinite sigma."""
  def output(x, m, d, sigma):
    """What PLMS combines: the noise d, or v = (d - sigma m) / sqrt(1 + sigma^2) (-m at an infinite sigma)."""
    if prediction != "v":
      return d
    return jnp.where(jnp.isfinite(sigma), (d - sigma * m) / jnp.sqrt(1.0 + sigma**2), -m)

  def noise_of(out, x, sigma):
    if prediction != "v":
      return out
    scale = jnp.sqrt(1.0 + sigma**2)
    return out / scale + sigma * x / scale**2

  n = levels.i.shape[0]
  def step(carry, s):
    x, history = carry
    m, d = denoise(x, s.sigma, s.t)
    out = output(x, m, d, s.sigma)
    x_euler = m + s.sigma_next * d

    def averaged():
      m_end, d_end = denoise(x_euler, s.sigma_next, s.t_next)
      return (out + output(x_euler, m_end, d_end, s.sigma_next)) / 2
    outs = jnp.concatenate([out[None], history])
    order = jnp.minimum(s.i, 3)
    weights = jnp.asarray([w + (0.0,) * (4 - len(w)) for w in _ADAMS_BASHFORTH])[order]
    combined = jax.lax.cond((s.i == 0) & (n > 1) & jnp.isfinite(s.sigma), averaged,
                            lambda: jnp.tensordot(weights, outs, 1))
    x = jnp.where(jnp.isfinite(s.sigma), x + (s.sigma_next - s.sigma) * noise_of(combined, x, s.sigma), x_euler)
    return x, outs[:-1]
  return _scan(step, (x, jnp.zeros((3,) + x.shape)), levels)[0]


def flow_euler(denoise, x, levels, **_):
  """diffusers' FlowMatchEulerDiscreteScheduler step on the flow's own scale x_s = x / (1 + sigma) (x itself at an
  infinite sigma): x_s + (s_next - s) v with the velocity v = eps - x0 and s = sigma / (1 + sigma). For any
  denoiser it lands where DDIM at eta 0 does, up to rounding."""
  def step(carry, s):
    x = carry[0]
    m, d = denoise(x, s.sigma, s.t)
    level, level_next = flow.s_of(s.sigma), flow.s_of(s.sigma_next)
    x_s = jnp.where(jnp.isfinite(s.sigma), x / (1.0 + s.sigma), x)
    return ((x_s + (level_next - level) * (d - m)) * (1.0 + s.sigma_next),)
  return _scan(step, (x,), levels)[0]


# Latent consistency models (Luo et al., 2023), as diffusers' LCMScheduler samples them.

def lcm_timesteps(*, num_timesteps: int, steps: int, original_steps: int = 50) -> np.ndarray:
  """LCMScheduler's descending timesteps: `steps` evenly spaced indices into the distillation solver's skipping
  grid k - 1, 2k - 1, ..., T - 1 (k = T // original_steps) read from its end."""
  if not 1 <= steps <= original_steps <= num_timesteps:
    raise ValueError(f"lcm sampling needs 1 <= steps ({steps}) <= original_steps ({original_steps}) <= "
                     f"num_timesteps ({num_timesteps})")
  k = num_timesteps // original_steps
  grid = (np.arange(1, original_steps + 1) * k - 1)[::-1]
  return grid[np.floor(np.linspace(0, original_steps, steps, endpoint=False)).astype(np.int64)].astype(np.int32)


def consistency_scalings(t, timestep_scaling: float, sigma_data: float = 0.5):
  """(c_skip, c_out) of the consistency parameterisation f = c_skip x_t + c_out x0 at timestep t: c_skip -> 1 and
  c_out -> 0 at t = 0 (the boundary condition), sharpened by timestep_scaling (LCM's 10)."""
  scaled = jnp.asarray(t, jnp.float32) * timestep_scaling
  return sigma_data**2 / (scaled**2 + sigma_data**2), scaled / jnp.sqrt(scaled**2 + sigma_data**2)


@dataclasses.dataclass(frozen=True)
class LCMSpacing:
  """The levels and boundary condition of the 'lcm' sampler: a spacing rule (see `sampling_levels`) of
  lcm_timesteps, the last step landing on the data, and the consistency model's timestep_scaling."""
  original_steps: int = 50
  timestep_scaling: float = 10.0

  def levels(self, schedule: Schedule, steps: int) -> Levels:
    ts = lcm_timesteps(num_timesteps=schedule.num_timesteps, steps=steps, original_steps=self.original_steps)
    sigmas = schedule.sigmas[ts]
    return Levels(sigmas=sigmas, ts=jnp.asarray(ts, jnp.float32), targets=jnp.concatenate([sigmas[1:], jnp.zeros(1)]),
                  multistep=jnp.zeros(steps, bool), init_scale=jnp.sqrt(1.0 + sigmas[0] ** 2),
                  final_scale=jnp.float32(1.0))


def lcm(denoise, x, levels, *, noise, consistency: LCMSpacing, **_):
  """Multistep consistency sampling: at each level the consistency function f = c_skip x_t + c_out x0 (x_t in
  the variance-preserving scale) estimates the data, and fresh noise takes it to the next level; the last step
  returns f."""
  def step(carry, s):
    x = carry[0]
    m, _ = denoise(x, s.sigma, s.t)
    c_skip, c_out = consistency_scalings(s.t, consistency.timestep_scaling)
    x_t = jnp.where(jnp.isfinite(s.sigma), x / jnp.sqrt(1.0 + s.sigma**2), x)
    return (c_out * m + c_skip * x_t + s.sigma_next * noise(s.i),)
  return _scan(step, (x,), levels)[0]


_SAMPLER_FNS = {"ddpm": ancestral, "ddim": ancestral, "euler": ancestral, "euler_ancestral": ancestral,
                "heun": heun, "dpmpp_2m": dpmpp_2m, "dpmpp_2m_sde": dpmpp_2m, "unipc": unipc, "lms": lms,
                "plms": plms, "flow_euler": flow_euler, "lcm": lcm}


# The loop.

def _flow_denoiser(model_fn, cond, *, clip_x0, num_timesteps):
  """A flow model's denoise(x, sigma, t): the model reads x_s = x / (1 + sigma) at time s * num_timesteps (its
  own clock: t is unused) and predicts the velocity v; x0 = x_s - s v. At an infinite sigma x is x_s itself."""
  def denoise(x, sigma, t):
    finite = jnp.isfinite(sigma)
    s = flow.s_of(sigma)
    x_s = jnp.where(finite, x / (1.0 + sigma), x)
    v = model_fn(x_s, jnp.full((x.shape[0],), s * num_timesteps, jnp.float32), cond).astype(jnp.float32)
    x0 = flow.x0_from_velocity(x_s, v, s)
    if clip_x0:
      x0 = jnp.clip(x0, -1.0, 1.0)
    eps = (x_s - (1.0 - s) * x0) / s
    return x0, jnp.where(finite, (x - x0) / sigma, eps)
  return denoise


def _denoiser(model_fn, cond, *, prediction, clip_x0, num_timesteps=1000):
  """denoise(x, sigma, t) -> (x0, (x - x0) / sigma) in fp32, calling the model on x_t = x sqrt(abar) with t
  broadcast to [B]. Where sigma is infinite (pure noise), x is x_t itself and the slope is the noise estimate.
  A flow model is called on its own scale (`_flow_denoiser`)."""
  if prediction == "flow":
    return _flow_denoiser(model_fn, cond, clip_x0=clip_x0, num_timesteps=num_timesteps)
  def denoise(x, sigma, t):
    finite = jnp.isfinite(sigma)
    alpha_bar = 1.0 / (1.0 + sigma**2)
    x_t = jnp.where(finite, x * jnp.sqrt(alpha_bar), x)
    pred = model_fn(x_t, jnp.full((x.shape[0],), t, jnp.float32), cond)
    x0, eps = diffusion.to_x0_eps(pred, x_t=x_t, alpha_bar=alpha_bar, prediction=prediction)
    if clip_x0:
      x0 = jnp.clip(x0, -1.0, 1.0)
      eps = diffusion.eps_from_x0(x_t=x_t, x0=x0, alpha_bar=alpha_bar)
    return x0, jnp.where(finite, (x - x0) / sigma, eps)
  return denoise


def _example_keys(rng, batch: int):
  if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)
  return rng if rng.ndim == 1 else jax.random.split(rng, batch)


def _step_noise(rng, shape):
  """noise(i): step i's standard normals, example b's drawn from fold_in(keys[b], i) alone."""
  if rng is None:
    return lambda i: jnp.zeros(shape, jnp.float32)
  keys = _example_keys(rng, shape[0])
  return lambda i: jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), shape[1:]))(keys)


def _check(schedule, *, sampler, steps, spacing, prediction):
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
  if isinstance(spacing, str) and spacing not in SPACINGS:
    raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
  if not isinstance(spacing, str) and not callable(getattr(spacing, "levels", None)):
    raise ValueError(f"spacing {spacing!r} is neither one of {', '.join(SPACINGS)} nor a rule with a levels method")
  if prediction not in diffusion.MODEL_PREDICTIONS:
    raise ValueError(f"unknown prediction {prediction!r}; choose one of "
                     f"{', '.join(diffusion.MODEL_PREDICTIONS)}")
  if not 1 <= steps <= schedule.num_timesteps:
    raise ValueError(f"steps must be in [1, {schedule.num_timesteps}], got {steps}")


def _eta_and_rng(sampler: str, eta, rng):
  if eta is None or sampler not in TUNABLE_ETA:
    eta = DEFAULT_ETA.get(sampler, 0.0)
  if isinstance(eta, (int, float)) and eta == 0:
    rng = None  # nothing to draw: keeps random number generation out of the compiled loop
  elif rng is None and sampler in DEFAULT_ETA:
    raise ValueError(f"sampler {sampler!r} with eta={eta} injects noise: pass rng")
  return eta, rng


def sample(model_fn, schedule: Schedule, noise, cond=None, *, sampler: str = "ddim", steps: int = 50,
           prediction: str = "eps", rng=None, eta=None, spacing="trailing", clip_x0: bool = True,
           lower_order_final: bool = False):
  """Samples from standard-normal `noise` [B, ...], in one compiled loop: x0, or x_t where the levels end above 0.

  sampler: one of SAMPLERS. eta: None for the sampler's default (DEFAULT_ETA; 0 where absent); only the samplers
    in TUNABLE_ETA read it (ddpm always uses 1), and it may be traced. rng: a key, or one key per example [B],
    needed when the noise injected is nonzero; per-example keys make example b depend on its own key alone.
  spacing: 'leading', 'trailing' or 'linspace' timesteps (see `timesteps`), or 'karras' sigmas (rho 7); or a rule
    with a `levels(schedule, steps) -> Levels` method, such as jdiff.schedulers' diffusers conventions.
  clip_x0: clip each predicted x0 to [-1, 1], as diffusers' DDPM/DDIM clip_sample does by default for pixel
    models; pass False for latents or data outside [-1, 1].
  lower_order_final: multistep samplers take their last step between nonzero levels at first order.
  sampler 'lcm' (a consistency model's): spacing is an LCMSpacing; a spacing name takes LCMSpacing's defaults.
  Traced: noise, cond, rng, eta, schedule. Static: everything else, including model_fn (hashed by identity).
  """
  if sampler == "lcm" and not isinstance(spacing, LCMSpacing):
    spacing = LCMSpacing()  # a spacing name: LCMScheduler's defaults
  _check(schedule, sampler=sampler, steps=steps, spacing=spacing, prediction=prediction)
  eta, rng = _eta_and_rng(sampler, eta, rng)
  return _sample(model_fn, schedule, noise, cond, rng, eta, sampler=sampler, steps=steps,
                 prediction=prediction, spacing=spacing, clip_x0=clip_x0,
                 lower_order_final=lower_order_final)


@functools.partial(jax.jit, static_argnums=0, static_argnames=(
    "sampler", "steps", "prediction", "spacing", "clip_x0", "lower_order_final"))
def _sample(model_fn, schedule, noise, cond, rng, eta, *, sampler, steps, prediction, spacing,
            clip_x0, lower_order_final):
  levels = sampling_levels(schedule, steps=steps, spacing=spacing, lower_order_final=lower_order_final)
  return _run(model_fn, schedule, levels, noise, cond, rng, eta, sampler=sampler, prediction=prediction,
              clip_x0=clip_x0, consistency=spacing if sampler == "lcm" else None)


def sample_levels(model_fn, schedule: Schedule, levels: Levels, noise, cond=None, *, sampler: str,
                  prediction: str = "eps", rng=None, eta=None, clip_x0: bool = True):
  """`sample` over given Levels, which may be traced (`sample` is this with its spacing's levels); not compiled
  here: jit it, levels as an argument, to run many level sequences of one length through one program."""
  _check(schedule, sampler=sampler, steps=1, spacing="trailing", prediction=prediction)
  eta, rng = _eta_and_rng(sampler, eta, rng)
  return _run(model_fn, schedule, levels, noise, cond, rng, eta, sampler=sampler, prediction=prediction,
              clip_x0=clip_x0)


def _run(model_fn, schedule, levels, noise, cond, rng, eta, *, sampler, prediction, clip_x0, consistency=None):
  denoise = _denoiser(model_fn, cond, prediction=prediction, clip_x0=clip_x0, num_timesteps=schedule.num_timesteps)
  noise = noise.astype(jnp.float32)
  x = jnp.where(jnp.isinf(levels.sigmas[0]), noise, noise * levels.init_scale)
  x = _SAMPLER_FNS[sampler](denoise, x, _steps(schedule, levels), eta=jnp.asarray(eta, jnp.float32),
                            noise=_step_noise(rng, x.shape), prediction=prediction, consistency=consistency)
  return x * levels.final_scale


# Guidance.

def _per_example(value, ndim):
  value = jnp.asarray(value, jnp.float32)
  return value.reshape(value.shape + (1,) * (ndim - value.ndim))


def guided_model_fn(model_fn, *, guidance_scale, uncond, guidance_rescale=0.0):
  """Classifier-free guidance: a model_fn running the conditional and unconditional halves as one batch.

  pred = uncond + guidance_scale * (cond - uncond) on the model's own output (eps, x0 or v), in fp32. uncond is
  the null condition, a pytree like cond that broadcasts against it (a negative condition here gives negative
  prompting). guidance_rescale phi blends in the guided prediction rescaled to the conditional one's per-example
  standard deviation (Lin et al., 2023). guidance_scale and guidance_rescale may be traced, scalars or [B].
  """
  def guided(x, t, cond):
    if cond is None:
      raise ValueError("classifier-free guidance needs a condition; got cond=None")
    both = jax.tree.map(lambda c, u: jnp.concatenate([c, jnp.broadcast_to(u, c.shape).astype(c.dtype)]),
                        cond, uncond)
    pred = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both).astype(jnp.float32)
    pred_cond, pred_uncond = jnp.split(pred, 2)
    out = pred_uncond + _per_example(guidance_scale, x.ndim) * (pred_cond - pred_uncond)
    axes = tuple(range(1, x.ndim))
    rescaled = out * jnp.std(pred_cond, axis=axes, keepdims=True) / jnp.std(out, axis=axes, keepdims=True)
    phi = _per_example(guidance_rescale, x.ndim)
    # where, not a blend, so a constant prediction (std 0) stays finite when phi is 0.
    return jnp.where(phi > 0, phi * rescaled + (1.0 - phi) * out, out)
  return guided


# Seeds, interpolation, inversion.

def keys_from_seeds(seeds) -> jax.Array:
  """One PRNG key per seed, [B]: pass as `rng` so each example's sampling noise depends on its seed alone."""
  return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))


def noise_from_seeds(seeds, shape) -> jnp.ndarray:
  """Initial noise [len(seeds), *shape]; row b depends on seeds[b] alone, so it is the same in any batch."""
  return jax.vmap(lambda k: jax.random.normal(k, tuple(shape)))(keys_from_seeds(seeds))


def slerp(a, b, frac):
  """Spherical interpolation, treating a and b as single vectors: frac 0 gives a, 1 gives b."""
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  cos = jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b))
  theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0))
  parallel = jnp.sin(theta) < 1e-6
  sin = jnp.where(parallel, 1.0, jnp.sin(theta))
  w_a = jnp.where(parallel, 1.0 - frac, jnp.sin((1.0 - frac) * theta) / sin)
  w_b = jnp.where(parallel, frac, jnp.sin(frac * theta) / sin)
  return w_a * a + w_b * b


def _lerp(a, b, fracs):
  """Per frame: linear interpolation of float conditions; other kinds (labels) switch from a to b halfway."""
  a, b = jnp.asarray(a), jnp.asarray(b)
  f = fracs.reshape(fracs.shape + (1,) * a.ndim)
  if jnp.issubdtype(a.dtype, jnp.floating):
    return (1.0 - f) * a + f * b
  return jnp.where(f < 0.5, a, b)


def interpolate(model_fn, schedule: Schedule, noise_a, noise_b, cond_a=None, cond_b=None, *, num_frames: int,
                **sample_kwargs):
  """num_frames samples along slerp(noise_a, noise_b) and lerp(cond_a, cond_b), sampled in one call at eta 0.

  noise_a, noise_b and the conditions are single examples (no batch dimension); the result is [num_frames, ...].
  Pass a deterministic sampler (any but ddpm) for a smooth sequence.
  """
  fracs = jnp.linspace(0.0, 1.0, num_frames)
  noise = jax.vmap(lambda f: slerp(noise_a, noise_b, f))(fracs)
  cond = None if cond_a is None else jax.tree.map(lambda a, b: _lerp(a, b, fracs), cond_a, cond_b)
  return sample(model_fn, schedule, noise, cond, eta=0.0, **sample_kwargs)


def ddim_invert(model_fn, schedule: Schedule, x0, cond=None, *, steps: int = 50, prediction: str = "eps",
                spacing="trailing", clip_x0: bool = True, refine: int = 0):
  """The initial noise that sample(..., sampler='ddim', eta=0) with the same settings decodes into x0.

  Runs the probability-flow ODE backwards through DDIM's levels with Euler steps, each evaluated at the point
  and level it starts from (the first, from sigma 0, at the level it goes to). That is exact where the ODE is
  linear in sigma (high noise), unlike diffusers' DDIMInverseScheduler, which evaluates at the level it goes to
  and loses the noise's scale for schedules reaching large sigma (see tests). The reconstruction error is
  first order in the step size. refine > 0 adds that many fixed-point iterations per step (one model
  evaluation each) solving for the point DDIM's step maps onto x: nearly exact once the steps are not too big.
  """
  _check(schedule, sampler="ddim", steps=steps, spacing=spacing, prediction=prediction)
  return _invert(model_fn, schedule, x0, cond, steps=steps, prediction=prediction,
                 spacing=spacing, clip_x0=clip_x0, refine=refine)


@functools.partial(jax.jit, static_argnums=0, static_argnames=(
    "steps", "prediction", "spacing", "clip_x0", "refine"))
def _invert(model_fn, schedule, x0, cond, *, steps, prediction, spacing, clip_x0, refine):
  levels = sampling_levels(schedule, steps=steps, spacing=spacing)
  sigmas, ts = levels.sigmas, levels.ts
  denoise = _denoiser(model_fn, cond, prediction=prediction, clip_x0=clip_x0, num_timesteps=schedule.num_timesteps)
  slope = lambda x, sigma, t: denoise(x, sigma, t)[1]

  def step(x, level):
    sigma_from, t_from, sigma, t = level
    first = sigma_from == 0
    land = lambda d: jnp.where(jnp.isinf(sigma), d, x + (sigma - sigma_from) * d)  # x_t itself at infinite sigma
    y = land(slope(x, jnp.where(first, sigma, sigma_from), jnp.where(first, t, t_from)))
    return jax.lax.fori_loop(0, refine, lambda _, y: land(slope(y, sigma, t)), y), None

  up_sigmas, up_ts = sigmas[::-1], ts[::-1]
  levels = (jnp.concatenate([jnp.zeros(1), up_sigmas[:-1]]), jnp.concatenate([up_ts[:1], up_ts[:-1]]),
            up_sigmas, up_ts)
  x = jax.lax.scan(step, x0.astype(jnp.float32), levels)[0]
  return jnp.where(jnp.isinf(sigmas[0]), x, x / jnp.sqrt(1.0 + sigmas[0] ** 2))
