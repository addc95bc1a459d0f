"""Editing that starts from an image: img2img (SDEdit), training-free inpainting and, through it, outpainting.

No Flax here, as in jdiff/samplers.py, whose samplers and noise levels this reuses. Every sampler runs unchanged:

- img2img with strength s runs the last int(steps * s) steps of the `steps`-step run (diffusers' convention) from
  the data x0 noised to the first of them, x = x0 + sigma * noise in the variance-exploding scale (x_t itself,
  the noise, where sigma is infinite). That run's first step is first order: it has no earlier evaluations.
- Inpainting (mask 1 = regenerate) replaces the known region by the data noised to the level the model is
  evaluated at, x0 + sigma * noise with the *same* noise throughout (diffusers' 4-channel inpainting), before every
  model evaluation, and pastes x0 into the known region of the result: that region of the output is x0 itself. A
  sampler's update is elementwise given the model's outputs, so replacing inside the denoiser is the same, for the
  unknown region, as replacing the sampler's state. At full strength the unknown region starts from pure noise, as
  diffusers' inpainting pipeline does; below it, from x0 noised like img2img.
- RePaint's resampling (Lugmayr et al., 2022): the run is cut into segments of `jumps` steps; after each segment
  x is noised back to the segment's first level (fresh noise, as the forward process does) and the segment is
  sampled again, `rounds` more times, which lets the unknown region agree with the known one across the seam.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jdiff import samplers
from jdiff.samplers import (  # the samplers' building blocks, shared rather than copied
    _SAMPLER_FNS, _check, _denoiser, _eta_and_rng, _example_keys, _step_noise, _steps)
from jdiff.schedules import Schedule


def start_step(steps: int, strength: float) -> int:
  """The first of `steps` steps that img2img at `strength` runs: steps - int(steps * strength), as diffusers'
  img2img (only the last int(steps * strength) run; none at strength 0)."""
  if not 0.0 <= strength <= 1.0:
    raise ValueError(f"strength={strength} must be in [0, 1] (0 keeps the image, 1 regenerates it from noise)")
  return steps - min(int(steps * strength), steps)


def _segment(level: samplers.Level) -> samplers.Level:
  """Steps cut out of a run as a run of their own: counted from 0, the first one first order."""
  n = level.i.shape[0]
  return level._replace(i=jnp.arange(n), multistep=level.multistep.at[0].set(False),
                        sigma_prev=level.sigma_prev.at[0].set(level.sigma[0]))


def _replacing(denoise, x0, noise, mask):
  """denoise with the known region (mask 0) of x set to x0 noised to the level evaluated at."""
  def replaced(x, sigma, t):
    known = jnp.where(jnp.isinf(sigma), noise, x0 + sigma * noise)
    return denoise(mask * x + (1.0 - mask) * known, sigma, t)
  return replaced


def _keys(rng, batch: int, tag):
  """Per-example keys [B] of rng (a key or [B] keys), each folded with tag."""
  keys = _example_keys(rng, batch)
  return jax.vmap(lambda k: jax.random.fold_in(k, tag))(keys)


def edit(model_fn, schedule: Schedule, x0, noise, cond=None, *, mask=None, strength: float = 1.0,
         sampler: str = "ddim", steps: int = 50, prediction: str = "eps", rng=None, eta=None, spacing="trailing",
         clip_x0: bool = True, resample_jumps: int = 0, resample_rounds: int = 0):
  """x0 [B, ...] edited in one compiled loop: img2img where mask is None, else inpainting of mask's 1s.

  x0: the data (images in [-1, 1], or latents); noise: standard normals like x0, both the start's noise and the
    known region's. mask: None, or [B, ...] broadcasting against x0, 1 where to regenerate, 0 where to keep x0
    (soft values blend). strength: in [0, 1], see `start_step`; at 0 the result is x0.
  resample_jumps, resample_rounds: RePaint's jump length n and how many times r each segment is sampled again
    (0: none); resampling draws fresh noise and needs rng.
  Everything else as jdiff.samplers.sample; rng also draws the resampling noise.
  """
  if sampler == "lcm" and not isinstance(spacing, samplers.LCMSpacing):
    spacing = samplers.LCMSpacing()  # a spacing name: LCMScheduler's defaults, as in jdiff.samplers.sample
  _check(schedule, sampler=sampler, steps=steps, spacing=spacing, prediction=prediction)
  start = start_step(steps, strength)
  if resample_jumps < 0 or resample_rounds < 0:
    raise ValueError(f"resample_jumps={resample_jumps} and resample_rounds={resample_rounds} must be >= 0")
  resample = resample_rounds > 0 and resample_jumps > 0
  if resample and mask is None:
    raise ValueError("resampling harmonises an inpainted region with the known one: pass a mask")
  if resample and rng is None:
    raise ValueError("resampling draws fresh noise: pass rng")
  eta, step_rng = _eta_and_rng(sampler, eta, rng)
  if start == steps:
    return jnp.asarray(x0, jnp.float32)
  return _edit(model_fn, schedule, x0, noise, mask, cond, rng if resample else step_rng, eta, sampler=sampler,
               steps=steps, start=start, prediction=prediction, spacing=spacing, clip_x0=clip_x0,
               jumps=resample_jumps if resample else 0, rounds=resample_rounds if resample else 0)


@functools.partial(jax.jit, static_argnums=0, static_argnames=(
    "sampler", "steps", "start", "prediction", "spacing", "clip_x0", "jumps", "rounds"))
def _edit(model_fn, schedule, x0, noise, mask, cond, rng, eta, *, sampler, steps, start, prediction, spacing,
          clip_x0, jumps, rounds):
  levels = samplers.sampling_levels(schedule, steps=steps, spacing=spacing)
  run = jax.tree.map(lambda a: a[start:], _steps(schedule, levels))
  x0, noise = jnp.asarray(x0, jnp.float32), jnp.asarray(noise, jnp.float32)
  denoise = _denoiser(model_fn, cond, prediction=prediction, clip_x0=clip_x0, num_timesteps=schedule.num_timesteps)
  sigma = levels.sigmas[start]
  x = jnp.where(jnp.isinf(sigma), noise, x0 + sigma * noise)
  if mask is not None:
    mask = jnp.asarray(mask, jnp.float32)
    fresh = jnp.where(jnp.isinf(sigma), noise, noise * levels.init_scale) if start == 0 else x
    x = mask * fresh + (1.0 - mask) * x
    denoise = _replacing(denoise, x0, noise, mask)
  sample_fn = functools.partial(_SAMPLER_FNS[sampler], denoise, eta=jnp.asarray(eta, jnp.float32),
                                prediction=prediction, consistency=spacing if sampler == "lcm" else None)
  if rounds:
    ends = jnp.concatenate([levels.sigmas, levels.targets[-1:]])[start:]
    x = _resampled(sample_fn, x, run, ends, rng, jumps=jumps, rounds=rounds)
  else:
    x = sample_fn(x, _segment(run), noise=_step_noise(rng, x.shape))
  if mask is not None:
    last = levels.targets[-1]
    x = mask * x + (1.0 - mask) * (x0 + last * noise)
  return x * levels.final_scale


def _resampled(sample_fn, x, run: samplers.Level, ends, rng, *, jumps: int, rounds: int):
  """The run in segments of `jumps` steps (the last may be shorter), each sampled 1 + rounds times, x noised back
  to the segment's first level in between. ends[k]: the level x is at before step k (ends[-1]: after the run)."""
  n = run.i.shape[0]
  batch = x.shape[0]

  def segment(x, first: int, size: int, tag):
    part = _segment(jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, first, size), run))
    top, end = ends[first], ends[first + size]

    def one_pass(r, x):
      tags = 2 * (tag * (rounds + 1) + r)
      z = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:]))(_keys(rng, batch, tags + 1))
      lift = jnp.where(jnp.isinf(top), z, x + jnp.sqrt(jnp.maximum(top**2 - end**2, 0.0)) * z)
      x = jnp.where(r > 0, lift, x)
      return sample_fn(x, part, noise=_step_noise(_keys(rng, batch, tags), x.shape))
    return jax.lax.fori_loop(0, rounds + 1, one_pass, x)

  whole, rest = divmod(n, jumps)
  if whole:
    x = jax.lax.fori_loop(0, whole, lambda k, x: segment(x, k * jumps, jumps, k), x)
  if rest:
    x = segment(x, whole * jumps, rest, whole)
  return x
