"""Where each jdiff parameter lives in a diffusers / transformers state dict, and in which layout.

A jdiff leaf (a path in the Flax params tree) corresponds to one PyTorch tensor, or to three for the fused q/k/v
projection of jdiff's self-attention block. Layouts differ only by transposition: a convolution kernel is
[kh, kw, in, out] in Flax and [out, in, kh, kw] in PyTorch, a Dense kernel [in, out] against a Linear weight
[out, in]; norms, biases and embeddings are the same arrays.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable

import numpy as np

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Entry:
  """One jdiff leaf and the PyTorch tensors it is made of."""
  path: Path
  keys: tuple[str, ...]  # one key, or q, k, v for a fused projection
  layout: str  # "conv", "linear" or "same"

  def torch_shapes(self, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The PyTorch tensors' shapes for a jdiff leaf of `shape`."""
    if len(self.keys) == 3:
      split = (shape[0], shape[1] // 3) if len(shape) == 2 else (shape[0] // 3,)
      return [_transposed(self.layout, split)] * 3
    return [_transposed(self.layout, shape)]

  def to_jdiff(self, tensors: list[np.ndarray]) -> np.ndarray:
    arrays = [_to_flax(self.layout, t) for t in tensors]
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=-1)

  def to_torch(self, value: np.ndarray) -> list[np.ndarray]:
    parts = np.split(value, 3, axis=-1) if len(self.keys) == 3 else [value]
    return [np.ascontiguousarray(_to_torch(self.layout, p)) for p in parts]


def _transposed(layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if layout == "conv":
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(reversed(shape)) if layout == "linear" else tuple(shape)


def _to_flax(layout: str, tensor: np.ndarray) -> np.ndarray:
  if layout == "conv":
    return tensor.transpose(2, 3, 1, 0)
  return tensor.T if layout == "linear" else tensor


def _to_torch(layout: str, value: np.ndarray) -> np.ndarray:
  if layout == "conv":
    return value.transpose(3, 2, 0, 1)
  return value.T if layout == "linear" else value


_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def entries(paths: Iterable[tuple[Path, tuple[int, ...]]], module_name: Callable[[Path], str]) -> list[Entry]:
  """An Entry per (leaf path, shape), the PyTorch module of each leaf's module given by module_name."""
  out = []
  for path, shape in paths:
    *module, leaf = path
    layout = {4: "conv", 2: "linear"}.get(len(shape), "same") if leaf == "kernel" else "same"
    if module[-1] == "qkv":
      prefix = module_name(tuple(module[:-1]))
      keys = tuple(f"{prefix}.{p}.{_LEAVES[leaf]}" for p in ("to_q", "to_k", "to_v"))
    else:
      keys = (f"{module_name(tuple(module))}.{_LEAVES[leaf]}",)
    out.append(Entry(tuple(path), keys, layout))
  return out


# Module names, model by model. Each maps jdiff's module path (without the leaf) to PyTorch's dotted module name.

_RESNET = {"temb_proj": "time_emb_proj", "shortcut": "conv_shortcut"}
_ATTENTION = {"norm": "group_norm", "proj_out": "to_out.0"}  # jdiff's AttentionBlock; qkv is split in `entries`
_TRANSFORMER_BLOCK = {"to_out": "to_out.0", "ff_proj": "ff.net.0.proj", "ff_out": "ff.net.2"}


def _children(rest: Path, renames: dict[str, str]) -> str:
  return "".join("." + renames.get(name, name) for name in rest)


def _attention_children(rest: Path, spatial: bool) -> str:
  if not spatial:
    return _children(rest, _ATTENTION)
  parts = [re.sub(r"^transformer_blocks_(\d+)$", r"transformer_blocks.\1", name) for name in rest]
  return _children(tuple(parts), _TRANSFORMER_BLOCK)


def unet_module_name(levels: int, spatial: bool) -> Callable[[Path], str]:
  """jdiff U-Net module paths -> UNet2DConditionModel (spatial transformers) or UNet2DModel module names."""
  def name(module: Path) -> str:
    top, rest = module[0], module[1:]
    if match := re.fullmatch(r"(down|up)(\d+)_(res|attn)(\d+)", top):
      kind, level, block, i = match.groups()
      index = int(level) if kind == "down" else levels - 1 - int(level)
      prefix = f"{kind}_blocks.{index}.{'resnets' if block == 'res' else 'attentions'}.{i}"
      return prefix + (_children(rest, _RESNET) if block == "res" else _attention_children(rest, spatial))
    if match := re.fullmatch(r"(down|up)(\d+)_(downsample|upsample)", top):
      kind, level, sampler = match.groups()
      index = int(level) if kind == "down" else levels - 1 - int(level)
      return f"{kind}_blocks.{index}.{sampler}rs.0" + _children(rest, {})
    if match := re.fullmatch(r"mid_res(\d)", top):
      return f"mid_block.resnets.{match.group(1)}" + _children(rest, _RESNET)
    if top == "mid_attn":
      return "mid_block.attentions.0" + _attention_children(rest, spatial)
    fixed = {"time_embed": "time_embedding", "label_embed": "class_embedding", "norm_out": "conv_norm_out"}
    return fixed.get(top, top) + _children(rest, {"dense0": "linear_1", "dense1": "linear_2"})
  return name


def controlnet_module_name(levels: int, spatial: bool) -> Callable[[Path], str]:
  """jdiff ControlNet module paths -> diffusers ControlNetModel module names: the encoder's as the U-Net's."""
  unet = unet_module_name(levels, spatial)

  def name(module: Path) -> str:
    top, rest = module[0], module[1:]
    if top == "cond_embedding":
      parts = [re.sub(r"^blocks_(\d+)$", r"blocks.\1", part) for part in rest]
      return "controlnet_cond_embedding." + ".".join(parts)
    if match := re.fullmatch(r"down_zero(\d+)", top):
      return f"controlnet_down_blocks.{match.group(1)}"
    if top == "mid_zero":
      return "controlnet_mid_block"
    return unet(module)
  return name


def vae_module_name(levels: int) -> Callable[[Path], str]:
  """jdiff AutoencoderKL module paths -> diffusers AutoencoderKL module names."""
  def name(module: Path) -> str:
    coder, top, rest = module[0], module[1], module[2:]
    if top in ("quant_conv", "post_quant_conv"):
      return top
    if match := re.fullmatch(r"(down|up)(\d+)_res(\d+)", top):
      kind, level, i = match.groups()
      index = int(level) if kind == "down" else levels - 1 - int(level)
      return f"{coder}.{kind}_blocks.{index}.resnets.{i}" + _children(rest, _RESNET)
    if match := re.fullmatch(r"(down|up)(\d+)_(downsample|upsample)", top):
      kind, level, sampler = match.groups()
      index = int(level) if kind == "down" else levels - 1 - int(level)
      return f"{coder}.{kind}_blocks.{index}.{sampler}rs.0" + _children(rest, {})
    if top == "mid":
      block, rest = rest[0], rest[1:]
      if block == "attn":
        return f"{coder}.mid_block.attentions.0" + _children(rest, _ATTENTION)
      return f"{coder}.mid_block.resnets.{block[-1]}" + _children(rest, _RESNET)
    return f"{coder}.{'conv_norm_out' if top == 'norm_out' else top}" + _children(rest, {})
  return name


def text_module_name(module: Path) -> str:
  """jdiff TextEncoder module paths -> transformers CLIPTextModel module names."""
  parts = [re.sub(r"^layers_(\d+)$", r"layers.\1", name) for name in module]
  return "text_model." + ".".join(parts)
