"""Latent diffusion training: the frozen VAE that turns each batch into scaled latents for the U-Net.

`prepare_latents` runs when a latent run starts (config.latent.vae_workdir set): it finds and restores the VAE,
checks that the U-Net is built for its latents, and fixes the scaling factor (1 / std of the latents of the first
scale_batches training batches unless the config gives one). It returns the raw config with the VAE's absolute
path, checkpoint step and the factor filled in; that is what the checkpoints store, so resuming and `jdiff.load`
decode exactly as training encoded.
"""
from __future__ import annotations

import copy
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jdiff import checkpoint, data, sharding
from jdiff.config import Config, ConfigError, parse_config
from jdiff.latent import LatentCodec, encode_scaled, load_codec, load_vae
from jdiff.models.vae import VAEConfig

# The VAE config that trains a VAE for each offline dataset, for the missing-VAE message.
VAE_CONFIGS = {"sklearn_digits": "configs/vae_digits.py", "shapes": "configs/vae_shapes.py"}


def vae_workdir(config: Config, workdir: str) -> str:
  """config.latent.vae_workdir made absolute: a relative one names a directory beside the run's work dir."""
  path = os.path.expanduser(config.latent.vae_workdir)
  return path if os.path.isabs(path) else os.path.join(os.path.dirname(os.path.abspath(workdir)), path)


def check_vae_exists(config: Config, workdir: str) -> None:
  """Raises ConfigError, with the command that trains the VAE, when config.latent names no trained VAE."""
  path = vae_workdir(config, workdir)
  if checkpoint.latest_step(path) is None:
    vae_config = VAE_CONFIGS.get(config.data.name, "configs/vae_digits.py (or another configs/vae_*.py)")
    raise ConfigError(f"config.latent.vae_workdir={config.latent.vae_workdir!r}: no trained VAE in {path}; train "
                      f"it first with `python train.py --config {vae_config} --workdir {path}`, or point "
                      "--config.latent.vae_workdir at the work dir of one")


def latent_std(latents: list[np.ndarray]) -> float:
  """The standard deviation of all values of the given latent batches, pooled."""
  values = np.concatenate([np.asarray(z, np.float64).ravel() for z in latents])
  return float(np.std(values))


def prepare_latents(config: Config, raw: dict, workdir: str, start_step: int) -> tuple[LatentCodec, dict]:
  """(codec, raw config with the VAE's path, step and scaling factor resolved) for a latent diffusion run; raises
  ConfigError, before any data is read, when the VAE is missing or is not the one a resumed run started with.

  A resumed run (start_step > 0) takes them from its checkpoint's config, so it keeps the factor it started with.
  """
  lc = config.latent
  path = vae_workdir(config, workdir)
  resolved = copy.deepcopy(raw)
  if start_step:
    manager = checkpoint.make_manager(workdir, create=False)
    saved = checkpoint.restore_config(manager, start_step).get("latent", {})
    if saved.get("vae_workdir") != path:
      raise ConfigError(f"config.latent.vae_workdir={lc.vae_workdir!r} ({path}), but the checkpoint in {workdir!r} "
                        f"was trained on the latents of {saved.get('vae_workdir')!r}: use that VAE or another "
                        "--workdir")
    check_vae_exists(config, workdir)
    resolved["latent"] = saved
    return load_codec(parse_config(resolved)), resolved
  check_vae_exists(config, workdir)
  trained = load_vae(path, lc.vae_checkpoint)
  _check_shapes(config, trained.config.vae)
  codec = LatentCodec(trained.config.vae, trained.params, lc.scaling_factor or 1.0, sample=lc.encode == "sample")
  if not lc.scaling_factor:
    codec = dataclasses.replace(codec, scaling_factor=1.0 / _measured_std(config, codec))
  resolved["latent"] = dict(raw.get("latent", {}), vae_workdir=trained.workdir, vae_checkpoint=trained.step,
                            scaling_factor=codec.scaling_factor)
  logging.info("latent diffusion on the VAE at %s (step %d): latents %s, scaling factor %.5f", trained.workdir,
               trained.step, (config.model.image_size,) * 2 + (config.model.in_channels,), codec.scaling_factor)
  return codec, resolved


def _measured_std(config: Config, codec: LatentCodec) -> float:
  """Std of the unscaled latents of the first scale_batches batches (a fresh iterator: training's is untouched)."""
  batches = data.make_train_iterator(config.data, config.training.batch_size, config.seed)
  rng = jax.random.key(config.seed)
  latents = [codec.encode(next(batches)["image"], jax.random.fold_in(rng, i))
             for i in range(config.latent.scale_batches)]
  return latent_std(latents)


def _check_shapes(config: Config, vae: VAEConfig) -> None:
  mc, size = config.model, config.data.image_size
  channels = data.dataset_info(config.data).image_shape[-1]
  problems = []
  if channels != vae.in_channels:
    problems.append(f"the VAE encodes {vae.in_channels}-channel images but {config.data.name!r} has {channels}")
  if size % vae.downsample_factor:
    problems.append(f"config.data.image_size={size} is not a multiple of the VAE's factor {vae.downsample_factor}")
  elif mc.image_size != size // vae.downsample_factor:
    problems.append(f"config.model.image_size={mc.image_size} must be the latent size {size // vae.downsample_factor}"
                    f" (data.image_size {size} / the VAE's factor {vae.downsample_factor})")
  if mc.in_channels != vae.latent_channels or mc.output_channels != vae.latent_channels:
    problems.append(f"config.model.in_channels (and out_channels) must be the VAE's latent_channels "
                    f"{vae.latent_channels}, not {mc.in_channels}")
  if problems:
    raise ConfigError("the U-Net does not fit the VAE's latents: " + "; ".join(problems))


def make_batch_encoder(codec: LatentCodec, mesh, seed: int):
  """`encode(batch, step) -> batch` with the image replaced by its scaled latents, sharded like the batch.

  The posterior sample of step k is drawn from (seed, k), so a resumed run encodes as an uninterrupted one.
  """
  params = jax.device_put(codec.params, sharding.replicated(mesh))
  rng = jax.random.fold_in(jax.random.key(seed), 0x1A7E)  # apart from the train step's stream
  scale = jnp.float32(codec.scaling_factor)

  def encode(batch: dict, step: int) -> dict:
    latents = encode_scaled(params, batch["image"], jax.random.fold_in(rng, step), scale, vae=codec.vae,
                            sample=codec.sample)
    return dict(batch, image=latents)
  return encode
