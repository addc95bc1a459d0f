"""The DDPM / improved-diffusion U-Net and its typed configuration.

`UNet(UNetConfig(...)).apply(params, x, t, labels, train=...)` maps NHWC images x and float timesteps t
to a prediction of x's shape with `out_channels` channels, in fp32 whatever the compute dtype.
With the DDPM CIFAR-10 settings (scale_shift=False) it has DDPM's 35.7M parameters. With a context
(context_dim > 0) it is Stable Diffusion's UNet2DConditionModel: the fields norm_eps, flip_sin_to_cos, freq_shift,
per-level num_heads and linear_projection express SD 1.x's and 2.x's architectures (jdiff.interop maps their
configs). Which levels attend is fixed by the config (attention_resolutions at image_size), so the U-Net runs at
any size divisible by 2**(levels - 1).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiff.models.layers import (AttentionBlock, Downsample, ResBlock, SpatialTransformer, TimeEmbedding, Upsample,
                                 conv3x3, group_norm)

DTYPES = ("float32", "bfloat16", "float16")  # float16: inference only


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Architecture of the U-Net; `UNetConfig(**config.model)` from an ml_collections config."""
  image_size: int = 32
  in_channels: int = 3
  out_channels: int | None = None  # None: same as in_channels.
  channels: int = 128
  channel_mults: tuple[int, ...] = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attention_resolutions: tuple[int, ...] = (16,)
  num_heads: int | tuple[int, ...] = 1  # every level's attention heads, or one count per level (the middle: the last)
  dropout: float = 0.1
  num_classes: int = 0  # 0: unconditional; otherwise label num_classes is the null class.
  scale_shift: bool = True
  norm_groups: int = 32
  dtype: str = "float32"
  # Text conditioning: context_dim > 0 puts a SpatialTransformer (self-attention, cross-attention to a context
  # [B, M, context_dim], feed-forward; transformer_depth blocks) wherever the U-Net would self-attend.
  context_dim: int = 0
  transformer_depth: int = 1
  linear_projection: bool = True  # the transformers' projections in and out: Dense (True) or 1x1 conv (SD 1.x)
  norm_eps: float = 1e-6  # the group norms' epsilon, but the transformers' own (1e-6, as in diffusers)
  flip_sin_to_cos: bool = False  # the timestep embedding: cosines first (Stable Diffusion) or sines first (DDPM)
  freq_shift: float = 1.0  # its frequencies are 10000^(-i / (channels / 2 - freq_shift)); SD: 0, DDPM: 1
  # > 0: the U-Net takes a condition [B, time_cond_proj_dim] (a guidance scale's embedding, as in latent consistency
  # models) added through a bias-free, zero-initialised Dense to the timestep's sinusoid (diffusers' cond_proj).
  time_cond_proj_dim: int = 0

  def __post_init__(self):
    object.__setattr__(self, "channel_mults", tuple(self.channel_mults))
    object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))
    if not isinstance(self.num_heads, int):
      object.__setattr__(self, "num_heads", tuple(self.num_heads))
    self._validate()

  @property
  def output_channels(self) -> int:
    return self.in_channels if self.out_channels is None else self.out_channels

  @property
  def cond_channels(self) -> int:
    """Input channels beyond the predicted ones: a condition concatenated to x (jdiff/conditioning.py)."""
    return self.in_channels - self.output_channels

  @property
  def resolutions(self) -> tuple[int, ...]:
    """Feature-map side length at each level of the U-Net."""
    return tuple(self.image_size // 2**level for level in range(len(self.channel_mults)))

  @property
  def level_channels(self) -> tuple[int, ...]:
    return tuple(self.channels * mult for mult in self.channel_mults)

  @property
  def level_heads(self) -> tuple[int, ...]:
    """Attention heads at each level; the middle block uses the last level's."""
    if isinstance(self.num_heads, int):
      return (self.num_heads,) * len(self.channel_mults)
    return self.num_heads

  @property
  def level_attends(self) -> tuple[bool, ...]:
    """Whether each level's blocks attend (self-attention, or a transformer for a text U-Net)."""
    return tuple(res in self.attention_resolutions for res in self.resolutions)

  def _validate(self):
    for name in ("image_size", "in_channels", "channels", "num_res_blocks", "norm_groups", "transformer_depth"):
      _require(getattr(self, name) > 0, name, getattr(self, name), "a positive integer")
    _require(len(self.level_heads) == len(self.channel_mults) and all(h > 0 for h in self.level_heads), "num_heads",
             self.num_heads, f"a positive integer, or one per level ({len(self.channel_mults)})")
    _require(self.norm_eps > 0, "norm_eps", self.norm_eps, "a positive number")
    _require(self.out_channels is None or self.out_channels > 0, "out_channels", self.out_channels,
             "None or a positive integer")
    _require(len(self.channel_mults) > 0 and all(m > 0 for m in self.channel_mults), "channel_mults",
             self.channel_mults, "a non-empty tuple of positive integers")
    _require(self.num_classes >= 0, "num_classes", self.num_classes, "0 (unconditional) or a positive integer")
    _require(self.context_dim >= 0, "context_dim", self.context_dim, "0 (no text) or the text encoder's width")
    _require(not (self.context_dim and self.num_classes), "num_classes", self.num_classes,
             "0 when context_dim > 0: a model is conditioned on class labels or on text, not both")
    _require(self.time_cond_proj_dim >= 0, "time_cond_proj_dim", self.time_cond_proj_dim, "0 or a positive integer")
    _require(0 <= self.dropout < 1, "dropout", self.dropout, "a rate in [0, 1)")
    _require(self.dtype in DTYPES, "dtype", self.dtype, f"one of {DTYPES}")
    levels = len(self.channel_mults)
    _require(self.image_size % 2**(levels - 1) == 0, "image_size", self.image_size,
             f"divisible by 2**(len(channel_mults) - 1) = {2**(levels - 1)}")
    for res in self.attention_resolutions:
      _require(res in self.resolutions, "attention_resolutions", self.attention_resolutions,
               f"resolutions that occur in this U-Net: {self.resolutions}")
    for width in self.level_channels:
      _require(width % self.norm_groups == 0, "norm_groups", self.norm_groups,
               f"a divisor of every level's channel count {self.level_channels}")
    for width, heads, attends in zip(self.level_channels, self.level_heads, self.level_attends):
      _require(width % heads == 0 or not attends, "num_heads", self.num_heads,
               f"dividing the channel count {width} of each level that attends")
    _require(self.level_channels[-1] % self.level_heads[-1] == 0, "num_heads", self.num_heads,
             f"dividing the middle block's channel count {self.level_channels[-1]}")


def _require(ok: bool, field: str, value, allowed: str):
  if not ok:
    raise ValueError(f"UNetConfig.{field}={value!r} is invalid: expected {allowed}.")


class UNet(nn.Module):
  """DDPM U-Net: ResBlocks and attention on a down path, a middle, and an up path fed by skips.

  remat=True recomputes each block's activations in the backward pass (nn.remat) instead of storing them:
  the same parameters and gradients, less activation memory for more compute.
  """
  config: UNetConfig
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, labels: jax.Array | None = None, *,
               context: jax.Array | None = None, residuals=None, train: bool = False,
               timestep_cond: jax.Array | None = None) -> jax.Array:
    """x [B,H,W,C], t float [B] or scalar, labels int [B] or None (all null; ignored when num_classes == 0),
    context [B, M, context_dim] for a text-conditional U-Net (context_dim > 0), residuals (one per skip
    connection, one for the middle block's output) added to them, as a ControlNet's (jdiff.models.controlnet),
    timestep_cond [B, time_cond_proj_dim] for one that takes it."""
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    if bool(cfg.time_cond_proj_dim) != (timestep_cond is not None):
      raise ValueError(f"this U-Net takes timestep_cond [B, {cfg.time_cond_proj_dim}] (time_cond_proj_dim); got "
                       f"{None if timestep_cond is None else timestep_cond.shape}")
    emb = self._embedding(jnp.broadcast_to(t, x.shape[:1]), labels, timestep_cond)
    res_block, attention_block, transformer = ResBlock, AttentionBlock, SpatialTransformer
    if self.remat:
      res_block, attention_block = nn.remat(ResBlock, static_argnums=(3,)), nn.remat(AttentionBlock)
      transformer = nn.remat(SpatialTransformer)
    block = lambda features, name: res_block(features, cfg.norm_groups, cfg.dropout, cfg.scale_shift, dtype,
                                             cfg.norm_eps, name=name)
    attend = lambda h, heads, name: attention_block(heads, cfg.norm_groups, dtype, cfg.norm_eps, name=name)(h)
    if cfg.context_dim:
      if context is None or context.shape[-1] != cfg.context_dim:
        raise ValueError(f"this U-Net cross-attends to a context [B, M, {cfg.context_dim}]; got "
                         f"{None if context is None else context.shape}")
      attend = lambda h, heads, name: transformer(heads, cfg.transformer_depth, cfg.norm_groups, dtype,
                                                  cfg.linear_projection, name=name)(h, context)
    levels = list(zip(range(len(cfg.level_channels)), cfg.level_channels, cfg.level_heads, cfg.level_attends))
    last = len(levels) - 1

    h = conv3x3(cfg.channels, dtype, "conv_in")(x)
    skips = [h]
    for level, features, heads, attends in levels:
      for i in range(cfg.num_res_blocks):
        h = block(features, f"down{level}_res{i}")(h, emb, train)
        if attends:
          h = attend(h, heads, f"down{level}_attn{i}")
        skips.append(h)
      if level != last:
        h = Downsample(dtype, name=f"down{level}_downsample")(h)
        skips.append(h)

    h = block(h.shape[-1], "mid_res0")(h, emb, train)
    h = attend(h, cfg.level_heads[-1], "mid_attn")
    h = block(h.shape[-1], "mid_res1")(h, emb, train)
    if residuals is not None:
      down, mid = residuals
      skips = [s + r.astype(s.dtype) for s, r in zip(skips, down, strict=True)]
      h = h + mid.astype(h.dtype)

    for level, features, heads, attends in reversed(levels):
      for i in range(cfg.num_res_blocks + 1):
        h = block(features, f"up{level}_res{i}")(jnp.concatenate([h, skips.pop()], axis=-1), emb, train)
        if attends:
          h = attend(h, heads, f"up{level}_attn{i}")
      if level != 0:
        h = Upsample(dtype, name=f"up{level}_upsample")(h)

    h = nn.silu(group_norm(h, cfg.norm_groups, "norm_out", cfg.norm_eps))
    return conv3x3(cfg.output_channels, jnp.float32, "conv_out", zero=True)(h)

  def _embedding(self, t: jax.Array, labels: jax.Array | None, timestep_cond: jax.Array | None = None) -> jax.Array:
    """Time embedding [B, 4*channels], plus the class embedding for a conditional model."""
    cfg = self.config
    emb = TimeEmbedding(cfg.channels, cfg.flip_sin_to_cos, cfg.freq_shift, name="time_embed")(t, timestep_cond)
    if cfg.num_classes == 0:
      return emb
    if labels is None:
      labels = jnp.full(t.shape, cfg.num_classes, jnp.int32)
    return emb + nn.Embed(cfg.num_classes + 1, emb.shape[-1], name="label_embed")(labels)
