"""Sampling from a trained U-Net: one compiled program per (model, sampler, steps, spacing, shape).

Noise, seeds, labels, guidance scale and rescale, and eta are traced, so changing them does not recompile;
the sampler name, step count, spacing and image shape are static.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jdiff import editing, samplers, sharding
from jdiff.models.controlnet import ControlNet
from jdiff.models.layers import guidance_embedding
from jdiff.models.text import TextEncoder, TextToImageUNet
from jdiff.models.unet import UNet
from jdiff.schedules import Schedule


def unet_model_fn(model: UNet | TextToImageUNet, params):
  """Adapts a U-Net to the samplers' `model_fn(x, t, cond)`, cond being class labels, token ids or None."""
  return lambda x, t, cond: model.apply({"params": params}, x, t, cond)


def controlled_model_fn(model: UNet | TextToImageUNet, params, controlnet: ControlNet, control_params, control,
                        scale):
  """`model_fn(x, t, cond)` of a U-Net steered by a ControlNet with control images [B, ...] (cond: class labels or
  a text model's context). Under guidance x holds the conditional and the unconditional halves: both see the
  control image, as in diffusers' StableDiffusionControlNetPipeline (guess_mode=False)."""
  text = isinstance(model, TextToImageUNet)
  unet = UNet(model.config, remat=model.remat) if text else model
  unet_params = params["unet"] if text else params

  def model_fn(x, t, cond):
    image = jnp.tile(control, (x.shape[0] // control.shape[0], 1, 1, 1))
    labels, context = (None, cond) if text else (cond, None)
    residuals = controlnet.apply({"params": control_params}, x, t, image, labels, context=context, scale=scale)
    return unet.apply({"params": unet_params}, x, t, labels, context=context, residuals=residuals)
  return model_fn


@functools.partial(jax.jit, static_argnames=("model", "prediction", "sampler", "steps", "spacing", "guided",
                                             "clip_x0", "controlnet"))
def _sample_unet(params, schedule: Schedule, noise, keys, labels, uncond, guidance_scale, guidance_rescale, eta,
                 control=None, control_params=None, control_scale=None, *, model: UNet, prediction: str,
                 sampler: str, steps: int, spacing: str, guided: bool, clip_x0: bool,
                 controlnet: ControlNet | None = None):
  model_fn, labels = _conditioned(model, params, labels, uncond, guidance_scale, guidance_rescale, guided,
                                  (controlnet, control_params, control, control_scale))
  return samplers.sample(model_fn, schedule, noise, labels, sampler=sampler, steps=steps,
                         prediction=prediction, rng=keys, eta=eta, spacing=spacing, clip_x0=clip_x0)


def _conditioned(model, params, labels, uncond, guidance_scale, guidance_rescale, guided: bool,
                 control=(None, None, None, None)):
  """(model_fn, cond): the U-Net as the samplers call it, steered by a ControlNet if `control` (controlnet, its
  params, control images, scale) names one, guided if asked, and the condition it takes."""
  timestep_cond = lambda x: {}
  if model.config.time_cond_proj_dim:  # a consistency model distilled with guidance takes its scale as an input
    dim = model.config.time_cond_proj_dim
    embedding = guidance_embedding(guidance_scale[None], dim)
    timestep_cond = lambda x: {"timestep_cond": jnp.broadcast_to(embedding, (x.shape[0], dim))}
  model_fn = lambda x, t, cond: model.apply({"params": params}, x, t, cond, **timestep_cond(x))
  if isinstance(model, TextToImageUNet):  # the prompts' hidden states once, not at every step
    labels, uncond = text_context(model, params, labels), text_context(model, params, jnp.atleast_2d(uncond))
    unet = UNet(model.config, remat=model.remat)
    model_fn = lambda x, t, context: unet.apply({"params": params["unet"]}, x, t, context=context,
                                                **timestep_cond(x))
  controlnet, control_params, images, scale = control
  if controlnet is not None:
    model_fn = controlled_model_fn(model, params, controlnet, control_params, images, scale)
  if guided:
    model_fn = samplers.guided_model_fn(model_fn, guidance_scale=guidance_scale, uncond=uncond,
                                        guidance_rescale=guidance_rescale)
  return model_fn, labels


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
                clip_x0: bool = True, controlnet: ControlNet | None = None, control_params=None, control=None,
                control_scale: float = 1.0):
  """Samples (images in [-1, 1], or latents) from initial noise [B, H, W, C] and per-example keys [B] for
  stochastic samplers. clip_x0: clip each denoised estimate to [-1, 1]; right for pixels, wrong for latents.

  For a class-conditional model, guidance steers from `negative_labels` (default: the null class, i.e.
  classifier-free guidance) toward `labels` (default: all null, i.e. unconditional samples).
  For a text model (TextToImageUNet), labels are the prompts' token ids [B, L] and negative_labels the negative
  prompt's, [L] or [B, L]: the empty prompt's for classifier-free guidance.
  A `controlnet` with its `control_params` steers the U-Net with `control` images [B, ...] in [0, 1], its
  residuals multiplied by control_scale (traced).
  """
  eta = samplers.DEFAULT_ETA.get(sampler, 0.0) if eta is None else eta
  noise, keys = spread_batch(params, noise, keys)
  labels, uncond, guided = _conditions(model, len(noise), labels, negative_labels, guidance_scale)
  controls = ()
  if controlnet is not None:
    controls = (jnp.asarray(control, jnp.float32), control_params, jnp.float32(control_scale))
  return _sample_unet(params, schedule, noise, keys, labels, uncond, jnp.float32(guidance_scale),
                      jnp.float32(guidance_rescale), jnp.float32(eta), *controls, model=model, prediction=prediction,
                      sampler=sampler, steps=steps, spacing=spacing, guided=guided, clip_x0=clip_x0,
                      controlnet=controlnet)


def _conditions(model, batch: int, labels, negative_labels, guidance_scale):
  """(labels, uncond, guided): the condition and null condition arrays sample_unet documents, and whether to guide
  (never for a model that takes the guidance scale as an input: one evaluation per step)."""
  scale_input = bool(model.config.time_cond_proj_dim)
  if isinstance(model, TextToImageUNet):
    if labels is None or negative_labels is None:
      raise ValueError("a text model samples from prompt token ids (labels) and the negative or empty prompt's "
                       "(negative_labels)")
    guided = guidance_scale != 1.0 and not scale_input
    return jnp.asarray(labels, jnp.int32), jnp.asarray(negative_labels, jnp.int32), guided
  num_classes = model.config.num_classes
  if not num_classes:
    return None, None, False
  null = jnp.full((batch,), num_classes, jnp.int32)
  guided = (guidance_scale != 1.0 or negative_labels is not None) and not scale_input
  return (null if labels is None else jnp.asarray(labels, jnp.int32),
          null if negative_labels is None else jnp.asarray(negative_labels, jnp.int32), guided)


@functools.partial(jax.jit, static_argnames=("model", "prediction", "sampler", "steps", "spacing", "guided",
                                             "clip_x0", "strength", "resample_jumps", "resample_rounds"))
def _edit_unet(params, schedule: Schedule, x0, noise, mask, keys, labels, uncond, guidance_scale, guidance_rescale,
               eta, *, model, prediction, sampler, steps, spacing, guided, clip_x0, strength, resample_jumps,
               resample_rounds):
  model_fn, labels = _conditioned(model, params, labels, uncond, guidance_scale, guidance_rescale, guided)
  return editing.edit(model_fn, schedule, x0, noise, labels, mask=mask, strength=strength, sampler=sampler,
                      steps=steps, prediction=prediction, rng=keys, eta=eta, spacing=spacing, clip_x0=clip_x0,
                      resample_jumps=resample_jumps, resample_rounds=resample_rounds)


def edit_unet(model: UNet, params, schedule: Schedule, x0, noise, keys, *, mask=None, strength: float = 1.0,
              resample_jumps: int = 0, resample_rounds: int = 0, labels=None, negative_labels=None,
              prediction: str = "eps", sampler: str = "ddim", steps: int = 50, spacing: str = "trailing",
              guidance_scale: float = 1.0, guidance_rescale: float = 0.0, eta: float | None = None,
              clip_x0: bool = True):
  """jdiff.editing.edit with a U-Net: x0 (images in [-1, 1], or latents) [B, H, W, C] edited from `noise` like it,
  per-example keys [B], and a mask [B, H, W, 1] (1: regenerate) for inpainting; conditions as sample_unet."""
  eta = samplers.DEFAULT_ETA.get(sampler, 0.0) if eta is None else eta
  x0, noise, keys = spread_batch(params, x0, noise, keys)
  labels, uncond, guided = _conditions(model, len(noise), labels, negative_labels, guidance_scale)
  return _edit_unet(params, schedule, x0, noise, mask, keys, labels, uncond, jnp.float32(guidance_scale),
                    jnp.float32(guidance_rescale), jnp.float32(eta), model=model, prediction=prediction,
                    sampler=sampler, steps=steps, spacing=spacing, guided=guided, clip_x0=clip_x0,
                    strength=float(strength), resample_jumps=resample_jumps, resample_rounds=resample_rounds)


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


def concat_model_fn(unet: UNet, params):
  """The samplers' `model_fn(x, t, cond)` of a U-Net conditioned through its input channels: cond is
  {"image": the condition [B, H, W, cond_channels], "labels": class labels, a text context [B, M, D], or None},
  and the U-Net sees [x, cond["image"]] along the channels."""
  def model_fn(x, t, cond):
    inputs = jnp.concatenate([x, cond["image"].astype(x.dtype)], axis=-1)
    if unet.config.context_dim:
      return unet.apply({"params": params}, inputs, t, context=cond["labels"])
    return unet.apply({"params": params}, inputs, t, cond["labels"])
  return model_fn


@functools.partial(jax.jit, static_argnames=("model", "prediction", "sampler", "steps", "spacing", "guided",
                                             "clip_x0"))
def _sample_conditioned(params, schedule: Schedule, noise, keys, image_cond, labels, uncond, guidance_scale,
                        guidance_rescale, eta, *, model: UNet | TextToImageUNet, prediction: str, sampler: str,
                        steps: int, spacing: str, guided: bool, clip_x0: bool):
  unet, unet_params = model, params
  if isinstance(model, TextToImageUNet):
    labels, uncond = text_context(model, params, labels), text_context(model, params, jnp.atleast_2d(uncond))
    unet, unet_params = UNet(model.config, remat=model.remat), params["unet"]
  model_fn = concat_model_fn(unet, unet_params)
  if guided:  # both halves see the same image condition: one batch of 2B
    model_fn = samplers.guided_model_fn(model_fn, guidance_scale=guidance_scale,
                                        uncond={"image": image_cond, "labels": uncond},
                                        guidance_rescale=guidance_rescale)
  return samplers.sample(model_fn, schedule, noise, {"image": image_cond, "labels": labels}, sampler=sampler,
                         steps=steps, prediction=prediction, rng=keys, eta=eta, spacing=spacing, clip_x0=clip_x0)


def sample_conditioned(model: UNet | TextToImageUNet, params, schedule: Schedule, noise, keys, image_cond, *,
                       labels=None, negative_labels=None, prediction: str = "eps", sampler: str = "ddim",
                       steps: int = 50, spacing: str = "trailing", guidance_scale: float = 1.0,
                       guidance_rescale: float = 0.0, eta: float | None = None, clip_x0: bool = True):
  """`sample_unet` for a U-Net whose input is [x, condition]: image_cond [B, H, W, cond_channels] (a low-resolution
  image upsampled, or a mask and masked image) is fixed for the whole run and fed at every step, to both halves of
  classifier-free guidance. labels and negative_labels as in `sample_unet`."""
  eta = samplers.DEFAULT_ETA.get(sampler, 0.0) if eta is None else eta
  expected = noise.shape[:3] + (model.config.cond_channels,)
  if tuple(image_cond.shape) != expected:
    raise ValueError(f"the image condition must be {list(expected)} for this U-Net, got {list(image_cond.shape)}")
  noise, keys, image_cond = spread_batch(params, noise, keys, jnp.asarray(image_cond, jnp.float32))
  if isinstance(model, TextToImageUNet):
    if labels is None or negative_labels is None:
      raise ValueError("a text model samples from prompt token ids (labels) and the negative or empty prompt's "
                       "(negative_labels)")
    labels, uncond = jnp.asarray(labels, jnp.int32), jnp.asarray(negative_labels, jnp.int32)
    guided = guidance_scale != 1.0
  elif model.config.num_classes:
    null = jnp.full((noise.shape[0],), model.config.num_classes, jnp.int32)
    labels = null if labels is None else jnp.asarray(labels, jnp.int32)
    uncond = null if negative_labels is None else jnp.asarray(negative_labels, jnp.int32)
    guided = guidance_scale != 1.0 or negative_labels is not None
  else:
    labels = uncond = None
    guided = False
  return _sample_conditioned(params, schedule, noise, keys, image_cond, labels, uncond, jnp.float32(guidance_scale),
                             jnp.float32(guidance_rescale), jnp.float32(eta), model=model, prediction=prediction,
                             sampler=sampler, steps=steps, spacing=spacing, guided=guided, clip_x0=clip_x0)
