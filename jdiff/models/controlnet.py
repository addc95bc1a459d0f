"""ControlNet (Zhang et al., 2023): a trainable copy of a U-Net's encoder that steers the frozen U-Net with an image.

`ControlNet(unet_config, ...).apply(params, x, t, control, labels, context=..., scale=s)` returns the residuals
(one per skip connection of the U-Net, and one for its middle block's output), each from a zero-initialised 1x1
convolution and multiplied by s; `UNet.apply(..., residuals=...)` adds them. The control image [B, H * f, W * f, C]
in [0, 1] (f = 2**(len(embedding_channels) - 1), the VAE's downsampling for a latent model, 1 for a pixel one)
goes through a small convolutional embedding whose last conv is zero-initialised too, and is added to the copy's
input convolution. With both zero inits a fresh ControlNet leaves the U-Net's output exactly as it was.

The copy's modules carry the U-Net's names (time_embed, conv_in, down0_res0, ..., mid_res1), so
`params_from_unet` initialises them from a trained U-Net's params, and diffusers' ControlNetModel weights map onto
them as the U-Net's do (jdiff.interop.names.controlnet_module_name).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiff.models.layers import (AttentionBlock, Conv1x1, Downsample, ResBlock, SpatialTransformer, TimeEmbedding,
                                 conv3x3, zero_init)
from jdiff.models.unet import UNetConfig

Residuals = tuple[tuple[jax.Array, ...], jax.Array]


class ConditioningEmbedding(nn.Module):
  """diffusers' ControlNetConditioningEmbedding: a 3x3 conv, then per further width a 3x3 conv and a stride-2 3x3
  conv (SiLU after each), and a zero-initialised 3x3 conv to `features` channels."""
  features: int
  channels: tuple[int, ...]
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, image: jax.Array) -> jax.Array:
    h = nn.silu(conv3x3(self.channels[0], self.dtype, "conv_in")(image.astype(self.dtype)))
    for i, (width, wider) in enumerate(zip(self.channels[:-1], self.channels[1:])):
      h = nn.silu(conv3x3(width, self.dtype, f"blocks_{2 * i}")(h))
      h = nn.silu(conv3x3(wider, self.dtype, f"blocks_{2 * i + 1}", strides=2)(h))
    return conv3x3(self.features, self.dtype, "conv_out", zero=True)(h)


class ControlNet(nn.Module):
  """The encoder of a U-Net of `config` (time and label embeddings, input conv, down path, middle block) plus the
  conditioning embedding and the zero convolutions; returns the U-Net's residuals times `scale`."""
  config: UNetConfig
  conditioning_channels: int = 3
  embedding_channels: tuple[int, ...] = (16, 32, 96, 256)

  @property
  def control_factor(self) -> int:
    """How many times larger than x the control image is: the conditioning embedding's downsampling."""
    return 2 ** (len(self.embedding_channels) - 1)

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, control: jax.Array, labels: jax.Array | None = None, *,
               context: jax.Array | None = None, scale: float | jax.Array = 1.0, train: bool = False) -> Residuals:
    """x [B,H,W,C] and t as the U-Net's, control [B, H*f, W*f, conditioning_channels] in [0, 1], labels for a
    class model, context [B, M, context_dim] for a text model."""
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    f = self.control_factor
    want = (x.shape[0], x.shape[1] * f, x.shape[2] * f, self.conditioning_channels)
    if control.shape != want:
      raise ValueError(f"the control image must be [B, H*{f}, W*{f}, {self.conditioning_channels}] = {list(want)} "
                       f"for inputs {list(x.shape)}; got {list(control.shape)}")
    emb = TimeEmbedding(cfg.channels, cfg.flip_sin_to_cos, cfg.freq_shift, name="time_embed")(
        jnp.broadcast_to(t, x.shape[:1]))
    if cfg.num_classes:
      labels = jnp.full(x.shape[:1], cfg.num_classes, jnp.int32) if labels is None else labels
      emb = emb + nn.Embed(cfg.num_classes + 1, emb.shape[-1], name="label_embed")(labels)
    block = lambda features, name: ResBlock(features, cfg.norm_groups, cfg.dropout, cfg.scale_shift, dtype,
                                            cfg.norm_eps, name=name)
    attend = lambda h, heads, name: AttentionBlock(heads, cfg.norm_groups, dtype, cfg.norm_eps, name=name)(h)
    if cfg.context_dim:
      if context is None or context.shape[-1] != cfg.context_dim:
        raise ValueError(f"this ControlNet cross-attends to a context [B, M, {cfg.context_dim}]; got "
                         f"{None if context is None else context.shape}")
      attend = lambda h, heads, name: SpatialTransformer(heads, cfg.transformer_depth, cfg.norm_groups, dtype,
                                                         cfg.linear_projection, name=name)(h, context)

    h = conv3x3(cfg.channels, dtype, "conv_in")(x)
    h = h + ConditioningEmbedding(cfg.channels, tuple(self.embedding_channels), dtype, name="cond_embedding")(control)
    skips = [h]
    last = len(cfg.level_channels) - 1
    for level, (features, heads, attends) in enumerate(zip(cfg.level_channels, cfg.level_heads, cfg.level_attends)):
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

    zero_conv = lambda features, name: Conv1x1(features, jnp.float32, zero_init, name=name)
    down = tuple(zero_conv(s.shape[-1], f"down_zero{k}")(s) * scale for k, s in enumerate(skips))
    return down, zero_conv(h.shape[-1], "mid_zero")(h) * scale


def example_inputs(model: ControlNet) -> tuple:
  """(x, t, control, labels, context) of batch 1 at the U-Net's image size: what initialises a ControlNet."""
  cfg = model.config
  side, f = cfg.image_size, model.control_factor
  x = jnp.zeros((1, side, side, cfg.in_channels))
  control = jnp.zeros((1, side * f, side * f, model.conditioning_channels))
  labels = jnp.zeros((1,), jnp.int32) if cfg.num_classes else None
  context = jnp.zeros((1, 1, cfg.context_dim)) if cfg.context_dim else None
  return x, jnp.zeros((1,)), control, labels, context


def params_from_unet(controlnet_params: dict, unet_params: dict) -> dict:
  """controlnet_params with every module the U-Net also has (the encoder) replaced by the U-Net's trained one; the
  conditioning embedding and zero convolutions stay as given."""
  copied = {}
  for name, value in controlnet_params.items():
    if name not in unet_params:
      copied[name] = value
      continue
    mine, theirs = jax.tree.map(jnp.shape, value), jax.tree.map(jnp.shape, unet_params[name])
    if mine != theirs:
      raise ValueError(f"the U-Net's module {name} has shapes {theirs}, the ControlNet's {mine}: the ControlNet "
                       "was built for another U-Net config")
    copied[name] = unet_params[name]
  return copied
