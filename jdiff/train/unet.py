"""The U-Net trainer: diffusion training on pixels or on a VAE's latents, with class labels or captions.

It supplies the loop (jdiff/train/loop.py) with the state, the pure step of jdiff/train/step.py, batches from the
input pipeline (captions tokenized; a latent run's images encoded on the devices), and sample grids made by the
same Pipeline that `jdiff.load` returns.
"""
from __future__ import annotations

import functools
import os

import jax
import numpy as np
from absl import logging

from jdiff import build, conditioning, data, images, sharding
from jdiff.config import Config, ConfigError, parse_config
from jdiff.metrics import fid, quality
from jdiff.pipeline import Pipeline
from jdiff.train import latent
from jdiff.train.state import TrainState
from jdiff.train.step import abstract_train_state, create_train_state, train_step

# Sections that fix the shapes and meaning of the parameters: resuming with other values is an error.
RESUME_SECTIONS = ("model", "diffusion")


class UNetTrainer:
  resume_sections = RESUME_SECTIONS

  def __init__(self, config: Config, raw: dict, workdir: str, mesh, start_step: int):
    self.workdir, self.mesh = workdir, mesh
    self.codec = self._encode = None
    if config.latent.enabled:
      self.codec, raw = latent.prepare_latents(config, raw, workdir, start_step)
      config = parse_config(raw)
      self._encode = latent.make_batch_encoder(self.codec, mesh, config.seed)
    self.config, self.raw = config, raw
    self.step_inputs = (config.diffusion.make_schedule(config.model.image_size),)
    self.step = functools.partial(train_step, config=config)
    self.init_state = functools.partial(create_train_state, config)
    self._evaluation = None  # (feature network, held-out split, reference statistics), made at the first evaluation

  def describe(self, state: TrainState) -> str:
    kind = "latent U-Net" if self.codec else "U-Net"
    return f"{kind} with {build.param_count(state.params):,} parameters"

  def abstract_state(self) -> TrainState:
    return abstract_train_state(self.config)

  def batches(self, start_step: int):
    config = self.config
    try:
      iterator = data.make_train_iterator(config.data, config.training.batch_size, config.seed,
                                          process_index=jax.process_index(), process_count=jax.process_count(),
                                          start_step=start_step, captions=bool(config.model.context_dim))
    except ValueError as e:  # By its contract: a bad split, batch size or process layout.
      raise ConfigError(f"config.data: {e}") from None
    if config.model.context_dim:
      iterator = map(functools.partial(tokenize_captions, config.text.tokenizer()), iterator)
    return iterator

  def prepare(self, batch: dict, step: int) -> dict:
    return self._encode(batch, step) if self._encode else batch

  def write_samples(self, state: TrainState, step: int, writer) -> None:
    """A grid of the config's num_samples images (one column per class or sample prompt) from the EMA params; for
    a model conditioned on images, `condition_grid` of held-out ones.

    The EMA params are first gathered whole onto each of this process's devices; every process then samples the
    same grid on its own, the batch split over its devices (no collectives).
    """
    params = sharding.local_replica(state.ema_params, self.mesh)
    pipe = Pipeline(config=self.config, params=params, step=step, codec=self.codec)
    if self.config.conditioning.kind == "none":
      samples = pipe.generate(num=self.config.sampling.num_samples)
      grid = images.make_grid(samples.images, samples.columns)
    else:
      grid = condition_grid(pipe, quality.real_split(pipe, "test"), min(self.config.sampling.num_samples, 10))
    write_sample_grid(writer, self.workdir, step, grid)

  def evaluate(self, state: TrainState, step: int, writer) -> dict:
    """The Fréchet and kernel distances of training.eval_samples samples (the config's sampler, conditioned like
    the 'test' split, seeds 0..) to the 'train' split, on the features of a network trained on the dataset
    (jdiff/metrics/features.py; trained and cached in the data dir at the first evaluation)."""
    pipe = Pipeline(config=self.config, params=sharding.local_replica(state.ema_params, self.mesh), step=step,
                    codec=self.codec)
    if self._evaluation is None:
      network = quality.own_features(pipe)
      reference = fid.FeatureStats.of(network(quality.real_split(pipe, "train").images), network.space)
      self._evaluation = network, quality.real_split(pipe, "test"), reference
    network, held_out, reference = self._evaluation
    num = self.config.training.eval_samples
    images, _ = quality.generate_like(pipe, held_out, num, warm_up=False)
    result = quality.distances(network(images), reference, network.space,
                               kid_subset_size=min(num, reference.count, quality.KID_SUBSET_SIZE))
    name = self.config.data.name
    writer.write_scalars(step, {f"eval/fd_{name}_features": result["fd"], f"eval/kd_{name}_features": result["kd"]})
    logging.info("step %d: Fréchet distance %.4g, kernel distance %.4g on %s (%d samples)", step, result["fd"],
                 result["kd"], network.name, num)
    return result

  def finish(self, state: TrainState, step: int, writer) -> None:
    pass


def condition_grid(pipe: Pipeline, held_out, num: int) -> np.ndarray:
  """Three rows of `num` held-out images: what the model is given (the low-resolution image upsampled, or the
  image with its left half masked out), what it makes of it (seeds 0..), and the real image."""
  real = held_out.images[:num]
  x = images.uint8_to_model_range(real)
  cc = pipe.config.conditioning
  labels = held_out.labels["label"][:num] if pipe.config.model.num_classes else None
  if cc.kind == "super_resolution":
    low = images.model_range_to_uint8(conditioning.low_resolution(x, cc.scale))
    given = conditioning.super_resolution_condition(images.uint8_to_model_range(low), *real.shape[1:3], cc.upsample)
    made = pipe.upscale(low, label=labels).images
  else:
    mask = conditioning.half_mask("left", *real.shape[1:3])[..., 0]
    given = conditioning.masked(x, mask[..., None])
    made = pipe.inpaint_model(real, mask, label=labels).images
  return images.make_grid(np.concatenate([images.model_range_to_uint8(given), made, real]), num)


def write_sample_grid(writer, workdir: str, step: int, grid) -> None:
  """A training run's sample grid: to the metric writer, and (process 0) to WORKDIR/samples/step_N.png."""
  writer.write_images(step, {"samples": grid[None]})
  if jax.process_index() == 0:
    path = os.path.join(workdir, "samples", f"step_{step:07d}.png")
    images.save_png(grid, path)
    logging.info("sample grid written to %s", path)


def tokenize_captions(tokenizer, batch: dict) -> dict:
  """The batch with its "caption" strings replaced by "tokens", int32 ids [B, max_length]."""
  batch = dict(batch)
  batch["tokens"] = tokenizer.encode(batch.pop("caption"))
  return batch
