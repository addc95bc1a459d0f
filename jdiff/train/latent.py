"""Latent diffusion: a frozen VAE turns image batches into scaled latents for the U-Net, and samples back into images.

`prepare_latents` runs when a latent diffusion run starts (config.latent.vae_workdir set): it restores the VAE,
checks that the U-Net is built for its latents, and fixes the scaling factor (1 / std of the latents of the first
scale_batches training batches unless the config gives one). It returns the raw config with the VAE's absolute path,
checkpoint step and the factor filled in; that is what the checkpoints store, so resuming and `jdiff.load` decode
exactly as training encoded. Samplers never see the VAE: they run on latents as they would on pixels.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jdiff import data
from jdiff.config import Config, ConfigError, parse_config
from jdiff.models.vae import AutoencoderKL, VAEConfig
from jdiff.train import checkpoint, sharding
from jdiff.train import vae as vae_training  # a module import: vae imports the loop, which imports this


@functools.partial(jax.jit, static_argnames=("vae", "sample"))
def _encode(params, images, rng, scale, *, vae: VAEConfig, sample: bool):
  posterior = AutoencoderKL(vae).apply({"params": params}, images, method=AutoencoderKL.encode)
  return scale * (posterior.sample(rng) if sample else posterior.mode())


@functools.partial(jax.jit, static_argnames="vae")
def _decode(params, latents, scale, *, vae: VAEConfig):
  return AutoencoderKL(vae).apply({"params": params}, latents / scale, method=AutoencoderKL.decode)


@dataclasses.dataclass(frozen=True)
class LatentCodec:
  """A frozen VAE and its scaling factor: images in [-1, 1] <-> latents of unit scale.

  encode and decode take host arrays (device arrays are fetched first, wherever they live), so they serve a
  sampler's output however it was sharded; the training loop's batches go through make_batch_encoder instead.
  """
  vae: VAEConfig
  params: dict
  scaling_factor: float
  sample: bool = True  # encode with a posterior sample (training); False: the posterior mean

  def encode(self, images, rng: jax.Array | None = None) -> jax.Array:
    """Scaled latents [B, s, s, latent_channels] of images [B, S, S, C]; rng None encodes the posterior mean."""
    sample = self.sample and rng is not None
    rng = jax.random.key(0) if rng is None else rng
    return _encode(self.params, np.asarray(images, np.float32), rng, jnp.float32(self.scaling_factor),
                   vae=self.vae, sample=sample)

  def decode(self, latents) -> jax.Array:
    """Images in (about) [-1, 1] from scaled latents."""
    return _decode(self.params, np.asarray(latents, np.float32), jnp.float32(self.scaling_factor), vae=self.vae)


def latent_std(latents: list[np.ndarray]) -> float:
  """The standard deviation of all values of the given latent batches, pooled."""
  values = np.concatenate([np.asarray(z, np.float64).ravel() for z in latents])
  return float(np.std(values))


def load_codec(config: Config) -> LatentCodec:
  """The codec a latent diffusion checkpoint's config (with the VAE step and factor filled in) names."""
  lc = config.latent
  trained = _load(lc.vae_workdir, lc.vae_checkpoint)
  return LatentCodec(trained.config.vae, trained.params, lc.scaling_factor, sample=lc.encode == "sample")


def prepare_latents(config: Config, raw: dict, workdir: str, start_step: int) -> tuple[LatentCodec, dict]:
  """(codec, raw config with the VAE's path, step and scaling factor resolved) for a latent diffusion run.

  A resumed run (start_step > 0) takes them from its checkpoint's config, so it keeps the factor it started with.
  """
  lc = config.latent
  resolved = copy.deepcopy(raw)
  if start_step:
    manager = checkpoint.make_manager(workdir, create=False)
    saved = checkpoint.restore_config(manager, start_step).get("latent", {})
    if saved.get("vae_workdir") != os.path.abspath(lc.vae_workdir):
      raise ConfigError(f"config.latent.vae_workdir={lc.vae_workdir!r}, but the checkpoint in {workdir!r} was "
                        f"trained on the latents of {saved.get('vae_workdir')!r}: use that VAE or another --workdir")
    resolved["latent"] = saved
    return load_codec(parse_config(resolved)), resolved
  trained = _load(lc.vae_workdir, lc.vae_checkpoint)
  _check_shapes(config, trained.config.vae)
  codec = LatentCodec(trained.config.vae, trained.params, lc.scaling_factor or 1.0, sample=lc.encode == "sample")
  if not lc.scaling_factor:
    codec = dataclasses.replace(codec, scaling_factor=1.0 / _measured_std(config, codec))
  resolved["latent"] = dict(raw.get("latent", {}), vae_workdir=trained.workdir, vae_checkpoint=trained.step,
                            scaling_factor=codec.scaling_factor)
  logging.info("Latent diffusion on the VAE at %s (step %d): latents %s, scaling factor %.5f", trained.workdir,
               trained.step, (config.model.image_size,) * 2 + (config.model.in_channels,), codec.scaling_factor)
  return codec, resolved


def _load(workdir: str, step: int | None):
  try:
    return vae_training.load_vae(workdir, step)
  except FileNotFoundError as e:
    raise ConfigError(f"config.latent.vae_workdir={workdir!r}: {e}") from None


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
    latents = _encode(params, batch["image"], jax.random.fold_in(rng, step), scale, vae=codec.vae,
                      sample=codec.sample)
    return dict(batch, image=latents)
  return encode
