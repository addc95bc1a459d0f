"""ControlNets for inference: reading one (a jdiff ControlNet work dir, or diffusers' ControlNetModel directory),
checking that it fits a base model, and turning control images into what it takes.

    pipe = jdiff.load("runs/shapes").with_controlnet("runs/controlnet")
    pipe.generate("a red circle", control_image=mask, control_scale=1.0)

Only inference is imported here.
"""
from __future__ import annotations

import dataclasses
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jdiff import checkpoint, sharding
from jdiff.config import ConfigError, parse_config
from jdiff.interop import configs, names, pretrained
from jdiff.models.controlnet import ControlNet, example_inputs
from jdiff.models.unet import UNetConfig


@dataclasses.dataclass(frozen=True)
class Control:
  """A ControlNet attached to a pipeline: the module (its U-Net config is the base's) and its params."""
  model: ControlNet
  params: dict


def abstract_params(model: ControlNet):
  """jax.ShapeDtypeStruct leaves of a ControlNet's params."""
  x, t, control, labels, context = example_inputs(model)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, t, control, labels, context=context))["params"]


def check_fits(model: ControlNet, params, unet_config: UNetConfig, unet_params, where: str) -> None:
  """Raises ValueError naming the first module whose shapes differ between the ControlNet's encoder and the base
  U-Net's (or whose zero convolutions do not match the base's skip connections)."""
  mine = flax.traverse_util.flatten_dict(jax.tree.map(jnp.shape, params), sep="/")
  theirs = flax.traverse_util.flatten_dict(jax.tree.map(jnp.shape, unet_params), sep="/")
  expected = flax.traverse_util.flatten_dict(jax.tree.map(
      lambda a: a.shape, abstract_params(dataclasses.replace(model, config=unet_config))), sep="/")
  for path, shape in sorted(mine.items(), key=lambda item: (item[0] not in theirs, item[0])):  # the U-Net's first
    want = theirs.get(path, expected.get(path))
    if want is None or tuple(want) != tuple(shape):
      needs = "has no such weight" if want is None else f"needs {list(want)}"
      raise ValueError(f"the ControlNet {where} does not fit this base model: its {path} has shape {list(shape)}, "
                       f"where the base's {'U-Net' if path in theirs else 'skip connections'} {needs}; use a "
                       "ControlNet trained on this base")
  missing = sorted(set(expected) - set(mine))
  if missing:
    raise ValueError(f"the ControlNet {where} does not fit this base model: it has no {missing[0]}")


def load(path: str, unet_config: UNetConfig, *, step: int | None = None, dtype: str = "float32") -> Control:
  """The ControlNet in `path`: a work dir that train.py wrote with a controlnet config (EMA params; `step` or the
  latest checkpoint), or a diffusers ControlNetModel directory (config.json, diffusion_pytorch_model.safetensors).
  Its modules are built for `unet_config`, the base's."""
  if os.path.isfile(os.path.join(path, "config.json")):
    return _load_diffusers(path, unet_config, dtype)
  if not os.path.isdir(checkpoint.checkpoint_dir(path)):
    raise FileNotFoundError(f"{path!r} is neither a ControlNet work dir (with checkpoints/) nor a diffusers "
                            "ControlNetModel directory (with config.json)")
  manager = checkpoint.make_manager(path, create=False)
  steps = manager.all_steps()
  if not steps or (step is not None and step not in steps):
    raise FileNotFoundError(f"no checkpoint {'' if step is None else f'at step {step} '}in {path}")
  step = max(steps) if step is None else step
  raw = checkpoint.restore_config_checked(manager, step)
  if "controlnet" not in raw:
    raise ConfigError(f"work dir {path!r} holds a diffusion model, not a ControlNet: load it with jdiff.load")
  config = parse_config(raw)
  trained = ControlNet(config.model, config.controlnet.conditioning_channels, config.controlnet.embedding_channels)
  replicated = sharding.over_devices(jax.local_devices())
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          abstract_params(trained))
  params = checkpoint.restore_params(manager, step, abstract, "ema_params")
  return Control(dataclasses.replace(trained, config=unet_config), params)


def base_of(workdir: str) -> str:
  """The base model (config.finetune.base) of the ControlNet that `workdir` trained, from its latest checkpoint."""
  if not os.path.isdir(checkpoint.checkpoint_dir(workdir)):
    raise FileNotFoundError(f"no checkpoints in {workdir!r}: a control image needs a ControlNet (--controlnet, or a "
                            "--workdir that trained one)")
  manager = checkpoint.make_manager(workdir, create=False)
  steps = manager.all_steps()
  raw = checkpoint.restore_config_checked(manager, max(steps)) if steps else {}
  if "controlnet" not in raw:
    raise ConfigError(f"work dir {workdir!r} holds no ControlNet: pass one with --controlnet")
  return raw["finetune"]["base"]


def _load_diffusers(path: str, unet_config: UNetConfig, dtype: str) -> Control:
  where = os.path.join(path, "config.json")
  own, channels, embedding = configs.controlnet_config(pretrained.read_config(path, "", "config.json"),
                                                     unet_config.image_size, dtype, where)
  ignored = ("image_size", "out_channels", "dropout", "dtype")
  for field in dataclasses.fields(UNetConfig):
    mine, theirs = getattr(own, field.name), getattr(unet_config, field.name)
    if field.name not in ignored and mine != theirs:
      raise ValueError(f"the ControlNet {path} does not fit this base model: its {where} gives the U-Net's "
                       f"{field.name} = {mine!r}, the base's is {theirs!r}")
  model = ControlNet(dataclasses.replace(unet_config, dtype=dtype), channels, embedding)
  module_name = names.controlnet_module_name(len(unet_config.channel_mults), bool(unet_config.context_dim))
  directory = os.path.abspath(path)
  try:
    params = pretrained.read_params(os.path.dirname(directory), os.path.basename(directory), abstract_params(model),
                                    module_name, dtype, None, sharding.over_devices(jax.local_devices()))
  except ValueError as error:
    raise ValueError(f"the ControlNet {path} does not fit this base model: {error}") from None
  return Control(model, params)


def control_images(images, num: int, shape: tuple[int, int, int]) -> np.ndarray:
  """Control images as float32 [num, H, W, C] in [0, 1]: from uint8 (0..255) or float ([0, 1]) images [H, W, C]
  (one for every image) or [num, H, W, C]; a single channel is repeated to C channels, as diffusers converts a
  grey image to RGB."""
  images = np.asarray(images)
  if images.ndim == 3:
    images = np.broadcast_to(images, (num, *images.shape))
  if images.ndim != 4 or images.shape[0] != num or images.shape[1:3] != shape[:2] or \
      images.shape[3] not in (1, shape[2]):
    raise ValueError(f"control_image must be [{shape[0]}, {shape[1]}, {shape[2]}] or [{num}, {shape[0]}, {shape[1]}, "
                     f"{shape[2]}] (one channel is repeated), got {list(images.shape)}")
  if images.dtype == np.uint8:
    images = images.astype(np.float32) / 255.0
  elif not np.issubdtype(images.dtype, np.floating) or not np.all((images >= 0) & (images <= 1)):
    raise ValueError("control_image must be uint8, or float with values in [0, 1]")
  return np.broadcast_to(images, (num, *shape)).astype(np.float32)
