"""Training the VAE: a pure loss and step, the loop `train_vae(config, workdir)`, reconstruction PSNR, and `load_vae`.

The loss is reconstruction (L1 or L2) + kl_weight * KL(q(z|x) || N(0, I)), both per image value; there is no
perceptual or adversarial term. The loop reuses the diffusion loop's machinery (data iterator, mesh, orbax
checkpoints with the config beside the state, clu writers) and, at the end, writes the PSNR of the held-out
split's reconstructions (posterior mean, decoded, as uint8) to WORKDIR/reconstruction_psnr.json and the logs.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions

from jdiff import data, generate
from jdiff.config import ConfigError, ParallelConfig, VAETrainConfig, parse_vae_config
from jdiff.models.vae import AutoencoderKL, VAEConfig, init_vae_params
from jdiff.train import checkpoint, distributed, sharding
from jdiff.train import loop as diffusion_loop  # a module import: the loop imports this module too (via latent)
from jdiff.train.state import TrainState, ema_decay_at, learning_rate_schedule, make_optimizer, param_count

PSNR_FILE = "reconstruction_psnr.json"
EVAL_BATCH = 128


def create_vae_state(config: VAETrainConfig, rng: jax.Array) -> TrainState:
  """A fresh state; call under jax.jit (or eval_shape) so initialisation compiles once."""
  params = init_vae_params(AutoencoderKL(config.vae), rng)
  tx = make_optimizer(config.training)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params, opt_state=tx.init(params))


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
  updates, opt_state = make_optimizer(config.training).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = ema_decay_at(state.step, config.training)
  ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
  metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                 learning_rate=learning_rate_schedule(config.training)(state.step))
  return TrainState(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state), metrics


def train_vae(raw_config, workdir: str) -> TrainState:
  """Trains (or resumes) the VAE of a configs/vae_*.py config in `workdir`; returns the final state."""
  config = parse_vae_config(raw_config)
  raw = raw_config.to_dict() if hasattr(raw_config, "to_dict") else dict(raw_config)
  distributed.split_host_cpu(ParallelConfig(), config.training.batch_size)  # one CPU device per core, as train.py
  mesh = sharding.make_mesh()
  sharding.check_batch_divides(config.training.batch_size, mesh)
  channels = data.dataset_info(config.data).image_shape[-1]
  if channels != config.vae.in_channels:
    raise ConfigError(f"config.vae.in_channels={config.vae.in_channels} but {config.data.name!r} images have "
                      f"{channels} channel(s): set --config.vae.in_channels={channels}")
  start = checkpoint.latest_step(workdir) or 0
  iterator = data.make_train_iterator(config.data, config.training.batch_size, config.seed,
                                      process_index=jax.process_index(), process_count=jax.process_count(),
                                      start_step=start)
  held_out = _held_out_images(config)
  manager = checkpoint.make_manager(workdir, keep=config.training.keep_checkpoints)
  state = _restore_or_init(config, raw, manager, mesh, start)
  logging.info("VAE with %d parameters (latents %dx%dx%d); training steps %d..%d on %d device(s)",
               param_count(state.params), config.vae.latent_size, config.vae.latent_size,
               config.vae.latent_channels, start, config.training.num_steps, mesh.size)
  repl = sharding.replicated(mesh)
  step_fn = jax.jit(functools.partial(vae_train_step, config=config),
                    in_shardings=(repl, sharding.batch_sharded(mesh), repl), out_shardings=(repl, repl),
                    donate_argnums=0)
  rng = jax.random.key(config.seed)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start == 0:
    writer.write_hparams(diffusion_loop._flatten(raw))
  progress = periodic_actions.ReportProgress(num_train_steps=config.training.num_steps, writer=writer)
  history, tc = [], config.training
  with metric_writers.ensure_flushes(writer):
    for step in range(start, tc.num_steps):
      batch = sharding.global_batch(next(iterator), mesh)
      state, metrics = step_fn(state, {"image": batch["image"]}, rng)
      history.append(metrics)
      done = step + 1
      progress(done)
      if done % tc.log_every == 0 or done == tc.num_steps:
        writer.write_scalars(done, diffusion_loop._mean_metrics(history))
        history = []
      if done % tc.checkpoint_every == 0 or done == tc.num_steps:
        checkpoint.save(manager, done, state, raw)
      if (tc.sample_every and done % tc.sample_every == 0) or done == tc.num_steps:
        write_reconstruction_grid(config.vae, state.ema_params, held_out[:32], workdir, done, writer)
    if start < tc.num_steps:
      write_psnr(config, state.ema_params, held_out, workdir, tc.num_steps, writer)
  manager.wait_until_finished()
  return state


def _restore_or_init(config: VAETrainConfig, raw: dict, manager, mesh, step: int) -> TrainState:
  repl = sharding.replicated(mesh)
  if not step:
    return jax.jit(functools.partial(create_vae_state, config), out_shardings=repl)(jax.random.key(config.seed))
  diffusion_loop.check_resumable(checkpoint.restore_config(manager, step), raw, sections=("vae",))
  logging.info("Resuming from checkpoint at step %d in %s", step, manager.directory)
  return checkpoint.restore_state(manager, step, _abstract_state(config, repl))


def _abstract_state(config: VAETrainConfig, sharding_) -> TrainState:
  shapes = jax.eval_shape(lambda: create_vae_state(config, jax.random.key(0)))
  return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_), shapes)


def _held_out_images(config: VAETrainConfig) -> np.ndarray:
  """uint8 images of the evaluation split, at the training size."""
  images, _ = data.load_split(dataclasses.replace(config.data, split=config.evaluation.split))
  return images[:config.evaluation.num_images or None]


@functools.partial(jax.jit, static_argnames="vae")
def _reconstruct(params, x, *, vae: VAEConfig):
  return AutoencoderKL(vae).apply({"params": params}, x)[0]


def reconstruct(vae: VAEConfig, params, images: np.ndarray, batch_size: int = EVAL_BATCH) -> np.ndarray:
  """uint8 reconstructions (posterior mean, decoded) of uint8 images [N, S, S, C], in fixed-size padded batches."""
  out = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)])
    x_hat = _reconstruct(params, data.uint8_to_model_range(padded), vae=vae)
    out.append(data.model_range_to_uint8(x_hat)[:len(chunk)])
  return np.concatenate(out)


def psnr(images: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
  """Per-image PSNR in dB of uint8 images [N, ...] against their reconstructions, peak 255."""
  error = images.astype(np.float64) - reconstructions.astype(np.float64)
  mse = np.mean(np.square(error).reshape(len(images), -1), axis=1)
  return 10.0 * np.log10(255.0**2 / np.maximum(mse, 1e-10))


def write_psnr(config: VAETrainConfig, params, images: np.ndarray, workdir: str, step: int, writer) -> dict:
  """Measures the held-out reconstruction PSNR; logs it and writes it to WORKDIR/reconstruction_psnr.json."""
  per_image = psnr(images, reconstruct(config.vae, params, images))
  result = {"step": step, "split": config.evaluation.split, "num_images": len(images),
            "psnr_mean_db": float(np.mean(per_image)), "psnr_median_db": float(np.median(per_image))}
  writer.write_scalars(step, {"eval/psnr": result["psnr_mean_db"]})
  logging.info("Reconstruction PSNR on %d %r images: %.2f dB (median %.2f dB)", len(images),
               config.evaluation.split, result["psnr_mean_db"], result["psnr_median_db"])
  if jax.process_index() == 0:
    with open(os.path.join(workdir, PSNR_FILE), "w") as f:
      json.dump(result, f, indent=2)
  return result


def write_reconstruction_grid(vae: VAEConfig, params, images: np.ndarray, workdir: str, step: int, writer) -> None:
  """Held-out images (odd rows) above their reconstructions (even rows), logged and written as PNG."""
  columns = min(8, len(images))
  rows = len(images) // columns
  originals = images[:rows * columns].reshape(rows, columns, *images.shape[1:])
  recons = reconstruct(vae, params, images[:rows * columns]).reshape(originals.shape)
  pairs = np.stack([originals, recons], axis=1).reshape(-1, *images.shape[1:])
  grid = generate.make_grid(pairs, columns=columns)
  writer.write_images(step, {"reconstructions": grid[None]})
  if jax.process_index() == 0:
    generate.save_png(grid, os.path.join(workdir, "samples", f"reconstructions_{step:07d}.png"))


@dataclasses.dataclass(frozen=True)
class TrainedVAE:
  """A VAE restored from its work dir: the typed config, EMA params and the checkpoint step."""
  config: VAETrainConfig
  params: dict
  step: int
  workdir: str


def load_vae(workdir: str, step: int | None = None) -> TrainedVAE:
  """Restores the VAE that train_vae wrote to `workdir` (its latest checkpoint, or `step`), EMA params."""
  workdir = os.path.abspath(workdir)
  steps = checkpoint.make_manager(workdir, create=False).all_steps() if checkpoint.latest_step(workdir) else []
  if not steps:
    raise FileNotFoundError(f"no VAE checkpoints in {workdir!r}: train one with `python train.py --config "
                            f"configs/vae_digits.py --workdir {workdir}`")
  step = max(steps) if step is None else step
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint at step {step} in VAE work dir {workdir!r}; available steps: "
                            f"{', '.join(map(str, sorted(steps)))}")
  manager = checkpoint.make_manager(workdir, create=False)
  raw = checkpoint.restore_config(manager, step)
  if "vae" not in raw:
    raise ConfigError(f"work dir {workdir!r} holds a diffusion model, not a VAE: pass the work dir of a "
                      "configs/vae_*.py run")
  config = parse_vae_config(raw)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state = checkpoint.restore_state(manager, step, _abstract_state(config, device))
  return TrainedVAE(config=config, params=state.ema_params, step=step, workdir=workdir)
