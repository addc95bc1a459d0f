"""A Transformer text encoder laid out like CLIP's text transformer, and the text-to-image U-Net that uses it.

`TextEncoder(TextEncoderConfig(...)).apply(params, ids)` maps token ids [B, L] to hidden states [B, L, width]:
token + position embeddings, `depth` pre-LayerNorm blocks of (causal or bidirectional) self-attention and an MLP,
and a final LayerNorm. Modules and parameters carry the names of CLIP's text transformer (embeddings/
token_embedding, encoder/layers_i/self_attn/q_proj, .../mlp/fc1, final_layer_norm, ...), so with
`causal=True, activation="quick_gelu"` and CLIP's sizes (CLIP_VIT_L14_TEXT) a CLIP text checkpoint loads into it
unchanged: `clip_text_params` renames a Hugging Face CLIPTextModel state dict into this module's params.

`TextToImageUNet` is the U-Net of Stable Diffusion's kind: the text encoder's last hidden states are the context
of the U-Net's cross-attention. Its call has the U-Net's shape, with token ids where a class U-Net takes labels,
so training steps and samplers (including classifier-free guidance, the empty prompt being the null condition)
use it as they use a class-conditional U-Net.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jdiff.models.unet import DTYPES, UNet, UNetConfig

ACTIVATIONS = ("quick_gelu", "gelu")


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
  """Architecture of the text encoder. CLIP ViT-L/14's: CLIP_VIT_L14_TEXT."""
  vocab_size: int = 100
  max_length: int = 16
  width: int = 128
  depth: int = 2
  num_heads: int = 4
  mlp_dim: int = 512
  causal: bool = True
  activation: str = "quick_gelu"
  dtype: str = "float32"

  def __post_init__(self):
    for name in ("vocab_size", "max_length", "width", "depth", "num_heads", "mlp_dim"):
      _require(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, getattr(self, name),
               "a positive integer")
    _require(self.width % self.num_heads == 0, "num_heads", self.num_heads, f"a divisor of width={self.width}")
    _require(isinstance(self.causal, bool), "causal", self.causal, "True or False")
    _require(self.activation in ACTIVATIONS, "activation", self.activation, f"one of {ACTIVATIONS}")
    _require(self.dtype in DTYPES, "dtype", self.dtype, f"one of {DTYPES}")


def _require(ok: bool, field: str, value, allowed: str):
  if not ok:
    raise ValueError(f"TextEncoderConfig.{field}={value!r} is invalid: expected {allowed}.")


CLIP_VIT_L14_TEXT = TextEncoderConfig(vocab_size=49408, max_length=77, width=768, depth=12, num_heads=12,
                                      mlp_dim=3072, causal=True, activation="quick_gelu")


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def _layer_norm(name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name=name)


class TextEmbeddings(nn.Module):
  config: TextEncoderConfig

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    cfg = self.config
    init = nn.initializers.normal(0.02)
    tokens = nn.Embed(cfg.vocab_size, cfg.width, embedding_init=init, name="token_embedding")(ids)
    positions = nn.Embed(cfg.max_length, cfg.width, embedding_init=nn.initializers.normal(0.01),
                         name="position_embedding")(jnp.arange(ids.shape[-1]))
    return tokens + positions


class SelfAttention(nn.Module):
  """Multi-head self-attention with biased q/k/v/out projections, causal or not."""
  num_heads: int
  causal: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, length, width = x.shape
    heads = lambda name: nn.Dense(width, dtype=self.dtype, name=name)(x).reshape(b, length, self.num_heads, -1)
    h = jax.nn.dot_product_attention(heads("q_proj"), heads("k_proj"), heads("v_proj"), is_causal=self.causal)
    return nn.Dense(width, dtype=self.dtype, name="out_proj")(h.reshape(b, length, width))


class MLP(nn.Module):
  mlp_dim: int
  activation: str
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    act = quick_gelu if self.activation == "quick_gelu" else lambda h: nn.gelu(h, approximate=False)
    h = act(nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(x))
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(h)


class EncoderLayer(nn.Module):
  """x + self_attn(layer_norm1(x)), then + mlp(layer_norm2(.)): CLIP's pre-LayerNorm block."""
  config: TextEncoderConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg, dtype = self.config, jnp.dtype(self.config.dtype)
    h = _layer_norm("layer_norm1")(x).astype(dtype)
    x = x + SelfAttention(cfg.num_heads, cfg.causal, dtype, name="self_attn")(h)
    h = _layer_norm("layer_norm2")(x).astype(dtype)
    return x + MLP(cfg.mlp_dim, cfg.activation, dtype, name="mlp")(h)


class Encoder(nn.Module):
  config: TextEncoderConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.config.depth):
      x = EncoderLayer(self.config, name=f"layers_{i}")(x)
    return x


class TextEncoder(nn.Module):
  """Token ids [B, L] (L <= max_length) -> last hidden states [B, L, width] in fp32."""
  config: TextEncoderConfig

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    h = TextEmbeddings(self.config, name="embeddings")(ids)
    h = Encoder(self.config, name="encoder")(h)
    return _layer_norm("final_layer_norm")(h)


class TextToImageUNet(nn.Module):
  """A U-Net with cross-attention (config.context_dim = text.width) to a text encoder's hidden states.

  `config` is the U-Net's, so code that reads model.config (image size, channels) works unchanged. With
  train_text=False the encoder gets no gradient (frozen, e.g. pretrained CLIP).
  """
  config: UNetConfig
  text: TextEncoderConfig
  train_text: bool = True
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, ids: jax.Array, *, residuals=None, train: bool = False,
               timestep_cond: jax.Array | None = None) -> jax.Array:
    """x [B,H,W,C], t float [B] or scalar, ids int token ids [B, L]; residuals and timestep_cond as UNet's."""
    context = TextEncoder(self.text, name="text_encoder")(ids)
    if not self.train_text:
      context = jax.lax.stop_gradient(context)
    return UNet(self.config, remat=self.remat, name="unet")(x, t, context=context, residuals=residuals, train=train,
                                                           timestep_cond=timestep_cond)


# Loading CLIP text weights.

_CLIP_LINEAR = re.compile(r"encoder\.layers\.(\d+)\.(self_attn\.[qkvout]+_proj|mlp\.fc[12])\.(weight|bias)")
_CLIP_NORM = re.compile(r"(?:encoder\.layers\.(\d+)\.)?(layer_norm[12]|final_layer_norm)\.(weight|bias)")


def clip_text_params(state_dict: Mapping[str, np.ndarray]) -> dict:
  """This module's params from a Hugging Face CLIPTextModel state dict (numpy arrays named like
  'text_model.encoder.layers.0.self_attn.q_proj.weight'); Linear weights are transposed into Dense kernels."""
  params: dict = {}

  def put(path: str, value) -> None:
    node = params
    *parents, leaf = path.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = np.asarray(value, np.float32)

  for name, value in state_dict.items():
    key = name.removeprefix("text_model.")
    if key.startswith("embeddings.") and key.endswith("_embedding.weight"):
      put(key.replace(".weight", "/embedding").replace(".", "/"), value)
    elif match := _CLIP_LINEAR.fullmatch(key):
      layer, module, kind = match.groups()
      leaf = "kernel" if kind == "weight" else "bias"
      put(f"encoder/layers_{layer}/{module.replace('.', '/')}/{leaf}", value.T if kind == "weight" else value)
    elif match := _CLIP_NORM.fullmatch(key):
      layer, module, kind = match.groups()
      prefix = f"encoder/layers_{layer}/" if layer is not None else ""
      put(f"{prefix}{module}/{'scale' if kind == 'weight' else 'bias'}", value)
    elif not key.endswith("position_ids"):  # position_ids is a buffer, not a weight.
      raise ValueError(f"unexpected CLIP text weight {name!r}: not part of CLIP's text transformer")
  return params


def load_clip_text_params(directory: str) -> dict:
  """clip_text_params of the model.safetensors in a local CLIPTextModel directory (e.g. SD's text_encoder/)."""
  from safetensors.numpy import load_file  # Deferred: only loading pretrained weights needs it.
  path = os.path.join(directory, "model.safetensors")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no model.safetensors in {directory!r}: point at a CLIPTextModel directory, such as "
                            "a Stable Diffusion checkpoint's text_encoder/")
  return clip_text_params(load_file(path))
