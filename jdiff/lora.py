"""LoRA: low-rank updates W + scale * down @ up of a model's weights, as a transform of its params tree.

An adapter of a weight at `path` (a kernel leaf of jdiff's params tree) is a pair down [..., in, r] and up [r, out]:
a Dense kernel [in, out] gets down [in, r]; a convolution kernel [kh, kw, in, out] gets down [kh, kw, in, r] (a
rank-r convolution followed by a 1x1 one, as PEFT does). The update is scale * einsum("...ir,ro->...io", down, up),
with scale = alpha / rank. The models are untouched: `merge` adds the updates to the params, `unmerge` takes them
off again, and training (jdiff/train/finetune.py) differentiates through `apply_adapters` with the base frozen.

Files: `save` writes the safetensors layout that diffusers' `load_lora_weights` reads (PEFT's keys
"unet.<module>.lora_A.weight" / "lora_B.weight", "text_encoder.<module>...", the rank and alpha in the
"lora_adapter_metadata" entry of the file's metadata); `load` reads that layout and kohya's
("lora_unet_<module>.lora_down.weight", "lora_up.weight", "alpha"; "lora_te_..." for the text encoder). Module names
are diffusers' and transformers' (jdiff.interop.names). No PyTorch, no training code.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
from typing import Callable, Iterable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jdiff.interop import names

Path = tuple[str, ...]
TARGETS = ("attention", "feed_forward", "conv")
ATTENTION = {"to_q", "to_k", "to_v", "to_out", "qkv", "q_proj", "k_proj", "v_proj", "out_proj"}
FEED_FORWARD = {"ff_proj", "ff_out", "fc1", "fc2"}
CONVS = {"conv1", "conv2"}  # the residual blocks' 3x3 convolutions
METADATA_KEY = "lora_adapter_metadata"  # diffusers' name for the PEFT LoraConfig of each component
COMPONENTS = ("unet", "text_encoder")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder"}
WORKDIR_FILE = "lora.safetensors"  # what LoRA training writes in its work dir


class LoRAMismatchError(ValueError):
  """A LoRA does not fit the model it is applied to: a module it adapts is missing, or has other shapes."""


@dataclasses.dataclass(frozen=True)
class LoRA:
  """Low-rank updates of a model's weights, keyed by the kernel's path in the params tree."""
  down: dict[Path, np.ndarray]  # [..., in, r]
  up: dict[Path, np.ndarray]  # [r, out]
  scale: dict[Path, float]  # alpha / rank of each module

  @property
  def paths(self) -> list[Path]:
    return sorted(self.down)

  def num_params(self) -> int:
    return sum(self.down[p].size + self.up[p].size for p in self.down)


def delta(down, up, scale) -> jax.Array:
  """The update scale * down @ up, shaped like the kernel it adapts."""
  return scale * jnp.einsum("...ir,ro->...io", down, up)


def target_paths(params, targets: Iterable[str], components: Iterable[str] | None = None) -> list[Path]:
  """The kernel paths of `params` that adapters of the kinds `targets` (see TARGETS) act on. For a text-to-image
  model ({"text_encoder": ..., "unet": ...}) only the top-level `components` are searched (None: all)."""
  targets = set(targets)
  unknown = targets - set(TARGETS)
  if unknown:
    raise ValueError(f"unknown LoRA targets {sorted(unknown)}: choose from {', '.join(TARGETS)}")
  flat = flax.traverse_util.flatten_dict(params)
  modules = {path[:-1] for path in flat}
  found = []
  for path, leaf in flat.items():
    if path[-1] != "kernel" or (components is not None and _is_text_model(params) and path[0] not in components):
      continue
    module = path[-2]
    attention = module in ATTENTION or (module == "proj_out" and path[:-2] + ("qkv",) in modules)
    if (("attention" in targets and attention) or ("feed_forward" in targets and module in FEED_FORWARD)
        or ("conv" in targets and module in CONVS and np.ndim(leaf) == 4)):
      found.append(path)
  return sorted(found)


def _is_text_model(params) -> bool:
  return isinstance(params, Mapping) and set(params) == {"text_encoder", "unet"}


def init_adapters(rng: jax.Array, params, paths: Iterable[Path], rank: int) -> dict:
  """Trainable adapters {path: {"down", "up"}} as a nested tree like the params': down uniform with PEFT's (Kaiming)
  bound 1 / sqrt(fan-in), up zero, so that training starts from the base model itself."""
  flat = flax.traverse_util.flatten_dict(params)
  adapters = {}
  for i, path in enumerate(sorted(paths)):
    shape = np.shape(flat[path])
    fan_in = int(np.prod(shape[:-1]))
    bound = 1.0 / np.sqrt(fan_in)
    adapters[path + ("down",)] = jax.random.uniform(jax.random.fold_in(rng, i), (*shape[:-1], rank), jnp.float32,
                                                    -bound, bound)
    adapters[path + ("up",)] = jnp.zeros((rank, shape[-1]), jnp.float32)
  return flax.traverse_util.unflatten_dict(adapters)


def adapter_pairs(adapters) -> dict[Path, tuple]:
  """{kernel path: (down, up)} of an adapters tree."""
  flat = flax.traverse_util.flatten_dict(adapters)
  return {path[:-1]: (flat[path[:-1] + ("down",)], flat[path]) for path in flat if path[-1] == "up"}


def apply_adapters(params, adapters, scale: float):
  """The params with every adapted kernel W replaced by W + scale * down @ up (differentiable in the adapters)."""
  flat = flax.traverse_util.flatten_dict(params)
  for path, (down, up) in adapter_pairs(adapters).items():
    flat[path] = flat[path] + delta(down, up, scale).astype(flat[path].dtype)
  return flax.traverse_util.unflatten_dict(flat)


def from_adapters(adapters, rank: int, alpha: float) -> LoRA:
  """A LoRA of a trained adapters tree, with scale alpha / rank."""
  pairs = jax.device_get(adapter_pairs(adapters))
  return LoRA(down={p: np.asarray(d) for p, (d, _) in pairs.items()},
              up={p: np.asarray(u) for p, (_, u) in pairs.items()}, scale={p: alpha / rank for p in pairs})


def check_fits(params, lora: LoRA, source: str = "the LoRA") -> None:
  """Raises LoRAMismatchError naming the module and the shapes when `lora` does not fit `params`."""
  flat = flax.traverse_util.flatten_dict(params)
  for path in lora.paths:
    where = "/".join(path[:-1])
    if path not in flat:
      raise LoRAMismatchError(f"{source} adapts module {where!r}, which this model does not have: the LoRA was "
                              "made for another model")
    kernel = tuple(np.shape(flat[path]))
    down, up = np.shape(lora.down[path]), np.shape(lora.up[path])
    if down[:-1] != kernel[:-1] or up[-1] != kernel[-1] or down[-1] != up[0]:
      raise LoRAMismatchError(f"{source} does not fit module {where!r}: its kernel is {list(kernel)}, the LoRA's "
                              f"down is {list(down)} and up {list(up)} (down [..., in, r] and up [r, out] must "
                              "match the kernel's [..., in, out]): the LoRA was made for another model")


def merge(params, lora: LoRA, weight: float = 1.0):
  """The params with weight * the LoRA's updates added (several LoRAs: merge one after another)."""
  check_fits(params, lora)
  flat = flax.traverse_util.flatten_dict(params)
  for path in lora.paths:  # On the host, in float64: no program to compile per kernel shape, and exact to fp32.
    kernel = flat[path]
    update = weight * lora.scale[path] * np.einsum("...ir,ro->...io", np.asarray(lora.down[path], np.float64),
                                                   np.asarray(lora.up[path], np.float64))
    merged = (np.asarray(kernel, np.float64) + update).astype(kernel.dtype)
    flat[path] = jax.device_put(merged, kernel.sharding) if isinstance(kernel, jax.Array) else merged
  return flax.traverse_util.unflatten_dict(flat)


def unmerge(params, lora: LoRA, weight: float = 1.0):
  """The params with the updates that merge(params, lora, weight) added taken off again (exact up to rounding)."""
  return merge(params, lora, -weight)


# Files.

def _component_names(params) -> dict[str, tuple[Callable[[Path], str], Path]]:
  """component -> (module name of a path inside it, the component's prefix in the params tree)."""
  if _is_text_model(params):
    unet = params["unet"]
    return {"unet": (_unet_names(unet), ("unet",)), "text_encoder": (names.text_module_name, ("text_encoder",))}
  return {"unet": (_unet_names(params), ())}


def _unet_names(unet_params) -> Callable[[Path], str]:
  levels = 1 + max(int(m.group(1)) for k in unet_params if (m := re.fullmatch(r"(?:down|up)(\d+)_.*", k)))
  spatial = any("transformer_blocks_0" in v for v in unet_params.values() if isinstance(v, Mapping))
  return names.unet_module_name(levels, spatial)


def module_names(params) -> dict[tuple[str, str], Path]:
  """(component, diffusers/transformers module name) -> kernel path, for every kernel of the model."""
  out = {}
  for component, (name, prefix) in _component_names(params).items():
    for path in flax.traverse_util.flatten_dict(params[prefix[0]] if prefix else params):
      if path[-1] == "kernel" and path[-2] != "qkv":  # fused q/k/v: three PyTorch modules, see _torch_name
        out[(component, name(path[:-1]))] = prefix + path
  return out


def _module_of(params, path: Path) -> tuple[str, str]:
  for component, (name, prefix) in _component_names(params).items():
    if path[:len(prefix)] == prefix:
      if path[-2] == "qkv":
        raise ValueError(f"module {'/'.join(path[:-1])!r} is a fused q/k/v projection, which diffusers keeps as "
                         "three modules: a LoRA file cannot hold its adapter (adapt a text-to-image U-Net's to_q, "
                         "to_k, to_v instead)")
      module = name(path[len(prefix):-1])
      # transformers 5's CLIPTextModel has no text_model. level, and diffusers' files follow it
      return component, module.removeprefix("text_model.") if component == "text_encoder" else module
  raise ValueError(f"no component holds {'/'.join(path)}")


def to_peft(lora: LoRA, params) -> tuple[dict[str, np.ndarray], dict]:
  """(tensors, metadata) in diffusers' PEFT layout. Each component's rank and alpha are its modules' most common
  ones; a module whose scale differs has the difference folded into its lora_B, which is the same update."""
  tensors, by_component = {}, collections.defaultdict(list)
  for path in lora.paths:
    component, module = _module_of(params, path)
    by_component[component].append((module, path))
  metadata = {}
  for component, modules in by_component.items():
    rank = collections.Counter(lora.up[p].shape[0] for _, p in modules).most_common(1)[0][0]
    scale = collections.Counter(lora.scale[p] for _, p in modules).most_common(1)[0][0]
    ranks = {m: lora.up[p].shape[0] for m, p in modules if lora.up[p].shape[0] != rank}
    for module, path in modules:
      down, up = np.asarray(lora.down[path], np.float32), np.asarray(lora.up[path], np.float32)
      up = up * (lora.scale[path] / scale)  # every module's PEFT scale (alpha / r, from the patterns) is `scale`
      if down.ndim == 4:  # conv: A is a [r, in, kh, kw] convolution, B a 1x1 one
        tensors[f"{component}.{module}.lora_A.weight"] = down.transpose(3, 2, 0, 1)
        tensors[f"{component}.{module}.lora_B.weight"] = up.T[:, :, None, None]
      else:
        tensors[f"{component}.{module}.lora_A.weight"] = down.T
        tensors[f"{component}.{module}.lora_B.weight"] = up.T
    config = {"r": rank, "lora_alpha": scale * rank, "target_modules": sorted(m for m, _ in modules),
              "rank_pattern": ranks, "alpha_pattern": {m: scale * r for m, r in ranks.items()}}
    metadata.update({f"{component}.{k}": v for k, v in config.items()})
  return tensors, metadata


def save(lora: LoRA, params, path: str) -> None:
  """Writes `lora` (made for the model whose params are `params`) as a safetensors file that diffusers'
  pipe.load_lora_weights(path) reads, and `load` reads back. The file appears whole or not at all."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  tensors, metadata = to_peft(lora, params)
  temporary = f"{path}.tmp-{os.getpid()}"
  try:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, temporary,
              metadata={"format": "pt", METADATA_KEY: json.dumps(metadata, sort_keys=True)})
    os.replace(temporary, path)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


def load(path: str, params) -> LoRA:
  """The LoRA in the safetensors file `path` (diffusers'/PEFT's layout or kohya's), for the model whose params are
  `params`; raises LoRAMismatchError naming the module and the shapes when it does not fit that model."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no LoRA file {path!r}: give a .safetensors file")
  with safe_open(path, framework="numpy") as f:
    metadata = f.metadata() or {}
    tensors = {k: f.get_tensor(k) for k in f.keys()}
  if tensors and all(k.startswith(tuple(KOHYA_PREFIXES)) for k in tensors):
    lora = _from_kohya(tensors, params, path)
  else:
    lora = _from_peft(tensors, json.loads(metadata.get(METADATA_KEY, "{}")), params, path)
  check_fits(params, lora, source=path)
  return lora


def resolve(lora, params) -> LoRA:
  """A LoRA from a LoRA object, a .safetensors file, or a LoRA training work dir (its lora.safetensors)."""
  if isinstance(lora, LoRA):
    check_fits(params, lora)
    return lora
  path = os.fspath(lora)
  if os.path.isdir(path):
    file = os.path.join(path, WORKDIR_FILE)
    if not os.path.isfile(file):
      raise FileNotFoundError(f"{path} holds no {WORKDIR_FILE}: a LoRA training run writes it when it finishes "
                              "(rerun train.py with the same --workdir to finish it)")
    path = file
  return load(path, params)


_PEFT_KEY = re.compile(r"(unet|text_encoder)\.(.+)\.(lora_A|lora_B)\.weight")


def _from_peft(tensors: dict, metadata: dict, params, path: str) -> LoRA:
  modules = module_names(params)
  down, up, scale, named = {}, {}, {}, {}
  for key, value in tensors.items():
    match = _PEFT_KEY.fullmatch(key)
    if not match:
      raise LoRAMismatchError(f"{path}: tensor {key!r} is not a LoRA weight jdiff reads (expected "
                              "'unet.<module>.lora_A.weight' / 'lora_B.weight', 'text_encoder.<module>...', or kohya's "
                              "'lora_unet_<module>.lora_down.weight')")
    component, module, kind = match.groups()
    kernel = _kernel_path(modules, component, module, path)
    named[kernel] = component, module
    if kind == "lora_A":
      down[kernel] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    else:
      up[kernel] = value[:, :, 0, 0].T if value.ndim == 4 else value.T
  for kernel, (component, module) in named.items():
    r = down[kernel].shape[-1] if kernel in down else 1
    rank = metadata.get(f"{component}.rank_pattern", {}).get(module, metadata.get(f"{component}.r", r))
    alpha = metadata.get(f"{component}.alpha_pattern", {}).get(module, metadata.get(f"{component}.lora_alpha", rank))
    scale[kernel] = float(alpha) / r  # no metadata: PEFT's default, alpha = r, scale 1
  return _checked(down, up, scale, path)


def _from_kohya(tensors: dict, params, path: str) -> LoRA:
  kohya = {}
  for (component, module), kernel in module_names(params).items():
    prefix = {v: k for k, v in KOHYA_PREFIXES.items()}[component]
    kohya[prefix + module.replace(".", "_")] = kernel
  down, up, alphas = {}, {}, {}
  for key, value in tensors.items():
    name, _, kind = key.partition(".")
    if name not in kohya:
      raise LoRAMismatchError(f"{path}: module {name!r} has no place in this model (kohya names its modules like "
                              "'lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q'): the LoRA was "
                              "made for another model")
    kernel = kohya[name]
    if kind == "lora_down.weight":
      down[kernel] = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    elif kind == "lora_up.weight":
      up[kernel] = value[:, :, 0, 0].T if value.ndim == 4 else value.T
    elif kind == "alpha":
      alphas[kernel] = float(value)
    else:
      raise LoRAMismatchError(f"{path}: tensor {key!r} is not a kohya LoRA weight (lora_down.weight, lora_up.weight, "
                              "alpha)")
  scale = {k: alphas.get(k, d.shape[-1]) / d.shape[-1] for k, d in down.items()}
  return _checked(down, up, scale, path)


def _kernel_path(modules: dict, component: str, module: str, path: str) -> Path:
  kernel = modules.get((component, module))
  if kernel is None and component == "text_encoder":  # PEFT files written without CLIPTextModel's text_model.
    kernel = modules.get((component, "text_model." + module))
  if kernel is None:
    raise LoRAMismatchError(f"{path}: module {component}.{module} has no place in this model: the LoRA was made for "
                            "another model")
  return kernel


def _checked(down: dict, up: dict, scale: dict, path: str) -> LoRA:
  unpaired = sorted(set(down) ^ set(up))
  if unpaired:
    raise LoRAMismatchError(f"{path}: module {'/'.join(unpaired[0][:-1])!r} has only one of its two LoRA matrices")
  return LoRA(down=down, up=up, scale=scale)
