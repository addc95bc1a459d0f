"""Random inpainting masks for training: rectangles, brush strokes and whole images, drawn on the devices.

A mask is float32 [B, H, W, 1] with 1 where the model fills in. Each example is fully masked with probability
`full_rate` (the model then generates from nothing but its label); the rest are split evenly between one rectangle
(sides uniform from a quarter to all of the image, placed uniformly) and strokes (STROKES thick segments between
uniform points, radius uniform from 1 pixel to an eighth of the side).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

STROKES = 3


def random_masks(rng: jax.Array, batch: int, height: int, width: int, full_rate: float) -> jax.Array:
  k_kind, k_rect, k_stroke = jax.random.split(rng, 3)
  u = jax.random.uniform(k_kind, (batch,))
  full = u < full_rate
  rectangle = u < full_rate + (1.0 - full_rate) / 2
  masks = jnp.where(rectangle[:, None, None], rectangles(k_rect, batch, height, width),
                    strokes(k_stroke, batch, height, width))
  return jnp.where(full[:, None, None], 1.0, masks)[..., None]


def rectangles(rng: jax.Array, batch: int, height: int, width: int) -> jax.Array:
  """[B, H, W]: one axis-aligned rectangle per example."""
  k_size, k_place = jax.random.split(rng)
  sides = jnp.array([height, width], jnp.float32)
  size = jnp.round(sides * jax.random.uniform(k_size, (batch, 2), minval=0.25, maxval=1.0))
  start = jnp.floor(jax.random.uniform(k_place, (batch, 2)) * (sides - size + 1))
  rows, cols = jnp.arange(height)[None, :, None], jnp.arange(width)[None, None, :]
  inside = lambda coord, axis: (coord >= start[:, axis, None, None]) & (coord < (start + size)[:, axis, None, None])
  return (inside(rows, 0) & inside(cols, 1)).astype(jnp.float32)


def strokes(rng: jax.Array, batch: int, height: int, width: int) -> jax.Array:
  """[B, H, W]: the union of STROKES thick segments per example."""
  k_ends, k_radius = jax.random.split(rng)
  sides = jnp.array([height, width], jnp.float32)
  ends = jax.random.uniform(k_ends, (batch, STROKES, 2, 2)) * sides  # (row, col) of both ends
  radius = jax.random.uniform(k_radius, (batch, STROKES), minval=1.0, maxval=max(1.0, min(height, width) / 8))
  rows, cols = jnp.meshgrid(jnp.arange(height) + 0.5, jnp.arange(width) + 0.5, indexing="ij")
  pixels = jnp.stack([rows, cols], -1)[None, None]  # [1, 1, H, W, 2]
  a, b = ends[:, :, None, None, 0], ends[:, :, None, None, 1]
  along = jnp.sum((pixels - a) * (b - a), -1) / jnp.maximum(jnp.sum((b - a) ** 2, -1), 1e-6)
  nearest = a + jnp.clip(along, 0.0, 1.0)[..., None] * (b - a)
  distance = jnp.sqrt(jnp.sum((pixels - nearest) ** 2, -1))
  return jnp.any(distance <= radius[:, :, None, None], axis=1).astype(jnp.float32)
