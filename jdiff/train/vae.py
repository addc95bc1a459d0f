"""The VAE trainer: a pure loss and step, reconstruction grids, and the held-out reconstruction PSNR at the end.

The loss is reconstruction (L1 or L2) + kl_weight * KL(q(z|x) || N(0, I)), both per image value; there is no
perceptual or adversarial term. The loop (jdiff/train/loop.py) runs it as it runs the U-Net trainer. At the end
of training the PSNR of the held-out split's reconstructions (posterior mean, decoded, as uint8) goes to
WORKDIR/reconstruction_psnr.json and the logs.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jdiff import build, data, images, sharding
from jdiff.config import ConfigError, VAETrainConfig
from jdiff.latent import reconstruct
from jdiff.models.vae import AutoencoderKL, init_vae_params
from jdiff.train.state import TrainState, apply_gradients, fresh_state

PSNR_FILE = "reconstruction_psnr.json"
GRID_IMAGES = 32


def create_vae_state(config: VAETrainConfig, rng: jax.Array) -> TrainState:
  """A fresh state; call under jax.jit (or eval_shape) so initialisation compiles once."""
  return fresh_state(init_vae_params(AutoencoderKL(config.vae), rng), config.training)


def vae_loss(params, batch: dict, rng: jax.Array, *, config: VAETrainConfig) -> tuple[jax.Array, dict]:
  """(loss, metrics) of a batch reconstructed through a posterior sample drawn from `rng`."""
  x = batch["image"]
  x_hat, posterior = AutoencoderKL(config.vae).apply({"params": params}, x, rng)
  error = x_hat - x
  reconstruction = jnp.mean(jnp.abs(error) if config.loss.reconstruction == "l1" else jnp.square(error))
  kl = jnp.mean(posterior.kl()) / np.prod(x.shape[1:])
  loss = reconstruction + config.loss.kl_weight * kl
  return loss, {"reconstruction": reconstruction, "kl": kl, "mse": jnp.mean(jnp.square(error))}


def vae_train_step(state: TrainState, batch: dict, rng: jax.Array, *, config: VAETrainConfig):
  """Returns (new_state, metrics). The posterior sample is a function of (rng, state.step)."""
  step_rng = jax.random.fold_in(rng, state.step)
  (loss, metrics), grads = jax.value_and_grad(vae_loss, has_aux=True)(state.params, batch, step_rng, config=config)
  state, common = apply_gradients(state, loss, grads, config.training)
  return state, dict(metrics, **common)


class VAETrainer:
  resume_sections = ("vae",)
  step_inputs = ()

  def __init__(self, config: VAETrainConfig, raw: dict, workdir: str, mesh, start_step: int):
    channels = data.dataset_info(config.data).image_shape[-1]
    if channels != config.vae.in_channels:
      raise ConfigError(f"config.vae.in_channels={config.vae.in_channels} but {config.data.name!r} images have "
                        f"{channels} channel(s): set --config.vae.in_channels={channels}")
    self.config, self.raw, self.workdir, self.mesh = config, raw, workdir, mesh
    self.step = functools.partial(vae_train_step, config=config)
    self.init_state = functools.partial(create_vae_state, config)
    self.held_out = held_out_images(config)

  def describe(self, state: TrainState) -> str:
    vc = self.config.vae
    return (f"VAE with {build.param_count(state.params):,} parameters (latents {vc.latent_size}x{vc.latent_size}x"
            f"{vc.latent_channels})")

  def abstract_state(self) -> TrainState:
    return jax.eval_shape(self.init_state, jax.random.key(0))

  def batches(self, start_step: int):
    return data.make_train_iterator(self.config.data, self.config.training.batch_size, self.config.seed,
                                    process_index=jax.process_index(), process_count=jax.process_count(),
                                    start_step=start_step)

  def prepare(self, batch: dict, step: int) -> dict:
    return {"image": batch["image"]}

  def write_samples(self, state: TrainState, step: int, writer) -> None:
    """Held-out images (odd rows) above their reconstructions (even rows), logged and written as PNG."""
    originals = self.held_out[:GRID_IMAGES]
    columns = min(8, len(originals))
    originals = originals[:len(originals) // columns * columns]
    recons = reconstruct(self.config.vae, sharding.local_replica(state.ema_params, self.mesh), originals)
    rows = lambda x: x.reshape(-1, columns, *x.shape[1:])
    pairs = np.stack([rows(originals), rows(recons)], axis=1).reshape(-1, *originals.shape[1:])
    grid = images.make_grid(pairs, columns=columns)
    writer.write_images(step, {"reconstructions": grid[None]})
    if jax.process_index() == 0:
      images.save_png(grid, os.path.join(self.workdir, "samples", f"reconstructions_{step:07d}.png"))

  def evaluate(self, state: TrainState, step: int, writer) -> float:
    """The held-out reconstruction PSNR (mean over images, dB), to TensorBoard."""
    mean = float(np.mean(self._held_out_psnr(state)))
    writer.write_scalars(step, {"eval/psnr": mean})
    return mean

  def _held_out_psnr(self, state: TrainState) -> np.ndarray:
    return psnr(self.held_out, reconstruct(self.config.vae, sharding.local_replica(state.ema_params, self.mesh),
                                           self.held_out))

  def finish(self, state: TrainState, step: int, writer) -> dict:
    """Measures the held-out reconstruction PSNR; logs it and writes it to WORKDIR/reconstruction_psnr.json."""
    per_image = self._held_out_psnr(state)
    result = {"step": step, "split": self.config.evaluation.split, "num_images": len(self.held_out),
              "psnr_mean_db": float(np.mean(per_image)), "psnr_median_db": float(np.median(per_image))}
    writer.write_scalars(step, {"eval/psnr": result["psnr_mean_db"]})
    logging.info("reconstruction PSNR on %d %r images: %.2f dB (median %.2f dB)", len(self.held_out),
                 self.config.evaluation.split, result["psnr_mean_db"], result["psnr_median_db"])
    if jax.process_index() == 0:
      with open(os.path.join(self.workdir, PSNR_FILE), "w") as f:
        json.dump(result, f, indent=2)
    return result


def held_out_images(config: VAETrainConfig) -> np.ndarray:
  """uint8 images of the evaluation split, at the training size."""
  held_out, _ = data.load_split(dataclasses.replace(config.data, split=config.evaluation.split))
  return held_out[:config.evaluation.num_images or None]


def psnr(originals: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
  """Per-image PSNR in dB of uint8 images [N, ...] against their reconstructions, peak 255."""
  error = originals.astype(np.float64) - reconstructions.astype(np.float64)
  mse = np.mean(np.square(error).reshape(len(originals), -1), axis=1)
  return 10.0 * np.log10(255.0**2 / np.maximum(mse, 1e-10))
