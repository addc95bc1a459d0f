"""Sampling from a trained U-Net: one compiled program per (model, sampler, steps, shape), PNG grids.

Seeds, labels, guidance scale and eta are traced, so changing them does not recompile; the sampler name,
step count and image shape are static.
"""
from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from jdiff import samplers
from jdiff.models.unet import UNet
from jdiff.schedules import Schedule


def unet_model_fn(model: UNet, params):
  """Adapts a U-Net to the samplers' `model_fn(x, t, cond)`, cond being class labels or None."""
  return lambda x, t, cond: model.apply({"params": params}, x, t, cond)


@functools.partial(jax.jit, static_argnames=("model", "prediction", "sampler", "num_steps", "guided"))
def _generate(params, schedule: Schedule, seeds, labels, guidance_scale, eta, *, model: UNet, prediction: str,
              sampler: str, num_steps: int, guided: bool):
  mc = model.config
  noise = samplers.noise_from_seeds(seeds, (mc.image_size, mc.image_size, mc.in_channels))
  model_fn = unet_model_fn(model, params)
  if guided:
    null = jnp.full_like(labels, mc.num_classes)
    model_fn = samplers.guided_model_fn(model_fn, guidance_scale=guidance_scale, uncond=null)
  return samplers.sample(model_fn, schedule, noise, labels, sampler=sampler, num_steps=num_steps,
                         parameterisation=prediction, rng=samplers.keys_from_seeds(seeds), eta=eta)


def generate(model: UNet, params, schedule: Schedule, *, seeds, labels=None, prediction: str = "eps",
             sampler: str = "ddim", num_steps: int = 50, guidance_scale: float = 1.0, eta: float = 0.0):
  """Images in [-1, 1], one per seed. Image i depends only on seeds[i] and labels[i], not on the batch."""
  seeds = jnp.asarray(seeds, jnp.uint32)
  conditional = model.config.num_classes > 0
  if conditional and labels is None:
    labels = jnp.full(seeds.shape, model.config.num_classes, jnp.int32)
  if labels is not None:
    labels = jnp.asarray(labels, jnp.int32)
  guided = conditional and guidance_scale != 1.0
  return _generate(params, schedule, seeds, labels, jnp.float32(guidance_scale), jnp.float32(eta),
                   model=model, prediction=prediction, sampler=sampler, num_steps=num_steps, guided=guided)


def make_grid(images: np.ndarray, columns: int | None = None, pad: int = 2) -> np.ndarray:
  """Tiles uint8 images [N, H, W, C] into one [rows*(H+pad)+pad, cols*(W+pad)+pad, C] image."""
  n, h, w, c = images.shape
  columns = columns or math.ceil(math.sqrt(n))
  rows = math.ceil(n / columns)
  grid = np.zeros((rows * (h + pad) + pad, columns * (w + pad) + pad, c), np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = image
  return grid


def save_png(image: np.ndarray, path: str, min_size: int = 256) -> None:
  """Writes a uint8 [H, W, C] image, upscaled by an integer factor (nearest) so small grids stay visible."""
  scale = max(1, math.ceil(min_size / max(image.shape[:2])))
  image = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
