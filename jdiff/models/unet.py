"""The DDPM / improved-diffusion U-Net and its typed configuration.

`UNet(UNetConfig(...)).apply(params, x, t, labels, train=...)` maps NHWC images x and float timesteps t
to a prediction of x's shape with `out_channels` channels, in fp32 whatever the compute dtype.
With the DDPM CIFAR-10 settings (scale_shift=False) it has DDPM's 35.7M parameters.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiff.models.layers import (AttentionBlock, Downsample, ResBlock, SpatialTransformer, TimeEmbedding, Upsample,
                                 conv3x3, group_norm)

DTYPES = ("float32", "bfloat16")


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
  num_heads: int = 1
  dropout: float = 0.1
  num_classes: int = 0  # 0: unconditional; otherwise label num_classes is the null class.
  scale_shift: bool = True
  norm_groups: int = 32
  dtype: str = "float32"
  # Text conditioning: context_dim > 0 puts a SpatialTransformer (self-attention, cross-attention to a context
  # [B, M, context_dim], feed-forward; transformer_depth blocks) wherever the U-Net would self-attend.
  context_dim: int = 0
  transformer_depth: int = 1

  def __post_init__(self):
    object.__setattr__(self, "channel_mults", tuple(self.channel_mults))
    object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))
    self._validate()

  @property
  def output_channels(self) -> int:
    return self.in_channels if self.out_channels is None else self.out_channels

  @property
  def resolutions(self) -> tuple[int, ...]:
    """Feature-map side length at each level of the U-Net."""
    return tuple(self.image_size // 2**level for level in range(len(self.channel_mults)))

  @property
  def level_channels(self) -> tuple[int, ...]:
    return tuple(self.channels * mult for mult in self.channel_mults)

  def _validate(self):
    for name in ("image_size", "in_channels", "channels", "num_res_blocks", "num_heads", "norm_groups",
                 "transformer_depth"):
      _require(getattr(self, name) > 0, name, getattr(self, name), "a positive integer")
    _require(self.out_channels is None or self.out_channels > 0, "out_channels", self.out_channels,
             "None or a positive integer")
    _require(len(self.channel_mults) > 0 and all(m > 0 for m in self.channel_mults), "channel_mults",
             self.channel_mults, "a non-empty tuple of positive integers")
    _require(self.num_classes >= 0, "num_classes", self.num_classes, "0 (unconditional) or a positive integer")
    _require(self.context_dim >= 0, "context_dim", self.context_dim, "0 (no text) or the text encoder's width")
    _require(not (self.context_dim and self.num_classes), "num_classes", self.num_classes,
             "0 when context_dim > 0: a model is conditioned on class labels or on text, not both")
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
    for width in self._attention_channels():
      _require(width % self.num_heads == 0, "num_heads", self.num_heads,
               f"a divisor of the attention channel counts {self._attention_channels()}")

  def _attention_channels(self) -> tuple[int, ...]:
    listed = [w for w, res in zip(self.level_channels, self.resolutions) if res in self.attention_resolutions]
    return tuple(sorted(set(listed + [self.level_channels[-1]])))  # The middle block always attends.


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
               context: jax.Array | None = None, train: bool = False) -> jax.Array:
    """x [B,H,W,C], t float [B] or scalar, labels int [B] or None (all null; ignored when num_classes == 0),
    context [B, M, context_dim] for a text-conditional U-Net (context_dim > 0)."""
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    emb = self._embedding(jnp.broadcast_to(t, x.shape[:1]), labels)
    res_block, attention_block, transformer = ResBlock, AttentionBlock, SpatialTransformer
    if self.remat:
      res_block, attention_block = nn.remat(ResBlock, static_argnums=(3,)), nn.remat(AttentionBlock)
      transformer = nn.remat(SpatialTransformer)
    block = lambda features, name: res_block(features, cfg.norm_groups, cfg.dropout, cfg.scale_shift, dtype, name=name)
    attend = lambda h, name: attention_block(cfg.num_heads, cfg.norm_groups, dtype, name=name)(h)
    if cfg.context_dim:
      if context is None or context.shape[-1] != cfg.context_dim:
        raise ValueError(f"this U-Net cross-attends to a context [B, M, {cfg.context_dim}]; got "
                         f"{None if context is None else context.shape}")
      attend = lambda h, name: transformer(cfg.num_heads, cfg.transformer_depth, cfg.norm_groups, dtype,
                                           name=name)(h, context)
    last = len(cfg.level_channels) - 1

    h = conv3x3(cfg.channels, dtype, "conv_in")(x)
    skips = [h]
    for level, features in enumerate(cfg.level_channels):
      for i in range(cfg.num_res_blocks):
        h = block(features, f"down{level}_res{i}")(h, emb, train)
        if h.shape[1] in cfg.attention_resolutions:
          h = attend(h, f"down{level}_attn{i}")
        skips.append(h)
      if level != last:
        h = Downsample(dtype, name=f"down{level}_downsample")(h)
        skips.append(h)

    h = block(h.shape[-1], "mid_res0")(h, emb, train)
    h = attend(h, "mid_attn")
    h = block(h.shape[-1], "mid_res1")(h, emb, train)

    for level, features in reversed(list(enumerate(cfg.level_channels))):
      for i in range(cfg.num_res_blocks + 1):
        h = block(features, f"up{level}_res{i}")(jnp.concatenate([h, skips.pop()], axis=-1), emb, train)
        if h.shape[1] in cfg.attention_resolutions:
          h = attend(h, f"up{level}_attn{i}")
      if level != 0:
        h = Upsample(dtype, name=f"up{level}_upsample")(h)

    h = nn.silu(group_norm(h, cfg.norm_groups, "norm_out"))
    return conv3x3(cfg.output_channels, jnp.float32, "conv_out", zero=True)(h)

  def _embedding(self, t: jax.Array, labels: jax.Array | None) -> jax.Array:
    """Time embedding [B, 4*channels], plus the class embedding for a conditional model."""
    cfg = self.config
    emb = TimeEmbedding(cfg.channels, name="time_embed")(t)
    if cfg.num_classes == 0:
      return emb
    if labels is None:
      labels = jnp.full(t.shape, cfg.num_classes, jnp.int32)
    return emb + nn.Embed(cfg.num_classes + 1, emb.shape[-1], name="label_embed")(labels)
