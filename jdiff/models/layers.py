"""Building blocks of the diffusion U-Net (Flax Linen, NHWC).

Every module takes a compute `dtype`; parameters are created in fp32 (pretrained ones may be loaded in the compute
dtype). Group norms, the timestep embedding and the attention softmax run in fp32 whatever the compute dtype, since
bf16 and fp16 lose too much there.
Initialisation follows DDPM: Xavier-uniform kernels, and the last conv of every residual branch
zero-initialised so each block starts as the identity.
"""
from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


default_init = nn.initializers.xavier_uniform()
zero_init = nn.initializers.zeros


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0, *, flip_sin_to_cos: bool = False,
                       freq_shift: float = 1.0) -> jax.Array:
  """Sinusoidal embedding [B] -> [B, dim] of (possibly fractional) timesteps, in fp32.

  Frequencies max_period^(-i / (dim/2 - freq_shift)) for i < dim/2; sines then cosines, or cosines then sines with
  flip_sin_to_cos (Stable Diffusion's U-Net: flipped, freq_shift 0; DDPM's: neither, freq_shift 1).
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / max(half - freq_shift, 1))
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  waves = [jnp.cos(args), jnp.sin(args)] if flip_sin_to_cos else [jnp.sin(args), jnp.cos(args)]
  return jnp.pad(jnp.concatenate(waves, axis=-1), ((0, 0), (0, dim - 2 * half)))


def guidance_embedding(guidance_scale: jax.Array, dim: int) -> jax.Array:
  """The embedding [B, dim] of classifier-free guidance scales [B] that a latent consistency model takes as its
  timestep_cond: the sinusoid of 1000 w, w = guidance_scale - 1 being the weight of pred = cond + w (cond - uncond),
  as diffusers' LatentConsistencyModelPipeline embeds it."""
  return timestep_embedding(1000.0 * (jnp.asarray(guidance_scale, jnp.float32) - 1.0), dim)


class GroupNorm(nn.Module):
  """nn.GroupNorm's parameters and maths (eps 1e-6, variance as E[x^2] - E[x]^2), computed from per-channel moments.

  Reducing over the spatial axes first keeps the channels as the contiguous minor axis, and the normalisation
  becomes one per-(example, channel) scale and shift. XLA:CPU runs this about 2.5x faster, forward and backward,
  than a reduction over [..., groups, channels // groups] in isolation; 2-5% of a U-Net step (docs/performance.md).
  """
  num_groups: int
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    x = x.astype(jnp.float32)
    spatial = tuple(range(1, x.ndim - 1))
    per_group = lambda m: jnp.mean(m.reshape(x.shape[0], self.num_groups, c // self.num_groups), axis=-1)
    mean = per_group(jnp.mean(x, axis=spatial))
    var = jnp.maximum(per_group(jnp.mean(jnp.square(x), axis=spatial)) - jnp.square(mean), 0.0)
    channel_shape = (x.shape[0],) + (1,) * len(spatial) + (c,)
    to_channels = lambda g: jnp.repeat(g, c // self.num_groups, axis=1).reshape(channel_shape)
    mul = to_channels(jax.lax.rsqrt(var + self.epsilon)) * scale
    return x * mul + (bias - to_channels(mean) * mul)


def group_norm(x: jax.Array, groups: int, name: str | None = None, eps: float = 1e-6) -> jax.Array:
  """GroupNorm computed in fp32; returns fp32 (callers cast back after any fp32 follow-up)."""
  return GroupNorm(num_groups=groups, epsilon=eps, name=name)(x)


def conv3x3(features: int, dtype, name: str | None = None, zero: bool = False, strides: int = 1) -> nn.Conv:
  """A 3x3 convolution with padding 1; fp32 parameters, `dtype` compute."""
  return nn.Conv(features, (3, 3), strides=strides, padding=1, dtype=dtype,
                 kernel_init=zero_init if zero else default_init, name=name)


class Conv1x1(nn.Module):
  """A 1x1 convolution with nn.Conv's parameters (kernel [1, 1, in, out], bias), computed as a matmul over the
  channels: XLA:CPU runs that 1.2-2x faster, forward and backward, than the same convolution."""
  features: int
  dtype: jnp.dtype = jnp.float32
  kernel_init: Callable = default_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return jnp.dot(x.astype(self.dtype), kernel[0, 0].astype(self.dtype)) + bias.astype(self.dtype)


def dense(features: int, dtype, name: str | None = None, zero: bool = False) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, kernel_init=zero_init if zero else default_init, name=name)


class TimeEmbedding(nn.Module):
  """Sinusoid of width `channels` (plus a projection of `cond` if given), then Dense(4*channels), SiLU,
  Dense(4*channels); fp32 (it is tiny)."""
  channels: int
  flip_sin_to_cos: bool = False
  freq_shift: float = 1.0

  @nn.compact
  def __call__(self, t: jax.Array, cond: jax.Array | None = None) -> jax.Array:
    emb = timestep_embedding(t, self.channels, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift)
    if cond is not None:  # a condition on the timestep (a guidance scale's embedding), zero at initialisation
      emb = emb + nn.Dense(self.channels, use_bias=False, kernel_init=zero_init, name="cond_proj")(
          cond.astype(jnp.float32))
    emb = nn.silu(dense(4 * self.channels, jnp.float32, name="dense0")(emb))
    return dense(4 * self.channels, jnp.float32, name="dense1")(emb)


class ResBlock(nn.Module):
  """Pre-activation residual block with the time embedding injected between its two convs.

  scale_shift=True: h = norm(h) * (1 + scale) + shift (FiLM, improved-diffusion).
  scale_shift=False: h = h + proj(temb) before the second norm (DDPM).
  """
  features: int
  groups: int
  dropout: float
  scale_shift: bool
  dtype: jnp.dtype = jnp.float32
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, train: bool) -> jax.Array:
    h = nn.silu(group_norm(x, self.groups, "norm1", self.eps)).astype(self.dtype)
    h = conv3x3(self.features, self.dtype, "conv1")(h)
    proj_width = 2 * self.features if self.scale_shift else self.features
    emb = dense(proj_width, self.dtype, "temb_proj")(nn.silu(temb))[:, None, None, :]
    if self.scale_shift:
      scale, shift = jnp.split(emb, 2, axis=-1)
      h = group_norm(h, self.groups, "norm2", self.eps) * (1 + scale) + shift
    else:
      h = group_norm(h + emb, self.groups, "norm2", self.eps)
    h = nn.silu(h).astype(self.dtype)
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = conv3x3(self.features, self.dtype, "conv2", zero=True)(h)
    if x.shape[-1] != self.features:
      x = Conv1x1(self.features, self.dtype, name="shortcut")(x)
    return x + h


class AttentionBlock(nn.Module):
  """Multi-head self-attention over the H*W positions, with 1x1 q/k/v/output projections and a residual."""
  num_heads: int
  groups: int
  dtype: jnp.dtype = jnp.float32
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, height, width, c = x.shape
    h = group_norm(x, self.groups, "norm", self.eps).astype(self.dtype)
    # Split, not reshape-and-index: the gradient is then one concatenation, not three padded copies summed, which
    # takes a third off this block's step on XLA:CPU. The same q, k, v either way.
    heads = lambda t: t.reshape(b, height * width, self.num_heads, c // self.num_heads)
    q, k, v = map(heads, jnp.split(dense(3 * c, self.dtype, "qkv")(h), 3, axis=-1))
    # jax.nn.dot_product_attention forms the logits and the softmax in fp32 for bf16 inputs.
    h = jax.nn.dot_product_attention(q, k, v).reshape(b, height, width, c)
    return x + dense(c, self.dtype, "proj_out", zero=True)(h)


class Downsample(nn.Module):
  """Halves H and W with a stride-2 3x3 conv, padded by one on every side (pad_end=True: on the bottom and right
  only, as the autoencoder of latent diffusion does)."""
  dtype: jnp.dtype = jnp.float32
  pad_end: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    padding = ((0, 1), (0, 1)) if self.pad_end else 1
    return nn.Conv(x.shape[-1], (3, 3), strides=2, padding=padding, dtype=self.dtype, kernel_init=default_init,
                   name="conv")(x)


class Upsample(nn.Module):
  """Doubles H and W by nearest-neighbour repetition, then a 3x3 conv."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    return conv3x3(c, self.dtype, "conv")(x)


class CrossAttention(nn.Module):
  """Multi-head attention from x [B, N, C] to context [B, M, D] (None: to x itself); bias-free q/k/v as in
  Stable Diffusion, a biased output projection."""
  num_heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    context = x if context is None else context.astype(self.dtype)
    b, n, c = x.shape
    heads = lambda inputs, name: nn.Dense(c, use_bias=False, dtype=self.dtype, kernel_init=default_init,
                                          name=name)(inputs).reshape(b, inputs.shape[1], self.num_heads, -1)
    h = jax.nn.dot_product_attention(heads(x, "to_q"), heads(context, "to_k"), heads(context, "to_v"))
    return dense(c, self.dtype, "to_out")(h.reshape(b, n, c))


class TransformerBlock(nn.Module):
  """Pre-LayerNorm self-attention, cross-attention to the context, and a GEGLU feed-forward, each residual."""
  num_heads: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name=name)(x).astype(self.dtype)
    x = x + CrossAttention(self.num_heads, self.dtype, name="attn1")(norm("norm1"))
    x = x + CrossAttention(self.num_heads, self.dtype, name="attn2")(norm("norm2"), context)
    c = x.shape[-1]
    hidden, gate = jnp.split(dense(8 * c, self.dtype, "ff_proj")(norm("norm3")), 2, axis=-1)
    return x + dense(c, self.dtype, "ff_out")(hidden * nn.gelu(gate, approximate=False))


class SpatialTransformer(nn.Module):
  """Stable Diffusion's Transformer2DModel: group norm, a projection in, `depth` TransformerBlocks over the H*W
  positions attending to the context, a zero-initialised projection out, and a residual.

  The projections are Dense layers (linear=True, SD 2.x's use_linear_projection) or 1x1 convolutions (SD 1.x): the
  same maths, kept apart so that each layout's weights load and export as they are.
  """
  num_heads: int
  depth: int
  groups: int
  dtype: jnp.dtype = jnp.float32
  linear: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
    b, height, width, c = x.shape
    project = lambda name, zero=False: (dense(c, self.dtype, name, zero) if self.linear else
                                        Conv1x1(c, self.dtype, zero_init if zero else default_init, name=name))
    h = group_norm(x, self.groups, "norm").astype(self.dtype)
    h = project("proj_in")(h).reshape(b, height * width, c)
    for i in range(self.depth):
      h = TransformerBlock(self.num_heads, self.dtype, name=f"transformer_blocks_{i}")(h, context)
    return x + project("proj_out", zero=True)(h.reshape(b, height, width, c))
