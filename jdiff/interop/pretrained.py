"""Stable Diffusion in diffusers' directory format: reading its components into jdiff's models, writing jdiff's.

    DIR/model_index.json
    DIR/unet/config.json, diffusion_pytorch_model[.VARIANT].safetensors     UNet2DConditionModel or UNet2DModel
    DIR/vae/config.json, diffusion_pytorch_model[.VARIANT].safetensors      AutoencoderKL (latent models)
    DIR/text_encoder/config.json, model[.VARIANT].safetensors               CLIPTextModel (text models)
    DIR/tokenizer/                                                          CLIPTokenizer's files
    DIR/scheduler/scheduler_config.json

Weights go to the devices one tensor at a time, cast to the requested dtype on the way, so the host never holds a
second copy of the model. No PyTorch: the files are read with safetensors' numpy interface.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from typing import Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jdiff import schedulers
from jdiff.interop import configs, names, weights
from jdiff.models.text import TextEncoder, TextEncoderConfig
from jdiff.models.unet import UNet, UNetConfig
from jdiff.models.vae import AutoencoderKL, VAEConfig

WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
BUFFERS = ("text_model.embeddings.position_ids",)  # stored by some CLIPTextModel files; not weights
UNPREFIXED = "text_model."
DIFFUSERS_VERSION = "0.42.1"  # the version the exports were checked against (tests/fixtures)


def is_diffusers_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "model_index.json"))


@dataclasses.dataclass(frozen=True)
class Components:
  """A diffusers pipeline directory read into jdiff: configs and device-resident params of each component."""
  unet: UNetConfig
  unet_params: dict
  scheduler: dict  # scheduler/scheduler_config.json as read: jdiff.schedulers maps it
  text: TextEncoderConfig | None = None
  text_params: dict | None = None
  vae: VAEConfig | None = None
  vae_params: dict | None = None
  scaling_factor: float | None = None


def read_config(path: str, component: str, name: str = "config.json") -> dict:
  file = os.path.join(path, component, name)
  if not os.path.isfile(file):
    raise FileNotFoundError(f"no {component}/{name} in the diffusers directory {path}")
  with open(file) as f:
    return json.load(f)


def read_scheduler(path: str) -> dict:
  """scheduler/scheduler_config.json, its schedule and prediction checked (jdiff.schedulers reads the rest when
  sampling)."""
  raw = read_config(path, "scheduler", "scheduler_config.json")
  try:
    schedulers.diffusers_schedule(raw)
    prediction = raw.get("prediction_type", "epsilon")
    if prediction not in schedulers.PREDICTIONS:
      raise ValueError(f"prediction_type={prediction!r} is not supported by jdiff (supported: "
                       f"{', '.join(schedulers.PREDICTIONS)})")
  except ValueError as error:
    raise configs.UnsupportedConfigError(f"{path}/scheduler/scheduler_config.json: {error}") from None
  return raw


def read_components(path: str, *, dtype: str = "float32", variant: str | None = None,
                    sharding: jax.sharding.Sharding | None = None) -> Components:
  """Every component of the pipeline directory `path` that jdiff models: the U-Net and scheduler, and the VAE and
  text encoder when present. Params are `dtype` arrays placed with `sharding` (default: the first device)."""
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  unet = configs.unet_config(read_config(path, "unet"), dtype)
  parts = dict(unet=unet, scheduler=read_scheduler(path))
  if os.path.isdir(os.path.join(path, "text_encoder")):
    parts["text"] = configs.text_config(read_config(path, "text_encoder"), dtype)
    if parts["text"].width != unet.context_dim:
      raise configs.UnsupportedConfigError(f"{path}: the text encoder's hidden_size {parts['text'].width} is not the "
                                           f"U-Net's cross_attention_dim {unet.context_dim}")
  elif unet.context_dim:
    raise FileNotFoundError(f"the U-Net of {path} cross-attends to text, but there is no text_encoder/ beside it")
  if os.path.isdir(os.path.join(path, "vae")):
    parts["vae"], parts["scaling_factor"] = configs.vae_config(read_config(path, "vae"), dtype)
  # Every config is checked before any weight is read.
  if "text" in parts:
    parts["text_params"] = read_params(path, "text_encoder", abstract_text_params(parts["text"]),
                                       names.text_module_name, dtype, variant, sharding)
  if "vae" in parts:
    parts["vae_params"] = read_params(path, "vae", abstract_vae_params(parts["vae"]),
                                      names.vae_module_name(len(parts["vae"].block_out_channels)), dtype, variant,
                                      sharding)
  parts["unet_params"] = read_params(path, "unet", abstract_unet_params(unet),
                                     names.unet_module_name(len(unet.channel_mults), bool(unet.context_dim)), dtype,
                                     variant, sharding)
  return Components(**parts)


def abstract_unet_params(config: UNetConfig):
  x = jnp.zeros((1, config.image_size, config.image_size, config.in_channels))
  labels = jnp.zeros((1,), jnp.int32) if config.num_classes else None
  context = jnp.zeros((1, 1, config.context_dim)) if config.context_dim else None
  return jax.eval_shape(lambda: UNet(config).init(jax.random.key(0), x, jnp.zeros((1,)), labels,
                                                  context=context))["params"]


def abstract_text_params(config: TextEncoderConfig):
  return jax.eval_shape(lambda: TextEncoder(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]


def abstract_vae_params(config: VAEConfig):
  x = jnp.zeros((1, config.image_size, config.image_size, config.in_channels))
  return jax.eval_shape(lambda: AutoencoderKL(config).init(jax.random.key(0), x))["params"]


def read_params(path: str, component: str, abstract, module_name: Callable, dtype: str, variant: str | None,
                sharding: jax.sharding.Sharding) -> dict:
  """The params tree shaped like `abstract`, each leaf read from the component's safetensors files, put in jdiff's
  layout and cast to `dtype` on the host one tensor at a time, then placed with `sharding`."""
  directory = os.path.join(path, component)
  reader = weights.TensorReader(weights.weight_files(directory, WEIGHT_STEMS.get(component, "diffusion_pytorch_model"),
                                                    variant))
  flat = flax.traverse_util.flatten_dict(abstract)
  target = jnp.dtype(dtype)
  params, used = {}, set()
  for entry in names.entries(((p, leaf.shape) for p, leaf in flat.items()), module_name):
    tensors = []
    for key, shape in zip(entry.keys, entry.torch_shapes(flat[entry.path].shape)):
      if key not in reader.keys:  # transformers 5 writes CLIPTextModel's weights without the text_model. prefix
        key = key.removeprefix(UNPREFIXED)
      if key not in reader.keys:
        raise ValueError(f"{directory}: no weight {key!r} in the safetensors files, though config.json implies it: "
                         "the config and the weights describe different models")
      if reader.shape(key) != shape:
        raise ValueError(f"{directory}: weight {key!r} has shape {list(reader.shape(key))}, but config.json implies "
                         f"{list(shape)}")
      tensors.append(reader.read(key))
      used.add(key)
    params[entry.path] = jax.device_put(np.ascontiguousarray(entry.to_jdiff(tensors), dtype=target), sharding)
  reader.close()
  unused = sorted(reader.keys - used - {b for buffer in BUFFERS for b in (buffer, buffer.removeprefix(UNPREFIXED))})
  if unused:
    raise ValueError(f"{directory}: {len(unused)} weights have no place in the model config.json describes, e.g. "
                     f"{', '.join(unused[:3])}: the config and the weights describe different models")
  return flax.traverse_util.unflatten_dict(params)


# Export.

def export(directory: str, *, unet: UNetConfig, unet_params, scheduler: dict, text: TextEncoderConfig | None = None,
           text_params=None, vae: VAEConfig | None = None, vae_params=None, scaling_factor: float | None = None,
           tokenizer_dir: str | None = None, overwrite: bool = False) -> None:
  """Writes a diffusers pipeline directory: each component's config.json and safetensors weights (in the params'
  dtype; bfloat16 as float32), the scheduler config, a copy of `tokenizer_dir`, and model_index.json. The directory
  appears whole or not at all: it is written beside its place and renamed into it."""
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and not overwrite:
    raise FileExistsError(f"{directory} exists; choose another directory or pass overwrite=True to replace it")
  configs.diffusers_unet_config(unet)  # raises for what diffusers cannot express, before anything is written
  os.makedirs(os.path.dirname(directory), exist_ok=True)
  staging = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".", dir=os.path.dirname(directory))
  try:
    components = {"unet": ("diffusers", configs.diffusers_unet_config(unet)["_class_name"]),
                  "scheduler": ("diffusers", scheduler["_class_name"])}
    _write_component(staging, "unet", configs.diffusers_unet_config(unet), unet_params,
                     names.unet_module_name(len(unet.channel_mults), bool(unet.context_dim)))
    if text is not None:
      _write_component(staging, "text_encoder", configs.diffusers_text_config(text), text_params,
                       names.text_module_name)
      components["text_encoder"] = ("transformers", "CLIPTextModel")
      components["tokenizer"] = ("transformers", "CLIPTokenizer") if tokenizer_dir else (None, None)
      if tokenizer_dir:
        shutil.copytree(tokenizer_dir, os.path.join(staging, "tokenizer"))
    if vae is not None:
      _write_component(staging, "vae", configs.diffusers_vae_config(vae, scaling_factor), vae_params,
                       names.vae_module_name(len(vae.block_out_channels)))
      components["vae"] = ("diffusers", "AutoencoderKL")
    _write_json(os.path.join(staging, "scheduler", "scheduler_config.json"), scheduler)
    index = {"_class_name": _pipeline_class(unet, text, vae), "_diffusers_version": DIFFUSERS_VERSION, **components}
    if index["_class_name"] == "StableDiffusionPipeline":
      index.update(safety_checker=[None, None], feature_extractor=[None, None], image_encoder=[None, None],
                   requires_safety_checker=False)
    _write_json(os.path.join(staging, "model_index.json"), index)
    if os.path.exists(directory):
      shutil.rmtree(directory)
    os.replace(staging, directory)
  finally:
    if os.path.exists(staging):
      shutil.rmtree(staging)


def _pipeline_class(unet: UNetConfig, text, vae) -> str:
  """StableDiffusionPipeline for a latent text model, DDPMPipeline for an unconditional pixel model; the others
  have no diffusers pipeline, and their components load one by one (from_pretrained(DIR, subfolder=...))."""
  if text is not None and vae is not None:
    return "StableDiffusionPipeline"
  return "DDPMPipeline" if text is None and vae is None and not unet.num_classes else "DiffusionPipeline"


def _write_component(staging: str, component: str, config: dict, params, module_name: Callable) -> None:
  flat = flax.traverse_util.flatten_dict(jax.device_get(params))
  tensors = {}
  for entry in names.entries(((p, np.shape(v)) for p, v in flat.items()), module_name):
    value = np.asarray(flat[entry.path])
    if value.dtype == jnp.bfloat16:  # safetensors' numpy interface has no bfloat16; float32 holds it exactly
      value = value.astype(np.float32)
    tensors.update(zip(entry.keys, entry.to_torch(value)))
  os.makedirs(os.path.join(staging, component))
  config = dict(config)
  if component != "text_encoder":
    config["_diffusers_version"] = DIFFUSERS_VERSION
  _write_json(os.path.join(staging, component, "config.json"), config)
  weights.write_tensors(os.path.join(staging, component, f"{WEIGHT_STEMS[component]}.safetensors"), tensors)


def _write_json(path: str, value: dict) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write("\n")
