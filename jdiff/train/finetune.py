"""The fine-tuning trainer: config.finetune.base, loaded with jdiff.load, trained further through the one loop.

Two ways, chosen by config.lora.rank:
- full fine-tuning (rank 0): the state's params start as the base's, and every weight trains;
- LoRA (rank > 0): the state's params are the adapters alone (jdiff/lora.py), so the optimizer's moments, the EMA
  and the checkpoints hold nothing of the frozen base. The base's params reach the jitted step as an input, and
  the step differentiates the loss of apply_adapters(base, adapters) with respect to the adapters only. The models
  are untouched: a LoRA is a transform of the params tree. At the end the EMA adapters are written to
  WORKDIR/lora.safetensors, the file diffusers' load_lora_weights and jdiff's Pipeline.with_lora read.

Data: the config's dataset, or with config.dreambooth DreamBooth's few instance images under their prompt, plus
(prior preservation) images the base generated for the class prompt before training, made once and kept in
WORKDIR/class_images.npz so that a resumed run trains on the same ones.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

import jdiff
from jdiff import images, lora, sharding, tokenizer as tokenizers
from jdiff.config import Config, ConfigError, parse_config
from jdiff.pipeline import Pipeline
from jdiff.train import unet
from jdiff.train.state import TrainState, apply_gradients, fresh_state
from jdiff.train.step import diffusion_training_loss

RESUME_SECTIONS = ("model", "diffusion", "finetune", "lora", "dreambooth")
TEXT_ARCHITECTURE = ("max_length", "width", "depth", "num_heads", "mlp_dim", "causal", "activation", "vocab_size")
CLASS_IMAGES = "class_images.npz"


def with_base(raw: dict, base: Pipeline) -> dict:
  """The raw config with the base's model, diffusion settings and text encoder architecture in place of its own."""
  if base.codec is not None:
    raise ConfigError(f"config.finetune.base={raw['finetune']['base']!r} is a latent model: fine-tuning trains "
                      "pixel models (the VAE would have to come with it)")
  if base.source and base.is_text_model:
    raise ConfigError(f"config.finetune.base={raw['finetune']['base']!r} is a diffusers text-to-image model: "
                      "training reads prompts with jdiff's tokenizer, not its CLIP tokenizer; fine-tune a jdiff work "
                      "dir, or train a LoRA of it elsewhere and apply it with Pipeline.with_lora")
  raw = dict(raw)
  raw["model"] = dataclasses.asdict(base.config.model)
  raw["diffusion"] = dataclasses.asdict(base.config.diffusion)
  raw["data"] = dict(raw.get("data", {}), image_size=base.config.model.image_size)
  if base.is_text_model:
    raw["text"] = dict(raw.get("text", {}), **{f: getattr(base.config.text, f) for f in TEXT_ARCHITECTURE})
  return raw


class FinetuneTrainer(unet.UNetTrainer):
  """UNetTrainer's batches, samples and evaluations, on a base model's weights; see the module docstring."""
  resume_sections = RESUME_SECTIONS

  def __init__(self, config: Config, raw: dict, workdir: str, mesh, start_step: int):
    base = jdiff.load(config.finetune.base)
    raw = with_base(raw, base)
    config = parse_config(raw)
    super().__init__(config, raw, workdir, mesh, start_step)
    self.base_params = sharding.local_replica(base.params, mesh)
    self.tokenizer = prompt_tokenizer(config)
    if config.lora.enabled:
      if config.training.grad_accum_steps != 1:
        raise ConfigError(f"config.training.grad_accum_steps={config.training.grad_accum_steps}: LoRA training "
                          "takes whole batches (set it to 1; its memory is the adapters', small already)")
      components = ("unet", "text_encoder") if config.lora.text_encoder else ("unet",)
      self.paths = lora.target_paths(base.params, config.lora.targets, components)
      if not self.paths:
        raise ConfigError(f"config.lora.targets={config.lora.targets} adapt no weight of this model")
      self.step_inputs = (config.diffusion.make_schedule(), self.base_params)
      self.step = functools.partial(lora_train_step, config=config)
      self.init_state = self._init_adapters
    else:
      self.init_state = self._init_full
      if config.dreambooth.enabled:
        self.step = functools.partial(dreambooth_step, config=config)
    self._class_images = None

  def describe(self, state: TrainState) -> str:
    count = lambda tree: sum(x.size for x in jax.tree_util.tree_leaves(tree))
    if self.config.lora.enabled:
      lc = self.config.lora
      return (f"LoRA of rank {lc.rank} (scale {lc.scale:g}) on {len(self.paths)} kernels of "
              f"{self.config.finetune.base}: {count(state.params):,} trainable parameters, "
              f"{count(self.base_params):,} frozen")
    return f"full fine-tuning of {self.config.finetune.base}: {count(state.params):,} parameters"

  def _init_adapters(self, rng: jax.Array) -> TrainState:
    adapters = lora.init_adapters(rng, self.base_params, self.paths, self.config.lora.rank)
    return fresh_state(adapters, self.config.training)

  def _init_full(self, rng: jax.Array) -> TrainState:
    del rng
    return fresh_state(jax.tree_util.tree_map(jnp.array, self.base_params), self.config.training)

  def abstract_state(self) -> TrainState:
    return jax.eval_shape(self.init_state, jax.random.key(0))

  def params_of(self, adapters_or_params):
    """The model's params for a state's params (LoRA: the adapters merged into the base)."""
    if not self.config.lora.enabled:
      return adapters_or_params
    return jax.jit(functools.partial(lora.apply_adapters, scale=self.config.lora.scale))(self.base_params,
                                                                                         adapters_or_params)

  def _pipeline(self, state: TrainState, step: int) -> Pipeline:
    params = sharding.local_replica(self.params_of(state.ema_params), self.mesh)
    return Pipeline(config=self.config, params=params, step=step, tokenizer=self.tokenizer)

  def write_samples(self, state: TrainState, step: int, writer) -> None:
    pipe = self._pipeline(state, step)
    prompts = self.config.text.sample_prompts or None
    if self.config.dreambooth.enabled:
      prompts = [self.config.dreambooth.instance_prompt, *(prompts or ())]
    samples = pipe.generate(prompts and [prompts[i % len(prompts)] for i in range(self.config.sampling.num_samples)],
                            num=self.config.sampling.num_samples)
    grid = images.make_grid(samples.images, len(prompts) if prompts else None)
    unet.write_sample_grid(writer, self.workdir, step, grid)

  def finish(self, state: TrainState, step: int, writer) -> None:
    if self.config.lora.enabled and jax.process_index() == 0:
      path = os.path.join(self.workdir, lora.WORKDIR_FILE)
      lc = self.config.lora
      lora.save(lora.from_adapters(state.ema_params, lc.rank, lc.alpha or lc.rank), self.base_params, path)
      logging.info("LoRA (EMA adapters) written to %s", path)

  def batches(self, start_step: int):
    if not self.config.dreambooth.enabled:
      return super().batches(start_step)
    return self._dreambooth_batches(start_step)

  def _dreambooth_batches(self, start_step: int):
    db, tc = self.config.dreambooth, self.config.training
    instances = load_instance_images(db.instance_images, self.config.model.image_size)
    classes = self.class_images() if db.prior_weight else None
    instance_tokens = self.tokenizer.encode(db.instance_prompt)[0]
    class_tokens = self.tokenizer.encode(db.class_prompt)[0]
    half = tc.batch_size // 2 if classes is not None else tc.batch_size
    for step in range(start_step, tc.num_steps + 1):
      rng = np.random.default_rng([self.config.seed, step])
      chosen = instances[rng.integers(len(instances), size=half)]
      batch = {"image": images.uint8_to_model_range(chosen), "tokens": np.tile(instance_tokens, (half, 1))}
      if classes is not None:
        prior = classes[rng.integers(len(classes), size=tc.batch_size - half)]
        batch = {"image": np.concatenate([batch["image"], images.uint8_to_model_range(prior)]),
                 "tokens": np.concatenate([batch["tokens"], np.tile(class_tokens, (tc.batch_size - half, 1))])}
      yield batch

  def class_images(self) -> np.ndarray:
    """The base's images for the class prompt, generated once (seeds 0..) and kept in WORKDIR/class_images.npz."""
    db = self.config.dreambooth
    path = os.path.join(self.workdir, CLASS_IMAGES)
    if os.path.exists(path):
      return np.load(path)["image"]
    pipe = Pipeline(config=self.config, params=self.base_params, tokenizer=self.tokenizer)
    made = pipe.generate(db.class_prompt, num=db.num_class_images, guidance_scale=db.class_guidance_scale).images
    if jax.process_index() == 0:
      os.makedirs(self.workdir, exist_ok=True)
      temporary = path + ".tmp.npz"
      np.savez(temporary, image=made)
      os.replace(temporary, path)
      logging.info("%d class images of %r written to %s", len(made), db.class_prompt, path)
    return made


def prompt_tokenizer(config: Config) -> tokenizers.Tokenizer:
  """The config's tokenizer; with DreamBooth, the identifier takes the id of config.dreambooth.replaces."""
  db = config.dreambooth
  if not db.enabled:
    return config.text.tokenizer()
  try:
    tokenizer = tokenizers.with_identifier(config.text.tokenizer(), db.identifier, db.replaces)
    tokenizer.encode([db.instance_prompt, db.class_prompt])  # raises, naming the word, for one it cannot read
  except ValueError as e:
    raise ConfigError(f"config.dreambooth: {e}") from None
  return tokenizer


def load_instance_images(path: str, size: int) -> np.ndarray:
  """uint8 [N, size, size, C] from the .npz's "image"."""
  if not os.path.isfile(path):
    raise ConfigError(f"config.dreambooth.instance_images={path!r} is not a file: give an .npz whose 'image' holds "
                      "uint8 [N, H, W, C] images")
  found = np.load(path)["image"]
  if found.dtype != np.uint8 or found.ndim != 4 or found.shape[1:3] != (size, size):
    raise ConfigError(f"config.dreambooth.instance_images={path!r} holds {found.dtype} {list(found.shape)}: expected "
                      f"uint8 [N, {size}, {size}, C] images at the model's size")
  return found


def _loss(params, batch: dict, rng: jax.Array, schedule, config: Config) -> jax.Array:
  """The diffusion loss; with DreamBooth's prior preservation, the instance half's plus prior_weight times the class
  half's."""
  db = config.dreambooth
  if not (db.enabled and db.prior_weight):
    return diffusion_training_loss(params, batch, rng, schedule, config=config)
  half = batch["image"].shape[0] // 2
  part = lambda s: jax.tree_util.tree_map(lambda x: x[s], batch)
  k_instance, k_class = jax.random.split(rng)
  return (diffusion_training_loss(params, part(slice(None, half)), k_instance, schedule, config=config)
          + db.prior_weight * diffusion_training_loss(params, part(slice(half, None)), k_class, schedule,
                                                      config=config))


def dreambooth_step(state: TrainState, batch: dict, rng: jax.Array, schedule, *, config: Config):
  """Full fine-tuning's step with DreamBooth's loss."""
  step_rng = jax.random.fold_in(rng, state.step)
  loss, grads = jax.value_and_grad(_loss)(state.params, batch, step_rng, schedule, config)
  return apply_gradients(state, loss, grads, config.training)


def lora_train_step(state: TrainState, batch: dict, rng: jax.Array, schedule, base_params, *, config: Config):
  """(new state, metrics): the gradient reaches the adapters (state.params) only; base_params stay as they are."""
  step_rng = jax.random.fold_in(rng, state.step)
  scale = config.lora.scale
  loss_fn = lambda adapters: _loss(lora.apply_adapters(base_params, adapters, scale), batch, step_rng, schedule,
                                   config)
  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return apply_gradients(state, loss, grads, config.training)

