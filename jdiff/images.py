"""Images as jdiff hands them out: the uint8 <-> [-1, 1] maps, grids and PNG files (numpy and PIL only)."""
from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def uint8_to_model_range(images: np.ndarray) -> np.ndarray:
  """uint8 0..255 -> float32 -1..1, the range a pixel diffusion model sees."""
  return np.asarray(images).astype(np.float32) / 127.5 - 1.0


def model_range_to_uint8(images) -> np.ndarray:
  """float -1..1 (e.g. a sampler's output) -> uint8 0..255, clipping what lies outside."""
  scaled = (np.asarray(images, dtype=np.float32) + 1.0) * 127.5
  return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


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


def to_pil(image: np.ndarray, min_size: int = 0) -> Image.Image:
  """A uint8 [H, W, C] image as PIL, upscaled by an integer factor (nearest) to at least min_size pixels."""
  scale = max(1, math.ceil(min_size / max(image.shape[:2])))
  image = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def save_png(image: np.ndarray, path: str, min_size: int = 256) -> None:
  """Writes a uint8 [H, W, C] image, upscaled by an integer factor (nearest) so small grids stay visible."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  to_pil(image, min_size).save(path)



def read_png(path: str, *, grayscale: bool = False) -> np.ndarray:
  """An 8-bit PNG (or other image PIL reads) as uint8 [H, W, C]: C = 1 for a grayscale file, 3 for a colour one
  (alpha and palettes dropped); grayscale=True reads every file as one channel. Raises ValueError naming the file
  and the fix if it cannot be read so."""
  try:
    with Image.open(path) as image:
      image.load()
  except (OSError, ValueError) as error:
    raise ValueError(f"cannot read {path!r} as an image ({' '.join(str(error).split())}): give a PNG file") from None
  if image.mode in ("I", "I;16", "F"):
    raise ValueError(f"{path!r} has {image.mode} pixels, not 8-bit ones: save it as an 8-bit grayscale or RGB PNG")
  if grayscale or image.mode in ("1", "L", "LA"):
    return np.asarray(image.convert("L"), np.uint8)[..., None]
  return np.asarray(image.convert("RGB"), np.uint8)
