"""Typed, validated configuration.

Config files (configs/*.py) return an ml_collections.ConfigDict with the sections below. `parse_config`
turns it into frozen dataclasses, checking every key up front: an unknown or misspelt field, or a bad
value, raises ConfigError naming the field and what is allowed, before anything is written.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
from typing import Any, Mapping

from jdiff import conditioning, diffusion, flow, samplers, schedules
from jdiff.models.text import TextEncoderConfig
from jdiff.models.unet import UNetConfig
from jdiff.models.vae import VAEConfig
from jdiff.tokenizer import Tokenizer


class ConfigError(ValueError):
  """A configuration field has an unknown name or a value that is not allowed."""


NONFINITE_POLICIES = ("stop", "skip")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which images to train on and how to prepare them.

  name: a TFDS dataset with 'image' (uint8) and 'label' (ClassLabel) features; 'sklearn_digits' works offline.
  split: a TFDS split, slices included ('train', 'test', 'train[:90%]').
  image_size: images are resized (bilinear, antialiased) to image_size x image_size; channels stay as they are.
  random_flip: mirror half the images left-right (leave off for digits, whose mirror images are not digits).
  data_dir: the TFDS data dir; None uses TFDS's default (TFDS_DATA_DIR or ~/tensorflow_datasets).
  shuffle_buffer: the tf.data shuffle buffer of streamed datasets (in-memory ones are fully shuffled each epoch).
  caption_template: for text-to-image training on a dataset without a 'caption' feature, each caption is this
    template with "{label}" replaced by the class name (e.g. "a photo of a {label}"; digits' names are "0".."9").
  """
  name: str = "sklearn_digits"
  split: str = "train"
  image_size: int = 16
  random_flip: bool = False
  data_dir: str | None = None
  shuffle_buffer: int = 10_000
  caption_template: str = "{label}"

  def __post_init__(self):
    _check(_is_nonempty_str(self.name), "name", self.name,
           "a TFDS dataset name such as 'sklearn_digits', 'mnist' or 'cifar10'")
    _check(_is_nonempty_str(self.split), "split", self.split, "a TFDS split such as 'train', 'test' or 'train[:90%]'")
    _check(_is_int(self.image_size) and self.image_size > 0, "image_size", self.image_size, "a positive integer")
    _check(isinstance(self.random_flip, bool), "random_flip", self.random_flip, "True or False")
    _check(self.data_dir is None or _is_nonempty_str(self.data_dir), "data_dir", self.data_dir,
           "None or a directory path")
    _check(_is_int(self.shuffle_buffer) and self.shuffle_buffer > 0, "shuffle_buffer", self.shuffle_buffer,
           "a positive integer")
    _check(isinstance(self.caption_template, str) and "{label}" in self.caption_template, "caption_template",
           self.caption_template, "a string containing '{label}'")


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
  schedule: str = "linear"
  num_timesteps: int = 1000
  prediction: str = "eps"
  min_snr_gamma: float = 0.0  # 0 = L_simple; e.g. 5.0 = min-SNR-5 weighting
  label_dropout: float = 0.1  # share of labels replaced by the null class, for classifier-free guidance
  zero_terminal_snr: bool = False  # rescale the schedule so its last timestep is pure noise (Lin et al., 2024)
  # prediction "flow" (jdiff/flow.py): x_s = (1 - s) x0 + s eps, velocity target; `schedule` is then unused. Training
  # draws s from flow_density (logit-normal: flow_logit_mean, flow_logit_std; mode: flow_mode_scale), then shifts
  # it by flow_shift, or, with flow_resolution_shift, by exp(mu) of the image's (image_size / flow_patch_size)^2
  # patches, mu interpolated from flow_base_shift at flow_base_seq_len to flow_max_shift at flow_max_seq_len.
  flow_density: str = "logit_normal"
  flow_logit_mean: float = 0.0
  flow_logit_std: float = 1.0
  flow_mode_scale: float = 1.29
  flow_shift: float = 1.0
  flow_resolution_shift: bool = False
  flow_patch_size: int = 2
  flow_base_shift: float = 0.5
  flow_max_shift: float = 1.15
  flow_base_seq_len: int = 256
  flow_max_seq_len: int = 4096

  def __post_init__(self):
    _check_choice("schedule", self.schedule, schedules.SCHEDULE_NAMES)
    _check_choice("prediction", self.prediction, diffusion.MODEL_PREDICTIONS)
    _check(self.num_timesteps >= 2, "num_timesteps", self.num_timesteps, "an integer >= 2")
    _check(self.min_snr_gamma >= 0, "min_snr_gamma", self.min_snr_gamma, ">= 0 (0 disables it)")
    _check(0 <= self.label_dropout < 1, "label_dropout", self.label_dropout, "in [0, 1)")
    _check(isinstance(self.zero_terminal_snr, bool), "zero_terminal_snr", self.zero_terminal_snr, "True or False")
    _check(not (self.zero_terminal_snr and self.prediction == "eps"), "zero_terminal_snr", self.zero_terminal_snr,
           "False with prediction 'eps' (pure noise says nothing about x0 through eps): predict 'v' or 'x0'")
    self._check_flow()

  def _check_flow(self) -> None:
    _check_choice("flow_density", self.flow_density, flow.DENSITIES)
    _check(self.flow_logit_std > 0, "flow_logit_std", self.flow_logit_std, "> 0")
    _check(-1.0 <= self.flow_mode_scale <= 2.0 / (math.pi - 2.0), "flow_mode_scale", self.flow_mode_scale,
           "in [-1, 2 / (pi - 2) = 1.752] (where the mode density is a density)")
    _check(self.flow_shift > 0, "flow_shift", self.flow_shift, "> 0 (1 = no shift)")
    _check(isinstance(self.flow_resolution_shift, bool), "flow_resolution_shift", self.flow_resolution_shift,
           "True or False")
    _check(not (self.flow_resolution_shift and self.flow_shift != 1.0), "flow_shift", self.flow_shift,
           "1.0 with flow_resolution_shift=True (the resolution gives the shift)")
    _check(self.flow_patch_size >= 1, "flow_patch_size", self.flow_patch_size, "an integer >= 1")
    _check(self.flow_max_seq_len > self.flow_base_seq_len >= 1, "flow_max_seq_len", self.flow_max_seq_len,
           f"an integer > flow_base_seq_len={self.flow_base_seq_len} >= 1")
    if self.prediction == "flow":
      _check(self.min_snr_gamma == 0, "min_snr_gamma", self.min_snr_gamma, "0 with prediction 'flow'")
      _check(not self.zero_terminal_snr, "zero_terminal_snr", self.zero_terminal_snr,
             "False with prediction 'flow' (its last level is pure noise already)")

  def flow_shift_for(self, image_size: int) -> float:
    """The flow's shift a for inputs image_size x image_size (see jdiff/flow.py): static or resolution-dependent."""
    if not self.flow_resolution_shift:
      return float(self.flow_shift)
    return flow.resolution_shift(image_size, patch_size=self.flow_patch_size, base_seq_len=self.flow_base_seq_len,
                                 max_seq_len=self.flow_max_seq_len, base_shift=self.flow_base_shift,
                                 max_shift=self.flow_max_shift)

  def make_schedule(self, image_size: int | None = None) -> schedules.Schedule:
    """The schedule; a flow model's is flow.flow_schedule with its shift, which needs the (latent) image_size when
    the shift depends on the resolution."""
    if self.prediction == "flow":
      if self.flow_resolution_shift and image_size is None:
        raise ValueError("a resolution-dependent flow shift needs the image size: make_schedule(image_size)")
      return flow.flow_schedule(self.num_timesteps, self.flow_shift_for(image_size or 0))
    return schedules.make_schedule(self.schedule, self.num_timesteps, zero_terminal_snr=self.zero_terminal_snr)


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
  batch_size: int = 128
  num_steps: int = 800_000
  learning_rate: float = 2e-4
  warmup_steps: int = 5000
  weight_decay: float = 0.0
  grad_clip: float = 1.0  # global-norm clipping; 0 disables it
  ema_decay: float = 0.9999
  ema_warmup: bool = False  # ramp the EMA decay as min(ema_decay, (1 + step) / (10 + step))
  log_every: int = 100
  checkpoint_every: int = 5000
  keep_checkpoints: int = 3
  sample_every: int = 10_000  # 0 = only at the end
  nonfinite: str = "stop"  # a step with a non-finite loss or gradient: "stop" training, or "skip" it and count it
  grad_accum_steps: int = 1  # split each batch into this many micro-batches, summing their gradients
  remat: bool = False  # recompute U-Net block activations in the backward pass: less memory, ~1/3 more compute
  # Every eval_every steps (0 = never) the trainer's evaluation goes to TensorBoard: for a diffusion model the
  # Fréchet and kernel distances of eval_samples samples on its dataset's features; for a VAE the held-out PSNR.
  eval_every: int = 0
  eval_samples: int = 500

  def __post_init__(self):
    for name in ("batch_size", "num_steps", "log_every", "checkpoint_every", "keep_checkpoints",
                 "grad_accum_steps"):
      _check(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
    _check(self.eval_samples >= 2, "eval_samples", self.eval_samples, "an integer >= 2")
    for name in ("warmup_steps", "sample_every", "eval_every"):
      _check(getattr(self, name) >= 0, name, getattr(self, name), "an integer >= 0")
    _check(self.learning_rate > 0, "learning_rate", self.learning_rate, "> 0")
    _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
    _check(self.grad_clip >= 0, "grad_clip", self.grad_clip, ">= 0 (0 disables clipping)")
    _check(0 <= self.ema_decay < 1, "ema_decay", self.ema_decay, "in [0, 1)")
    _check_choice("nonfinite", self.nonfinite, NONFINITE_POLICIES)
    _check(self.batch_size % self.grad_accum_steps == 0, "grad_accum_steps", self.grad_accum_steps,
           f"a divisor of batch_size={self.batch_size}")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Defaults for the sample grids written during training and for sample.py."""
  sampler: str = "ddim"
  steps: int = 50
  spacing: str = "trailing"  # timestep spacing: leading, trailing, linspace; or karras sigmas
  guidance_scale: float = 1.0
  eta: float = 0.0
  num_samples: int = 64
  # Clip each denoised estimate to [-1, 1]: None decides from the data range (on for pixels, off for latents).
  clip_x0: bool | None = None

  def __post_init__(self):
    _check_choice("sampler", self.sampler, samplers.SAMPLERS)
    _check_choice("spacing", self.spacing, samplers.SPACINGS)
    _check(self.steps >= 1, "steps", self.steps, "an integer >= 1")
    _check(self.guidance_scale >= 0, "guidance_scale", self.guidance_scale, ">= 0")
    _check(self.eta >= 0, "eta", self.eta, ">= 0")
    _check(self.num_samples >= 1, "num_samples", self.num_samples, "an integer >= 1")


DISTRIBUTED_MODES = ("auto", "on", "off")
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
  """The device mesh and multi-process start-up (docs/scaling.md).

  fsdp: size of the mesh's `fsdp` axis, over which parameters, EMA and optimizer moments are sharded; the
    `data` axis takes the remaining devices, and the batch is split over both. 1 = plain data parallelism.
  distributed: 'auto' calls jax.distributed.initialize when a coordinator address is given here or in
    JAX_COORDINATOR_ADDRESS; 'on' always calls it (JAX detects TPU pods, SLURM, Open MPI); 'off' never does.
  coordinator_address, num_processes, process_id: passed to jax.distributed.initialize; None = JAX's own
    detection from the cluster environment.
  """
  fsdp: int = 1
  distributed: str = "auto"
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None

  def __post_init__(self):
    _check(_is_int(self.fsdp) and self.fsdp >= 1, "fsdp", self.fsdp, "an integer >= 1 (1 = no parameter sharding)")
    _check_choice("distributed", self.distributed, DISTRIBUTED_MODES)
    _check(self.coordinator_address is None or (isinstance(self.coordinator_address, str)
                                                and self.coordinator_address.rpartition(":")[2].isdigit()),
           "coordinator_address", self.coordinator_address, "None or 'host:port'")
    _check(self.num_processes is None or (_is_int(self.num_processes) and self.num_processes >= 1),
           "num_processes", self.num_processes, "None or an integer >= 1")
    _check(self.process_id is None or (_is_int(self.process_id) and self.process_id >= 0
                                       and (self.num_processes is None or self.process_id < self.num_processes)),
           "process_id", self.process_id, f"None or an integer in [0, num_processes={self.num_processes})")

  def multi_process(self) -> bool:
    """Whether this process joins a multi-process job (see `distributed`; 'auto' also reads JAX_COORDINATOR_ADDRESS)."""
    if self.distributed == "auto":
      return bool(self.coordinator_address or os.environ.get(COORDINATOR_ENV))
    return self.distributed == "on"


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The text encoder of a text-to-image model, used when config.model.context_dim > 0 (= width).

  Captions become max_length token ids (jdiff.tokenizer); caption_dropout replaces a share of them by the empty
  prompt, whose output is the unconditional score of classifier-free guidance. trainable=False freezes the encoder
  (no gradient reaches it). sample_prompts: the prompts of the sample grids written in training, cycled.
  """
  max_length: int = 16
  width: int = 128
  depth: int = 2
  num_heads: int = 4
  mlp_dim: int = 512
  causal: bool = True
  activation: str = "quick_gelu"
  trainable: bool = True
  caption_dropout: float = 0.1
  sample_prompts: tuple[str, ...] = ()
  vocab_size: int = 0  # 0: jdiff's word-level tokenizer's; a pretrained encoder's own (CLIP's 49408)

  def __post_init__(self):
    object.__setattr__(self, "sample_prompts", tuple(self.sample_prompts))
    _check(0 <= self.caption_dropout < 1, "caption_dropout", self.caption_dropout, "in [0, 1)")
    _check(isinstance(self.trainable, bool), "trainable", self.trainable, "True or False")
    _check(self.vocab_size >= 0, "vocab_size", self.vocab_size, "0 (the tokenizer's) or a positive integer")
    self.encoder_config()  # Validates the architecture fields.
    self.tokenizer().encode(self.sample_prompts)  # Raises, naming the word, for a prompt the tokenizer cannot encode.

  def tokenizer(self) -> Tokenizer:
    return Tokenizer(self.max_length)

  def encoder_config(self, dtype: str = "float32") -> TextEncoderConfig:
    return TextEncoderConfig(vocab_size=self.vocab_size or Tokenizer(self.max_length).vocab_size,
                             max_length=self.max_length,
                             width=self.width, depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                             causal=self.causal, activation=self.activation, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class LatentConfig:
  """Latent diffusion: the U-Net trains and samples on a trained VAE's latents; vae_workdir None = on pixels.

  A relative vae_workdir names a directory beside the diffusion run's work dir (vae_workdir="vae_shapes" with
  --workdir runs/latent_shapes is runs/vae_shapes), wherever the command runs.

  Each batch is encoded by the frozen VAE (a posterior sample, or its mean) and multiplied by scaling_factor.
  scaling_factor 0 means: 1 / std of the latents of the first scale_batches training batches, computed when
  training starts. The checkpoint's config records the factor used and the VAE's absolute path and step, so
  resuming and sampling decode exactly as training encoded.
  """
  vae_workdir: str | None = None
  vae_checkpoint: int | None = None  # None: the VAE work dir's latest checkpoint
  encode: str = "sample"
  scaling_factor: float = 0.0
  scale_batches: int = 8

  def __post_init__(self):
    _check_choice("encode", self.encode, LATENT_ENCODINGS)
    _check(self.vae_workdir is None or (isinstance(self.vae_workdir, str) and self.vae_workdir), "vae_workdir",
           self.vae_workdir, "None (pixel diffusion) or the work dir of a trained VAE")
    _check(self.vae_checkpoint is None or self.vae_checkpoint >= 1, "vae_checkpoint", self.vae_checkpoint,
           "None (the latest) or a checkpoint step >= 1")
    _check(self.scaling_factor >= 0, "scaling_factor", self.scaling_factor, "> 0, or 0 to compute it from the data")
    _check(self.scale_batches >= 1, "scale_batches", self.scale_batches, "an integer >= 1")

  @property
  def enabled(self) -> bool:
    return self.vae_workdir is not None


LATENT_ENCODINGS = ("sample", "mean")


DISTILL_METHODS = ("progressive", "lcm")
DISTILL_WEIGHTINGS = ("snr+1", "truncated_snr")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Few-step generation by distillation of a trained teacher (docs/distillation.md); teacher None = no distillation.

  teacher: the teacher's work dir (or diffusers directory), read with jdiff.load; the student takes its model,
    diffusion, data, text and latent sections and starts from its EMA params.
  method 'progressive' (Salimans & Ho, 2022): round r trains the student to match two DDIM steps of the round's
    teacher in one, the student of round r teaching round r + 1; the first round's teacher samples teacher_steps
    steps, each round halves them, down to steps. Rounds of steps_per_round training steps; `weighting` of the
    x0 error: 'snr+1' (the v-prediction loss) or 'truncated_snr' (max(SNR, 1)).
  guidance_scale: the first teacher's classifier-free guidance scale, distilled into the student at that fixed
    scale (the student samples without guidance, one evaluation per step).
  method 'lcm' (latent consistency distillation, Luo et al., 2023): the consistency student is trained against a
    DDIM solver of the teacher skipping skip_steps timesteps, with guidance scales drawn from [w_min, w_max] and fed
    to the student as an embedding of width guidance_embed_dim; pseudo-Huber loss with huber_c; target network
    the EMA of decay target_decay; timestep_scaling in the boundary condition. `steps` is then the default number
    of sampling steps (sampler 'lcm'), training.num_steps the training's.
  """
  teacher: str | None = None
  method: str = "progressive"
  teacher_steps: int = 64
  steps: int = 4
  steps_per_round: int = 300
  weighting: str = "snr+1"
  guidance_scale: float = 1.0
  skip_steps: int = 20
  w_min: float = 1.0
  w_max: float = 8.0
  huber_c: float = 0.001
  target_decay: float = 0.95
  timestep_scaling: float = 10.0
  guidance_embed_dim: int = 64

  def __post_init__(self):
    _check(self.teacher is None or _is_nonempty_str(self.teacher), "teacher", self.teacher,
           "None or the teacher's work dir")
    _check_choice("method", self.method, DISTILL_METHODS)
    _check_choice("weighting", self.weighting, DISTILL_WEIGHTINGS)
    for name in ("teacher_steps", "steps", "steps_per_round", "skip_steps", "guidance_embed_dim"):
      _check(_is_int(getattr(self, name)) and getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
    if self.method == "progressive":
      ratio = self.teacher_steps // self.steps
      _check(self.teacher_steps % self.steps == 0 and ratio >= 2 and ratio & (ratio - 1) == 0, "steps", self.steps,
             f"teacher_steps={self.teacher_steps} divided by a power of two >= 2 (each round halves the steps)")
    _check(self.guidance_scale >= 0, "guidance_scale", self.guidance_scale, ">= 0 (1 = no guidance)")
    _check(0 <= self.w_min <= self.w_max, "w_max", self.w_max, f">= w_min={self.w_min} >= 0")
    _check(self.huber_c > 0, "huber_c", self.huber_c, "> 0")
    _check(0 <= self.target_decay < 1, "target_decay", self.target_decay, "in [0, 1)")
    _check(self.timestep_scaling > 0, "timestep_scaling", self.timestep_scaling, "> 0")

  @property
  def enabled(self) -> bool:
    return self.teacher is not None

  @property
  def rounds(self) -> int:
    """Progressive distillation's rounds: how many times teacher_steps halves to reach steps."""
    return (self.teacher_steps // self.steps).bit_length() - 1

  def student_steps(self, step: int) -> int:
    """The sampling steps a checkpoint at training step `step` was distilled for (its round's student's)."""
    if self.method != "progressive":
      return self.steps
    finished = min(max(step - 1, 0) // self.steps_per_round, self.rounds - 1)
    return self.teacher_steps // 2 ** (finished + 1)


@dataclasses.dataclass(frozen=True)
class ConditioningConfig:
  """Images the U-Net is conditioned on through extra input channels (jdiff/conditioning.py).

  kind: 'none'; 'super_resolution': the input is [x_t, the low-resolution image upsampled], trained on images
    downsampled by `scale` (block means, 8-bit); 'inpainting': [x_t, mask, masked image], trained on random
    rectangles and strokes, and on fully masked images a `full_mask_rate` share of the time (so the model also
    generates from nothing). model.in_channels must be out_channels plus the condition's channels.
  """
  kind: str = "none"
  scale: int = 2
  upsample: str = "bicubic"
  full_mask_rate: float = 0.1

  def __post_init__(self):
    _check_choice("kind", self.kind, conditioning.KINDS)
    _check_choice("upsample", self.upsample, conditioning.UPSAMPLING)
    _check(_is_int(self.scale) and self.scale >= 2, "scale", self.scale, "an integer >= 2")
    _check(0 <= self.full_mask_rate <= 1, "full_mask_rate", self.full_mask_rate, "in [0, 1]")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  """Fine-tuning starts from `base`: a jdiff work dir or a diffusers directory, loaded with jdiff.load, whose model,
  text encoder and diffusion settings replace the config's. None trains from scratch."""
  base: str | None = None

  def __post_init__(self):
    _check(self.base is None or _is_nonempty_str(self.base), "base", self.base,
           "None or a jdiff work dir / diffusers directory to fine-tune")


LORA_TARGETS = ("attention", "feed_forward", "conv")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA fine-tuning of config.finetune.base (jdiff/lora.py): each adapted kernel W becomes
  W + (alpha / rank) * down @ up, and only down and up train; rank 0 fine-tunes every weight instead.

  targets: which kernels get adapters: 'attention' (q, k, v and output projections), 'feed_forward' (the
  transformers' GEGLU and the text encoder's MLP), 'conv' (the residual blocks' 3x3 convolutions).
  text_encoder: adapt the text encoder's kernels of those kinds too (else it stays frozen).
  """
  rank: int = 0
  alpha: float = 0.0  # 0: alpha = rank (scale 1)
  targets: tuple[str, ...] = ("attention",)
  text_encoder: bool = False

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))
    _check(_is_int(self.rank) and self.rank >= 0, "rank", self.rank, "an integer >= 0 (0 = full fine-tuning)")
    _check(self.alpha >= 0, "alpha", self.alpha, ">= 0 (0 = the rank)")
    _check(bool(self.targets) and all(t in LORA_TARGETS for t in self.targets), "targets", self.targets,
           f"a non-empty tuple of {', '.join(LORA_TARGETS)}")
    _check(isinstance(self.text_encoder, bool), "text_encoder", self.text_encoder, "True or False")

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return (self.alpha or self.rank) / self.rank


@dataclasses.dataclass(frozen=True)
class DreamBoothConfig:
  """DreamBooth (Ruiz et al., 2023): fine-tune config.finetune.base on a few images of a new subject captioned
  instance_prompt, whose `identifier` is a word the base never saw (it takes the token id of `replaces`, a word of
  the tokenizer's vocabulary absent from the base's captions). With prior_weight > 0 each batch also holds images
  the base generated for class_prompt before training, weighted prior_weight: the prior-preservation loss.

  instance_images: an .npz whose "image" holds uint8 [N, H, W, C] at the model's size; None: no DreamBooth.
  """
  instance_images: str | None = None
  instance_prompt: str = "a sks shape"
  identifier: str = "sks"
  replaces: str = "sandal"
  class_prompt: str = "a shape"
  prior_weight: float = 1.0
  num_class_images: int = 200
  class_guidance_scale: float = 3.0

  def __post_init__(self):
    _check(self.instance_images is None or _is_nonempty_str(self.instance_images), "instance_images",
           self.instance_images, "None or an .npz file of uint8 images")
    _check(_is_nonempty_str(self.identifier) and self.identifier.isalnum() and self.identifier.islower(),
           "identifier", self.identifier, "one lower-case word of letters and digits, e.g. 'sks'")
    _check(self.identifier in self.instance_prompt.split(), "instance_prompt", self.instance_prompt,
           f"a prompt containing the identifier {self.identifier!r}")
    _check(self.prior_weight >= 0, "prior_weight", self.prior_weight, ">= 0 (0 = no prior preservation)")
    _check(_is_int(self.num_class_images) and self.num_class_images >= 1, "num_class_images",
           self.num_class_images, "an integer >= 1")
    _check(self.class_guidance_scale >= 0, "class_guidance_scale", self.class_guidance_scale, ">= 0")

  @property
  def enabled(self) -> bool:
    return self.instance_images is not None


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
  """A ControlNet trained on a frozen base model (config.finetune.base); a config with this section trains one.

  conditioning_channels: the control image's channels. embedding_channels: the widths of its convolutional
  embedding, which downsamples it 2**(len - 1) times (1 for a pixel model, the VAE's factor for a latent one).
  condition: what the control image shows, for datasets that draw it (shapes): the shape's 'silhouette' or its
  'edges'. scale: the conditioning scale of the sample grids written in training.
  """
  conditioning_channels: int = 1
  embedding_channels: tuple[int, ...] = (32,)
  condition: str = "silhouette"
  scale: float = 1.0

  def __post_init__(self):
    object.__setattr__(self, "embedding_channels", tuple(self.embedding_channels))
    _check(_is_int(self.conditioning_channels) and self.conditioning_channels > 0, "conditioning_channels",
           self.conditioning_channels, "a positive integer")
    _check(len(self.embedding_channels) > 0 and all(_is_int(c) and c > 0 for c in self.embedding_channels),
           "embedding_channels", self.embedding_channels, "a non-empty tuple of positive integers")
    _check_choice("condition", self.condition, CONTROL_CONDITIONS)
    _check(self.scale >= 0, "scale", self.scale, ">= 0")


CONTROL_CONDITIONS = ("silhouette", "edges")


@dataclasses.dataclass(frozen=True)
class Config:
  seed: int
  data: DataConfig
  model: UNetConfig
  diffusion: DiffusionConfig
  training: TrainingConfig
  sampling: SamplingConfig
  parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
  text: TextConfig = dataclasses.field(default_factory=TextConfig)
  latent: LatentConfig = dataclasses.field(default_factory=LatentConfig)
  conditioning: ConditioningConfig = dataclasses.field(default_factory=ConditioningConfig)
  finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
  lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
  dreambooth: DreamBoothConfig = dataclasses.field(default_factory=DreamBoothConfig)
  controlnet: ControlNetConfig = dataclasses.field(default_factory=ControlNetConfig)
  distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)

  @property
  def clip_x0(self) -> bool:
    """Whether sampling clips the denoised estimate to [-1, 1]: pixels live there, a VAE's scaled latents do not."""
    if self.sampling.clip_x0 is not None:
      return self.sampling.clip_x0
    return not self.latent.enabled


SECTIONS = {"data": DataConfig, "model": UNetConfig, "diffusion": DiffusionConfig,
            "training": TrainingConfig, "sampling": SamplingConfig, "parallel": ParallelConfig, "text": TextConfig,
            "latent": LatentConfig, "conditioning": ConditioningConfig, "finetune": FinetuneConfig, "lora": LoraConfig,
            "dreambooth": DreamBoothConfig, "controlnet": ControlNetConfig, "distill": DistillConfig}


def parse_config(raw: Mapping[str, Any]) -> Config:
  """Validates a ConfigDict (or plain nested dict) and returns the typed Config."""
  raw = _to_dict(raw)
  _reject_unknown("", raw, ["seed", *SECTIONS])
  # Before the sections: a distillation config's model and data are its teacher's, so without one they disagree.
  if isinstance(raw.get("distill"), dict) and raw["distill"].get("teacher") is None:
    raise ConfigError("config.distill.teacher is not set: pass --config.distill.teacher=WORKDIR, the work dir of the "
                      "model to distil")
  config = Config(seed=_seed(raw), **_parse_sections(raw, SECTIONS))
  if config.finetune.base and "model" not in raw:  # The base's model is checked once jdiff/train/finetune.py has it.
    _check_finetune(config)
  else:
    _check_consistency(config)
  return config


def _seed(raw: dict) -> int:
  seed = raw.get("seed", 0)
  if not _has_type(seed, "int") or seed < 0:
    raise ConfigError(f"config.seed={seed!r} is not allowed: must be an integer >= 0")
  return seed


def _parse_sections(raw: dict, classes: Mapping[str, type]) -> dict:
  sections = {}
  for name, cls in classes.items():
    values = raw.get(name, {})
    if not isinstance(values, Mapping):
      raise ConfigError(f"config.{name} must be a section of fields, got {values!r}")
    _reject_unknown(f"{name}.", values, [f.name for f in dataclasses.fields(cls)])
    _reject_wrong_types(name, cls, values)
    try:
      sections[name] = cls(**values)
    except (ValueError, TypeError) as e:
      raise ConfigError(f"config.{name}: {e}") from None
  return sections


@dataclasses.dataclass(frozen=True)
class VAELossConfig:
  """loss = mean reconstruction error per image value + kl_weight * KL per image value (summed KL / (H*W*C)).

  Normalising both terms per image value gives kl_weight the meaning it has in latent diffusion (1e-6 there).
  """
  reconstruction: str = "l1"
  kl_weight: float = 1e-6

  def __post_init__(self):
    _check_choice("reconstruction", self.reconstruction, RECONSTRUCTION_LOSSES)
    _check(self.kl_weight >= 0, "kl_weight", self.kl_weight, ">= 0")


RECONSTRUCTION_LOSSES = ("l1", "l2")


@dataclasses.dataclass(frozen=True)
class VAEEvalConfig:
  """Reconstruction PSNR, measured at the end of training on `split` of the training dataset (held-out images)."""
  split: str = "test"
  num_images: int = 0  # 0: the whole split

  def __post_init__(self):
    _check(isinstance(self.split, str) and bool(self.split), "split", self.split, "a split such as 'test'")
    _check(self.num_images >= 0, "num_images", self.num_images, ">= 0 (0 = the whole split)")


@dataclasses.dataclass(frozen=True)
class VAETrainConfig:
  """A VAE training run (configs/vae_*.py): training.sample_every writes reconstruction grids."""
  seed: int
  data: DataConfig
  vae: VAEConfig
  loss: VAELossConfig
  training: TrainingConfig
  evaluation: VAEEvalConfig
  parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)


VAE_SECTIONS = {"data": DataConfig, "vae": VAEConfig, "loss": VAELossConfig, "training": TrainingConfig,
                "evaluation": VAEEvalConfig, "parallel": ParallelConfig}


def is_controlnet_config(raw: Mapping[str, Any]) -> bool:
  """Whether a raw config describes a ControlNet run (it has a `controlnet` section)."""
  return "controlnet" in _to_dict(raw)


def is_vae_config(raw: Mapping[str, Any]) -> bool:
  """Whether a raw config describes a VAE run (it has a `vae` section) rather than a diffusion run."""
  return "vae" in _to_dict(raw)


def parse_vae_config(raw: Mapping[str, Any]) -> VAETrainConfig:
  """Validates a VAE run's ConfigDict (or nested dict) and returns the typed VAETrainConfig."""
  raw = _to_dict(raw)
  _reject_unknown("", raw, ["seed", *VAE_SECTIONS])
  config = VAETrainConfig(seed=_seed(raw), **_parse_sections(raw, VAE_SECTIONS))
  if config.vae.image_size != config.data.image_size:
    raise ConfigError(f"config.vae.image_size ({config.vae.image_size}) must equal config.data.image_size "
                      f"({config.data.image_size}): the VAE is built for the images the data pipeline yields")
  return config


def _check_finetune(config: Config) -> None:
  if (config.lora.enabled or config.dreambooth.enabled) and not config.finetune.base:
    raise ConfigError("config.lora.rank > 0 and config.dreambooth.instance_images fine-tune a trained model: set "
                      "config.finetune.base to its work dir or diffusers directory")


def _check_consistency(config: Config) -> None:
  _check_finetune(config)
  # A latent U-Net's size is checked against the VAE's latents when training starts.
  # A distillation config's model sections are its teacher's, read when training starts.
  if not config.latent.enabled and not config.distill.enabled and config.model.image_size != config.data.image_size:
    raise ConfigError(f"config.model.image_size ({config.model.image_size}) must equal config.data.image_size "
                      f"({config.data.image_size}): the U-Net is built for the images the data pipeline yields")
  _check_conditioning(config)
  if config.model.dtype == "float16":
    raise ConfigError("config.model.dtype='float16' is for inference (fp16 training would need loss scaling): train "
                      "in 'bfloat16'")
  if config.sampling.steps > config.diffusion.num_timesteps:
    raise ConfigError(f"config.sampling.steps ({config.sampling.steps}) exceeds "
                      f"config.diffusion.num_timesteps ({config.diffusion.num_timesteps})")
  if config.sampling.spacing == "flow" and config.diffusion.prediction != "flow":
    raise ConfigError(f"config.sampling.spacing='flow' is for flow models, but config.diffusion.prediction="
                      f"{config.diffusion.prediction!r}: set prediction='flow' or another spacing")
  if config.sampling.guidance_scale != 1.0 and config.model.num_classes == 0 and config.model.context_dim == 0:
    raise ConfigError(f"config.sampling.guidance_scale={config.sampling.guidance_scale} needs a class-conditional "
                      "model or a text model: set config.model.num_classes > 0 or config.model.context_dim > 0, or "
                      "guidance_scale=1.0 for an unconditional one")
  if config.model.context_dim and config.model.context_dim != config.text.width:
    raise ConfigError(f"config.model.context_dim ({config.model.context_dim}) must equal config.text.width "
                      f"({config.text.width}): the U-Net cross-attends to the text encoder's hidden states")
  if config.model.context_dim and not config.text.trainable and config.training.weight_decay:
    raise ConfigError(f"config.training.weight_decay={config.training.weight_decay} would decay the frozen text "
                      "encoder (config.text.trainable=False): set weight_decay=0.0 or train the encoder")


def _check_conditioning(config: Config) -> None:
  cc, mc = config.conditioning, config.model
  extra = conditioning.cond_channels(cc.kind, mc.output_channels)
  if mc.in_channels != mc.output_channels + extra:
    what = {"none": "no conditioning (config.conditioning.kind='none')",
            "super_resolution": "a super-resolution model (the low-resolution image's channels)",
            "inpainting": "an inpainting model (the mask and the masked image's channels)"}[cc.kind]
    raise ConfigError(f"config.model.in_channels={mc.in_channels} must be {mc.output_channels + extra} for {what}: "
                      f"out_channels {mc.output_channels} plus {extra} condition channels")
  if cc.kind != "none" and config.latent.enabled:
    raise ConfigError(f"config.conditioning.kind={cc.kind!r} trains on pixels: set config.latent.vae_workdir=None")
  if cc.kind == "super_resolution" and config.data.image_size % cc.scale:
    raise ConfigError(f"config.conditioning.scale={cc.scale} must divide config.data.image_size "
                      f"({config.data.image_size})")


def _reject_unknown(prefix: str, values: Mapping[str, Any], allowed: list[str]) -> None:
  for key in values:
    if key not in allowed:
      close = difflib.get_close_matches(key, allowed, n=1)
      hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
      raise ConfigError(f"unknown config field config.{prefix}{key}{hint}; "
                        f"fields of config.{prefix.rstrip('.') or '<top>'}: {', '.join(allowed)}")


def _reject_wrong_types(section: str, cls, values: Mapping[str, Any]) -> None:
  """Checks values against the field annotations (int, float, bool, str, None, tuple[X, ...] and unions of them),
  so a wrong type gets a message naming the field rather than an error from deep inside a check. A float must
  be finite: no field means anything by nan or inf."""
  for field in dataclasses.fields(cls):
    if field.name in values and not _has_type(values[field.name], str(field.type)):
      raise ConfigError(f"config.{section}.{field.name}={values[field.name]!r} has the wrong type: "
                        f"must be {field.type}")


_SCALAR_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str}


def _has_type(value, annotation: str) -> bool:
  """Whether `value` fits `annotation`; an annotation of another form is not judged (True)."""
  judged = False
  for option in (part.strip() for part in annotation.split("|")):
    if option == "None":
      judged = True
      if value is None:
        return True
    elif option in _SCALAR_TYPES:
      judged = True
      is_bool = isinstance(value, bool)
      finite = not (option == "float" and isinstance(value, float) and not math.isfinite(value))
      if isinstance(value, _SCALAR_TYPES[option]) and (option == "bool" or not is_bool) and finite:
        return True
    elif option.startswith("tuple[") and option.endswith(", ...]"):
      judged = True
      if isinstance(value, (tuple, list)) and all(_has_type(v, option[6:-6]) for v in value):
        return True
  return not judged


def _to_dict(raw) -> dict:
  return raw.to_dict() if hasattr(raw, "to_dict") else dict(raw)


def _is_nonempty_str(value) -> bool:
  return isinstance(value, str) and bool(value)


def _check(ok: bool, field: str, value, allowed: str) -> None:
  if not ok:
    raise ValueError(f"{field}={value!r} is not allowed: must be {allowed}")


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _check_choice(field: str, value, choices) -> None:
  _check(value in choices, field, value, f"one of {', '.join(choices)}")
