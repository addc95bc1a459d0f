"""A shape the `shapes` dataset never shows, for DreamBooth: crosses (plus signs) drawn like its shapes, and a detector
that tells a cross from its circles, squares and triangles and reads its colour and place.

A cross whose arms are CROSS_ARM of its extent wide covers 5/9 of its bounding box, where a circle covers pi/4 and a
square all of it; a triangle covers half of its box too, but puts its mass low. The detector reads the shapes
detector's numbers (jdiff.metrics.shapes: coverage sums, robust at 16x16): a fill under FILL_THRESHOLD with a row
profile no more skewed than a circle's reads as a cross. The colour is the shapes detector's; the place is the nearest
of the dataset's five centres to the coverage's centroid.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jdiff.data import shapes
from jdiff.metrics import shapes as shape_metrics

CROSS_ARM = 1 / 3
FILL_THRESHOLD = 0.67  # crosses 0.52-0.57, circles from 0.77 (at 16 and 32 pixels)


def cross_polygon(centre: tuple[float, float], half: float) -> np.ndarray:
  """The 12 vertices [12, 2], as (row, column), of a plus sign of half-extent `half`."""
  a, b = half, half * CROSS_ARM
  corners = [(-a, -b), (-a, b), (-b, b), (-b, a), (b, a), (b, b), (a, b), (a, -b), (b, -b), (b, -a), (-b, -a),
             (-b, -b)]
  return np.array(corners) + np.array(centre)


def inside(polygon: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
  """Even-odd rule: whether each point (rows, cols) lies inside the polygon."""
  result = np.zeros(rows.shape, bool)
  for (r0, c0), (r1, c1) in zip(polygon, np.roll(polygon, -1, axis=0)):
    crosses = (r0 > rows) != (r1 > rows)
    at = c0 + (rows - r0) * (c1 - c0) / np.where(r1 == r0, 1e-12, r1 - r0)
    result ^= crosses & (cols < at)
  return result


def draw_crosses(num: int, seed: int, colour: int | None = None, position: int | None = None,
                 image_size: int = shapes.IMAGE_SIZE) -> dict[str, np.ndarray]:
  """`num` images of one large cross each on the dataset's dark background, with its jitter and 4x4 supersampling:
  {"image": uint8 [N, S, S, 3], "colour", "position": int [N]}. colour / position None draw them at random."""
  rng = np.random.default_rng(seed)
  colours = rng.integers(len(shapes.COLOURS), size=num) if colour is None else np.full(num, colour)
  positions = rng.integers(len(shapes.POSITIONS), size=num) if position is None else np.full(num, position)
  sub = image_size * shapes.SUPERSAMPLING
  grid = (np.arange(sub) + 0.5) / sub
  rows, cols = np.meshgrid(grid, grid, indexing="ij")
  out = np.zeros((num, image_size, image_size, 3), np.uint8)
  for i in range(num):
    half = shapes.HALF_EXTENT[1] * (1 + rng.uniform(-shapes.SIZE_JITTER, shapes.SIZE_JITTER))
    centre = np.array(shapes.CENTRES[positions[i]]) + rng.uniform(-shapes.POSITION_JITTER, shapes.POSITION_JITTER, 2)
    centre = np.clip(centre, half, 1 - half)
    mask = inside(cross_polygon(tuple(centre), half), rows, cols).astype(np.float32)
    cover = mask.reshape(image_size, shapes.SUPERSAMPLING, image_size, shapes.SUPERSAMPLING).mean(axis=(1, 3))
    rgb = np.clip(shapes.RGB[colours[i]] + rng.uniform(-shapes.COLOUR_JITTER, shapes.COLOUR_JITTER, 3), 0, 255)
    background = rng.uniform(*shapes.BACKGROUND_LEVELS)
    out[i] = np.round(background + cover[..., None] * (rgb - background)).astype(np.uint8)
  return {"image": out, "colour": colours, "position": positions}


@dataclasses.dataclass(frozen=True)
class CrossDetections:
  cross: np.ndarray  # bool [N]
  colour: np.ndarray  # int [N], index into shapes.COLOURS, -1 where no shape was found
  position: np.ndarray  # int [N], index into shapes.POSITIONS, -1 where no shape was found


def detect_crosses(images: np.ndarray) -> CrossDetections:
  """Whether each uint8 image [N, S, S, 3] shows a cross, and the colour and place of its shape."""
  images = np.asarray(images)
  found = shape_metrics.detect(images)
  pixels = images.astype(np.float32)
  border = np.concatenate([pixels[:, 0], pixels[:, -1], pixels[:, 1:-1, 0], pixels[:, 1:-1, -1]], axis=1)
  distance = np.linalg.norm(pixels - np.median(border, axis=1)[:, None, None], axis=-1)
  cover = distance / np.maximum(distance.max(axis=(1, 2)), 1e-6)[:, None, None]
  cover = np.where(cover < shape_metrics.BACKGROUND_SHARE, 0.0, cover)
  grid = (np.arange(images.shape[1]) + 0.5) / images.shape[1]
  centroid = np.stack([cover.sum(axis=2) @ grid, cover.sum(axis=1) @ grid], axis=1)
  centroid = centroid / np.maximum(cover.sum(axis=(1, 2)), 1e-6)[:, None]
  position = np.argmin(np.linalg.norm(centroid[:, None] - np.array(shapes.CENTRES)[None], axis=-1), axis=1)
  shown = found.colour >= 0
  cross = shown & (found.fill < FILL_THRESHOLD) & (found.skew >= shape_metrics.SKEW_THRESHOLD)
  return CrossDetections(cross=cross, colour=found.colour, position=np.where(shown, position, -1))
