"""Prompt adherence on `shapes`: a pixel-level detector of a picture's colour and shape, and the accuracy of samples.

The detector needs no training. The background is the median of the border pixels; each pixel's coverage by the
shape is its colour distance from the background over the largest such distance (pixels under a fifth of it count
as background). The colour is the nearest of the dataset's six colours to the mean of the fully covered pixels
(coverage above 0.75). The shape is read from two numbers. A triangle pointing up puts its mass low: the skewness of
the coverage's row profile is -0.57 for it and 0 for a circle or square, and below SKEW_THRESHOLD reads as a
triangle. Otherwise the fill of its own extent tells a square (1) from a circle (pi/4): area / (width * height),
where the area is the summed coverage, the width the largest row sum and the height the largest column sum. Sums of
coverage, not thresholded masks, keep this right at 16x16, where anti-aliased edges are a good part of a shape.
A picture whose largest distance from the background is under MIN_CONTRAST shows no shape, and counts as wrong for
both.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jdiff.data import shapes

MIN_CONTRAST = 60.0
BACKGROUND_SHARE = 0.2
CORE_COVERAGE = 0.75
SKEW_THRESHOLD = -0.25
FILL_THRESHOLD = 0.89  # square above, circle below


@dataclasses.dataclass(frozen=True)
class Detections:
  colour: np.ndarray  # int [N], index into shapes.COLOURS, -1 where no shape was found
  shape: np.ndarray  # int [N], index into shapes.SHAPES, -1 where no shape was found
  fill: np.ndarray  # float [N], area / (width * height)
  skew: np.ndarray  # float [N], skewness of the row profile (down is positive)


def detect(images: np.ndarray) -> Detections:
  """Colour and shape of each uint8 image [N, S, S, 3] of one shape on a plain background."""
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected uint8 RGB images [N, S, S, 3], got {images.dtype} {images.shape}")
  pixels = images.astype(np.float32)
  border = np.concatenate([pixels[:, 0], pixels[:, -1], pixels[:, 1:-1, 0], pixels[:, 1:-1, -1]], axis=1)
  background = np.median(border, axis=1)  # [N, 3]
  distance = np.linalg.norm(pixels - background[:, None, None], axis=-1)  # [N, S, S]
  contrast = distance.max(axis=(1, 2))
  coverage = np.clip(distance / np.maximum(contrast, 1e-6)[:, None, None], 0, 1)
  coverage = np.where(coverage < BACKGROUND_SHARE, 0.0, coverage)
  core = coverage > CORE_COVERAGE
  mean_colour = (pixels * core[..., None]).sum(axis=(1, 2)) / np.maximum(core.sum(axis=(1, 2)), 1)[:, None]
  colour = np.argmin(np.linalg.norm(mean_colour[:, None] - shapes.RGB[None], axis=-1), axis=1)
  area = coverage.sum(axis=(1, 2))
  width, height = coverage.sum(axis=2).max(axis=1), coverage.sum(axis=1).max(axis=1)
  fill = area / np.maximum(width * height, 1e-6)
  skew = row_skewness(coverage.sum(axis=2))
  shape = np.where(skew < SKEW_THRESHOLD, shapes.SHAPES.index("triangle"),
                   np.where(fill > FILL_THRESHOLD, shapes.SHAPES.index("square"), shapes.SHAPES.index("circle")))
  found = contrast >= MIN_CONTRAST
  return Detections(colour=np.where(found, colour, -1), shape=np.where(found, shape, -1), fill=fill, skew=skew)


def row_skewness(profile: np.ndarray) -> np.ndarray:
  """Skewness [N] of row profiles [N, S] as distributions over the row index."""
  weights = profile / np.maximum(profile.sum(axis=1, keepdims=True), 1e-6)
  rows = np.arange(profile.shape[1], dtype=np.float64)
  mean = (weights * rows).sum(axis=1, keepdims=True)
  variance = (weights * (rows - mean)**2).sum(axis=1)
  return (weights * (rows - mean)**3).sum(axis=1) / np.maximum(variance, 1e-6)**1.5


def accuracy(images: np.ndarray, colour: np.ndarray, shape: np.ndarray) -> dict[str, float]:
  """Shares of images whose detected colour, shape, and both, are the intended ones (int arrays [N])."""
  found = detect(images)
  colour_ok, shape_ok = found.colour == np.asarray(colour), found.shape == np.asarray(shape)
  return {"colour": float(colour_ok.mean()), "shape": float(shape_ok.mean()),
          "both": float((colour_ok & shape_ok).mean())}
