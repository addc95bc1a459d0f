"""The ControlNet trainer: a ControlNet learns to steer a frozen base model (config.finetune.base) with control
images, through the one training loop.

The base (a jdiff work dir or a diffusers directory, read with jdiff.load) fixes the run's model, diffusion and text
sections; the checkpoints store the config with them, so the run describes itself. The train state (params, EMA,
optimizer moments) holds the ControlNet alone; the base's params are a frozen input of the step. The ControlNet's
encoder starts as a copy of the base U-Net's, its zero convolutions at zero: step 0 predicts what the base does.
Batches come from a dataset that draws control images with its examples (shapes: silhouettes or edge maps).
"""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

import jdiff
from jdiff import build, diffusion, images, sharding
from jdiff.config import Config, ConfigError, parse_config
from jdiff.control import Control
from jdiff.data import shapes
from jdiff.generate import text_context
from jdiff.models.controlnet import ControlNet, example_inputs, params_from_unet
from jdiff.models.unet import UNet
from jdiff.pipeline import Pipeline
from jdiff.schedules import Schedule
from jdiff.train.state import TrainState, apply_gradients, fresh_state
from jdiff.train.step import training_draws
from jdiff.train.unet import tokenize_captions, write_sample_grid

RESUME_SECTIONS = ("model", "diffusion", "finetune", "controlnet")
BASE_SECTIONS = ("model", "diffusion", "latent")  # taken whole from the base
BASE_TEXT_FIELDS = ("max_length", "width", "depth", "num_heads", "mlp_dim", "causal", "activation", "vocab_size")


def load_base(config: Config) -> Pipeline:
  base = config.finetune.base
  if not base:
    raise ConfigError("a ControlNet trains on a base model: set --config.finetune.base to its work dir or diffusers "
                      "directory")
  if not os.path.isdir(base):
    raise ConfigError(f"config.finetune.base={base!r} is not a directory: give a jdiff work dir or a diffusers "
                      "directory")
  return jdiff.load(base)


def with_base(raw: dict, base: Config) -> dict:
  """The raw config with the base's model, diffusion and latent sections, its image size and its text encoder's
  architecture."""
  raw = dict(raw)
  for section in BASE_SECTIONS:
    raw[section] = dataclasses.asdict(getattr(base, section))
  raw["data"] = dict(raw.get("data", {}), image_size=base.data.image_size)
  raw["text"] = dict(raw.get("text", {}), **{k: getattr(base.text, k) for k in BASE_TEXT_FIELDS},
                     trainable=False)
  raw["finetune"] = dict(raw.get("finetune", {}), base=os.path.abspath(raw["finetune"]["base"]))
  return raw


def make_controlnet(config: Config) -> ControlNet:
  cc = config.controlnet
  return ControlNet(config.model, cc.conditioning_channels, cc.embedding_channels)


def controlnet_loss(params, base_params, batch: dict, rng: jax.Array, schedule: Schedule, *,
                    config: Config) -> jax.Array:
  """The diffusion loss of the frozen base U-Net steered by the ControlNet (params) with batch["control"]."""
  draws, dropout_rng = training_draws(rng, batch, config)
  x0, t, noise = batch["image"], draws["t"], draws["noise"]
  x_t = diffusion.q_sample(schedule, x0, t, noise)
  t = t.astype(jnp.float32)
  labels, context, unet_params = draws.get("labels"), None, base_params
  if config.model.context_dim:
    model = build.make_model(config)
    context = jax.lax.stop_gradient(text_context(model, base_params, labels))
    labels, unet_params = None, base_params["unet"]
  rngs = {"dropout": dropout_rng}
  residuals = make_controlnet(config).apply({"params": params}, x_t, t, batch["control"], labels, context=context,
                                            train=True, rngs=rngs)
  pred = UNet(config.model).apply({"params": jax.lax.stop_gradient(unet_params)}, x_t, t, labels, context=context,
                                  residuals=residuals, train=True, rngs=rngs)
  losses = diffusion.diffusion_loss(pred, schedule=schedule, x0=x0, noise=noise, t=draws["t"],
                                    prediction=config.diffusion.prediction,
                                    min_snr_gamma=config.diffusion.min_snr_gamma)
  return jnp.mean(losses)


def controlnet_step(state: TrainState, batch: dict, rng: jax.Array, schedule: Schedule, base_params, *,
                    config: Config):
  step_rng = jax.random.fold_in(rng, state.step)
  loss, grads = jax.value_and_grad(controlnet_loss)(state.params, base_params, batch, step_rng, schedule,
                                                     config=config)
  return apply_gradients(state, loss, grads, config.training)


def init_controlnet_state(config: Config, unet_params, rng: jax.Array) -> TrainState:
  """A fresh state: the ControlNet's encoder copied from the base U-Net, the rest freshly initialised."""
  model = make_controlnet(config)
  x, t, control, labels, context = example_inputs(model)
  fresh = model.init(rng, x, t, control, labels, context=context)["params"]
  return fresh_state(params_from_unet(fresh, unet_params), config.training)


class ControlNetTrainer:
  resume_sections = RESUME_SECTIONS

  def __init__(self, config: Config, raw: dict, workdir: str, mesh, start_step: int):
    self.workdir, self.mesh = workdir, mesh
    base = load_base(config)
    if base.codec is not None:
      raise ConfigError(f"config.finetune.base={config.finetune.base!r} is a latent model; ControlNet training "
                        "here takes a pixel base")
    if config.data.name != "shapes":
      raise ConfigError(f"config.data.name={config.data.name!r}: ControlNet training draws its control images with "
                        "the examples, which the 'shapes' dataset does")
    raw = with_base(raw, base.config)
    config = parse_config(raw)
    self.config, self.raw, self.base = config, raw, base
    self.base_params = jax.device_put(base.params, sharding.replicated(mesh))
    self.unet_params = self.base_params["unet"] if config.model.context_dim else self.base_params
    self.step_inputs = (base.schedule, self.base_params)
    self.step = functools.partial(controlnet_step, config=config)
    self._fixed = shapes.control_examples(config.sampling.num_samples, config.seed, (1 << 20,), config.data.image_size,
                                          config.controlnet.condition)

  def init_state(self, rng: jax.Array) -> TrainState:
    return init_controlnet_state(self.config, self.unet_params, rng)

  def abstract_state(self) -> TrainState:
    return jax.eval_shape(self.init_state, jax.random.key(0))

  def describe(self, state: TrainState) -> str:
    return (f"ControlNet with {build.param_count(state.params):,} parameters on the frozen base "
            f"{self.config.finetune.base} ({build.param_count(self.base_params):,})")

  def batches(self, start_step: int):
    config = self.config
    iterator = shapes.control_batches(config.training.batch_size // jax.process_count(), config.seed,
                                      config.data.image_size, config.controlnet.condition,
                                      process_index=jax.process_index(), start_step=start_step)
    if config.model.context_dim:
      iterator = map(functools.partial(tokenize_captions, config.text.tokenizer()), iterator)
    return iterator

  def prepare(self, batch: dict, step: int) -> dict:
    return batch

  def pipeline(self, params) -> Pipeline:
    """The base pipeline steered by the ControlNet with `params`."""
    return dataclasses.replace(self.base, controlnet=Control(make_controlnet(self.config), params))

  def write_samples(self, state: TrainState, step: int, writer) -> None:
    """Fixed control images beside what the EMA ControlNet generates from them and their captions."""
    pipe = self.pipeline(sharding.local_replica(state.ema_params, self.mesh))
    fixed = self._fixed
    prompts = [str(c) for c in fixed["caption"]] if self.config.model.context_dim else None
    labels = fixed["label"] if self.config.model.num_classes else None
    samples = pipe.generate(prompts, label=labels, num=len(fixed["control"]), control_image=fixed["control"],
                            control_scale=self.config.controlnet.scale)
    controls = np.repeat(fixed["control"], samples.images.shape[-1], axis=-1)
    grid = images.make_grid(np.concatenate([controls, samples.images], axis=2), 6)
    write_sample_grid(writer, self.workdir, step, grid)

  def finish(self, state: TrainState, step: int, writer) -> None:
    pass
