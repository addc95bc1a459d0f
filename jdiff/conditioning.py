"""Image conditioning through concatenated input channels: what a U-Net sees beside the noisy x.

A conditioned U-Net's input is [x_t, condition] along the channel axis (UNetConfig.cond_channels extra channels);
its output has x_t's channels. The condition is fixed for a whole sampling run; classifier-free guidance runs the
conditional and unconditional halves with the same condition, dropping only the label or prompt.

- Super-resolution (SR3, Saharia et al. 2021): the condition is the low-resolution image upsampled to the output
  size (bicubic by default). Training makes each low-resolution image from its high-resolution one by averaging
  `scale` x `scale` blocks and rounding to 8 bits, as a low-resolution PNG holds it.
- Inpainting, Stable Diffusion's layout: [mask (1 channel, 1 = fill in), the image with the masked pixels set to 0
  (mid-grey in [-1, 1])]. A latent model takes the mask at the latent size (nearest) and the masked image's latents.

Everything here is jnp on arrays in the model's range [-1, 1], NHWC.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("none", "super_resolution", "inpainting")
UPSAMPLING = ("bicubic", "nearest")
HALVES = ("left", "right", "top", "bottom")


def cond_channels(kind: str, image_channels: int) -> int:
  """How many channels the condition of `kind` adds to images of `image_channels` channels."""
  return {"none": 0, "super_resolution": image_channels, "inpainting": image_channels + 1}[kind]


def downsample(images: jax.Array, scale: int) -> jax.Array:
  """[B, H, W, C] -> [B, H / scale, W / scale, C]: the mean of each scale x scale block."""
  b, h, w, c = images.shape
  if h % scale or w % scale:
    raise ValueError(f"images of {h}x{w} cannot be downsampled by {scale}: the sides must be multiples of it")
  return images.reshape(b, h // scale, scale, w // scale, scale, c).mean(axis=(2, 4))


def quantize(images: jax.Array) -> jax.Array:
  """Images in [-1, 1] rounded to the nearest of the 256 values a uint8 image can hold."""
  return jnp.round((jnp.clip(images, -1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0


def upsample(images: jax.Array, height: int, width: int, method: str = "bicubic") -> jax.Array:
  """[B, h, w, C] -> [B, height, width, C] by jax.image.resize: 'bicubic' is Keys' cubic (a = -0.5) on half-pixel
  centres, 'nearest' repeats pixels."""
  if method not in UPSAMPLING:
    raise ValueError(f"upsampling method {method!r}: choose one of {', '.join(UPSAMPLING)}")
  b, _, _, c = images.shape
  resized = jax.image.resize(images.astype(jnp.float32), (b, height, width, c), "cubic" if method == "bicubic"
                             else "nearest")
  return jnp.clip(resized, -1.0, 1.0)


def low_resolution(images: jax.Array, scale: int) -> jax.Array:
  """What training pairs with each high-resolution image: its block means, rounded to 8 bits."""
  return quantize(downsample(images, scale))


def super_resolution_condition(low: jax.Array, height: int, width: int, method: str = "bicubic") -> jax.Array:
  """The condition of a super-resolution U-Net: the low-resolution images upsampled to the output size."""
  return upsample(low, height, width, method)


def masked(images: jax.Array, mask: jax.Array) -> jax.Array:
  """The images with the pixels to fill in (mask >= 0.5) set to 0, as Stable Diffusion's inpainting pipeline does."""
  return images * (mask < 0.5).astype(images.dtype)


def inpainting_condition(images: jax.Array, mask: jax.Array) -> jax.Array:
  """[mask, masked image]: the condition of a pixel inpainting U-Net; mask [B, H, W, 1], 1 = fill in."""
  mask = (mask >= 0.5).astype(jnp.float32)
  return jnp.concatenate([mask, masked(images.astype(jnp.float32), mask)], axis=-1)


def mask_to_latent_size(mask: jax.Array, factor: int) -> jax.Array:
  """A pixel mask [B, H, W, 1] at the latents' size, as torch's nearest interpolation picks: each block's top-left
  pixel."""
  return mask[:, ::factor, ::factor, :]


def half_mask(side: str, height: int, width: int) -> np.ndarray:
  """float32 [height, width, 1] with 1 on the `side` half ('left', 'right', 'top' or 'bottom'): the part to fill."""
  if side not in HALVES:
    raise ValueError(f"side {side!r}: choose one of {', '.join(HALVES)}")
  rows, cols = np.mgrid[:height, :width]
  fill = {"left": cols < width // 2, "right": cols >= width // 2, "top": rows < height // 2,
          "bottom": rows >= height // 2}[side]
  return fill[..., None].astype(np.float32)
