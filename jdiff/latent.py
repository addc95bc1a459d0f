"""A trained VAE as latent diffusion uses it: `load_vae(workdir)` and the codec between images and scaled latents.

The codec's scaling factor maps the VAE's latents to about unit scale for the U-Net (1 / std, measured when latent
training starts and stored in its checkpoint's config). Samplers never see the VAE: they run on latents as they
would on pixels, and the codec decodes what they return. Training's batch encoder lives in jdiff/train/latent.py.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from jdiff import build, checkpoint, images
from jdiff.config import Config, ConfigError, VAETrainConfig, is_vae_config, parse_vae_config
from jdiff.models.vae import AutoencoderKL, VAEConfig

RECONSTRUCT_BATCH = 128


@functools.partial(jax.jit, static_argnames=("vae", "sample"))
def encode_scaled(params, x, rng, scale, *, vae: VAEConfig, sample: bool):
  """scale * (a posterior sample, or its mean) of images x in [-1, 1]."""
  posterior = AutoencoderKL(vae).apply({"params": params}, x, method=AutoencoderKL.encode)
  return scale * (posterior.sample(rng) if sample else posterior.mode())


@functools.partial(jax.jit, static_argnames="vae")
def _decode(params, latents, scale, *, vae: VAEConfig):
  return AutoencoderKL(vae).apply({"params": params}, latents / scale, method=AutoencoderKL.decode)


@dataclasses.dataclass(frozen=True)
class LatentCodec:
  """A frozen VAE and its scaling factor: images in [-1, 1] <-> latents of unit scale.

  encode and decode take host arrays (device arrays are fetched first, wherever they live), so they serve a
  sampler's output however it was sharded.
  """
  vae: VAEConfig
  params: dict
  scaling_factor: float
  sample: bool = True  # encode with a posterior sample (training); False: the posterior mean

  def encode(self, x, rng: jax.Array | None = None) -> jax.Array:
    """Scaled latents [B, s, s, latent_channels] of images [B, S, S, C]; rng None encodes the posterior mean."""
    sample = self.sample and rng is not None
    rng = jax.random.key(0) if rng is None else rng
    return encode_scaled(self.params, np.asarray(x, np.float32), rng, jnp.float32(self.scaling_factor),
                         vae=self.vae, sample=sample)

  def decode(self, latents) -> jax.Array:
    """Images in (about) [-1, 1] from scaled latents."""
    return _decode(self.params, np.asarray(latents, np.float32), jnp.float32(self.scaling_factor), vae=self.vae)


@dataclasses.dataclass(frozen=True)
class TrainedVAE:
  """A VAE restored from its work dir: the typed config, EMA params and the checkpoint step."""
  config: VAETrainConfig
  params: dict
  step: int
  workdir: str


def load_vae(workdir: str, step: int | None = None) -> TrainedVAE:
  """Restores the EMA params of the VAE that a configs/vae_*.py run wrote to `workdir` (its latest checkpoint, or
  `step`), on the first device."""
  workdir = os.path.abspath(workdir)
  steps = checkpoint.make_manager(workdir, create=False).all_steps() if checkpoint.latest_step(workdir) else []
  if not steps:
    raise FileNotFoundError(f"no VAE checkpoints in {workdir!r}")
  step = max(steps) if step is None else step
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint at step {step} in VAE work dir {workdir!r}; available steps: "
                            f"{', '.join(map(str, sorted(steps)))}")
  manager = checkpoint.make_manager(workdir, create=False)
  raw = checkpoint.restore_config_checked(manager, step)
  if not is_vae_config(raw):
    raise ConfigError(f"work dir {workdir!r} holds a diffusion model, not a VAE: pass the work dir of a "
                      "configs/vae_*.py run")
  config = parse_vae_config(raw)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                    build.abstract_vae_params(config.vae))
  params = checkpoint.restore_params(manager, step, abstract)
  return TrainedVAE(config=config, params=params, step=step, workdir=workdir)


def load_codec(config: Config) -> LatentCodec:
  """The codec that a latent diffusion checkpoint's config (with the VAE's path, step and factor filled in) names."""
  lc = config.latent
  trained = load_vae(lc.vae_workdir, lc.vae_checkpoint)
  return LatentCodec(trained.config.vae, trained.params, lc.scaling_factor, sample=lc.encode == "sample")


def reconstruct(vae: VAEConfig, params, x: np.ndarray, batch_size: int = RECONSTRUCT_BATCH) -> np.ndarray:
  """uint8 reconstructions (posterior mean, decoded) of uint8 images [N, S, S, C], in fixed-size padded batches."""
  codec = LatentCodec(vae, params, 1.0)
  out = []
  for start in range(0, len(x), batch_size):
    chunk = x[start:start + batch_size]
    padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)])
    decoded = codec.decode(codec.encode(images.uint8_to_model_range(padded)))
    out.append(images.model_range_to_uint8(decoded)[:len(chunk)])
  return np.concatenate(out)
