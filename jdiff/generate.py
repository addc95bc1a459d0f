"""Sampling from a trained U-Net: one compiled program per (model, sampler, steps, spacing, shape).

Noise, seeds, labels, guidance scale and rescale, and eta are traced, so changing them does not recompile;
the sampler name, step count, spacing and image shape are static.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jdiff import samplers, sharding
from jdiff.models.layers import guidance_embedding
from jdiff.models.text import TextEncoder, TextToImageUNet
from jdiff.models.unet import UNet
from jdiff.schedules import Schedule


def unet_model_fn(model: UNet | TextToImageUNet, params):
  """Adapts a U-Net to the samplers' `model_fn(x, t, cond)`, cond being class labels, token ids or None."""
  return lambda x, t, cond: model.apply({"params": params}, x, t, cond)


@functools.partial(jax.jit, static_argnames=("model", "prediction", "sampler", "steps", "spacing", "guided",
                                             "clip_x0"))
def _sample_unet(params, schedule: Schedule, noise, keys, labels, uncond, guidance_scale, guidance_rescale, eta, *,
                 model: UNet, prediction: str, sampler: str, steps: int, spacing: str, guided: bool,
                 clip_x0: bool):
  model_fn = unet_model_fn(model, params)
  extra = {}
  if model.config.time_cond_proj_dim:  # a consistency model distilled with guidance takes its scale as an input
    extra["timestep_cond"] = jnp.broadcast_to(guidance_embedding(guidance_scale[None], model.config.time_cond_proj_dim),
                                              (noise.shape[0], model.config.time_cond_proj_dim))
    model_fn = lambda x, t, cond: model.apply({"params": params}, x, t, cond, **extra)
  if isinstance(model, TextToImageUNet):  # the prompts' hidden states once, not at every step
    labels, uncond = text_context(model, params, labels), text_context(model, params, jnp.atleast_2d(uncond))
    unet = UNet(model.config, remat=model.remat)
    model_fn = lambda x, t, context: unet.apply({"params": params["unet"]}, x, t, context=context, **extra)
  if guided:
    model_fn = samplers.guided_model_fn(model_fn, guidance_scale=guidance_scale, uncond=uncond,
                                        guidance_rescale=guidance_rescale)
  return samplers.sample(model_fn, schedule, noise, labels, sampler=sampler, steps=steps,
                         prediction=prediction, rng=keys, eta=eta, spacing=spacing, clip_x0=clip_x0)


def text_context(model: TextToImageUNet, params, ids):
  """The text encoder's hidden states [B, L, width] of token ids [B, L]: what the U-Net cross-attends to."""
  return TextEncoder(model.text).apply({"params": params["text_encoder"]}, ids)


def spread_batch(params, *batch_arrays):
  """The arrays split along their batch axis over the devices that hold `params`, when params are replicated on
  several (jdiff.load's, and train.py's without FSDP) and the batch divides evenly: one sampling call then runs
  on all of them. Otherwise the arrays as they are."""
  held = getattr(jax.tree_util.tree_leaves(params)[0], "sharding", None)
  if held is None or len(held.device_set) < 2 or not held.is_fully_replicated:
    return batch_arrays
  if len(batch_arrays[0]) % len(held.device_set):
    return batch_arrays
  split = sharding.over_devices(sorted(held.device_set, key=lambda d: d.id), jax.sharding.PartitionSpec("batch"))
  return tuple(jax.device_put(a, split) for a in batch_arrays)


def sample_unet(model: UNet, params, schedule: Schedule, noise, keys, *, labels=None, negative_labels=None,
                prediction: str = "eps", sampler: str = "ddim", steps: int = 50, spacing: str = "trailing",
                guidance_scale: float = 1.0, guidance_rescale: float = 0.0, eta: float | None = None,
                clip_x0: bool = True):
  """Samples (images in [-1, 1], or latents) from initial noise [B, H, W, C] and per-example keys [B] for
  stochastic samplers. clip_x0: clip each denoised estimate to [-1, 1]; right for pixels, wrong for latents.

  For a class-conditional model, guidance steers from `negative_labels` (default: the null class, i.e.
  classifier-free guidance) toward `labels` (default: all null, i.e. unconditional samples).
  For a text model (TextToImageUNet), labels are the prompts' token ids [B, L] and negative_labels the negative
  prompt's, [L] or [B, L]: the empty prompt's for classifier-free guidance.
  """
  eta = samplers.DEFAULT_ETA.get(sampler, 0.0) if eta is None else eta
  noise, keys = spread_batch(params, noise, keys)
  if isinstance(model, TextToImageUNet):
    if labels is None or negative_labels is None:
      raise ValueError("a text model samples from prompt token ids (labels) and the negative or empty prompt's "
                       "(negative_labels)")
    return _sample_unet(params, schedule, noise, keys, jnp.asarray(labels, jnp.int32),
                        jnp.asarray(negative_labels, jnp.int32), jnp.float32(guidance_scale),
                        jnp.float32(guidance_rescale), jnp.float32(eta), model=model, prediction=prediction,
                        sampler=sampler, steps=steps, spacing=spacing,
                        guided=guidance_scale != 1.0 and not model.config.time_cond_proj_dim, clip_x0=clip_x0)
  num_classes = model.config.num_classes
  if num_classes:
    null = jnp.full((noise.shape[0],), num_classes, jnp.int32)
    labels = null if labels is None else jnp.asarray(labels, jnp.int32)
    uncond = null if negative_labels is None else jnp.asarray(negative_labels, jnp.int32)
  else:
    labels = uncond = None
  guided = (bool(num_classes) and (guidance_scale != 1.0 or negative_labels is not None)
            and not model.config.time_cond_proj_dim)
  return _sample_unet(params, schedule, noise, keys, labels, uncond, jnp.float32(guidance_scale),
                      jnp.float32(guidance_rescale), jnp.float32(eta), model=model, prediction=prediction,
                      sampler=sampler, steps=steps, spacing=spacing, guided=guided, clip_x0=clip_x0)


@functools.partial(jax.jit, static_argnames=("model", "prediction", "steps", "spacing", "refine", "clip_x0"))
def invert_unet(params, schedule: Schedule, x0, labels, *, model: UNet, prediction: str, steps: int,
                spacing: str = "trailing", refine: int = 0, clip_x0: bool = True):
  """DDIM inversion of x0 (images in [-1, 1], or latents) into the initial noise that 'ddim' at eta 0 with the same
  clip_x0 decodes back to them."""
  return samplers.ddim_invert(unet_model_fn(model, params), schedule, x0, labels, steps=steps,
                              prediction=prediction, spacing=spacing, refine=refine, clip_x0=clip_x0)


def seeded_noise(shape, seeds):
  """(initial noise [B, *shape], sampler keys [B]): row i depends on seeds[i] alone."""
  return samplers.noise_from_seeds(seeds, tuple(shape)), samplers.keys_from_seeds(seeds)


def interpolation_noise(seed_a: int, seed_b: int, num_frames: int, shape) -> jnp.ndarray:
  """[num_frames, *shape] initial noises along the great circle from seed_a's noise to seed_b's."""
  ends = samplers.noise_from_seeds(jnp.array([seed_a, seed_b]), shape)
  return jax.vmap(lambda f: samplers.slerp(ends[0], ends[1], f))(jnp.linspace(0.0, 1.0, num_frames))
