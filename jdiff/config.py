"""Typed, validated configuration.

Config files (configs/*.py) return an ml_collections.ConfigDict with the sections below. `parse_config`
turns it into frozen dataclasses, checking every key up front: an unknown or misspelt field, or a bad
value, raises ConfigError naming the field and what is allowed, before anything is written.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping

from jdiff import diffusion, samplers, schedules
from jdiff.data import DataConfig
from jdiff.models.text import TextEncoderConfig
from jdiff.models.unet import UNetConfig
from jdiff.tokenizer import Tokenizer


class ConfigError(ValueError):
  """A configuration field has an unknown name or a value that is not allowed."""


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
  schedule: str = "linear"
  num_timesteps: int = 1000
  prediction: str = "eps"
  min_snr_gamma: float = 0.0  # 0 = L_simple; e.g. 5.0 = min-SNR-5 weighting
  label_dropout: float = 0.1  # share of labels replaced by the null class, for classifier-free guidance

  def __post_init__(self):
    _check_choice("schedule", self.schedule, schedules.SCHEDULE_NAMES)
    _check_choice("prediction", self.prediction, diffusion.PARAMETERISATIONS)
    _check(self.num_timesteps >= 2, "num_timesteps", self.num_timesteps, "an integer >= 2")
    _check(self.min_snr_gamma >= 0, "min_snr_gamma", self.min_snr_gamma, ">= 0 (0 disables it)")
    _check(0 <= self.label_dropout < 1, "label_dropout", self.label_dropout, "in [0, 1)")


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

  def __post_init__(self):
    for name in ("batch_size", "num_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
      _check(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
    for name in ("warmup_steps", "sample_every"):
      _check(getattr(self, name) >= 0, name, getattr(self, name), "an integer >= 0")
    _check(self.learning_rate > 0, "learning_rate", self.learning_rate, "> 0")
    _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
    _check(self.grad_clip >= 0, "grad_clip", self.grad_clip, ">= 0 (0 disables clipping)")
    _check(0 <= self.ema_decay < 1, "ema_decay", self.ema_decay, "in [0, 1)")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Defaults for the sample grids written during training and for sample.py."""
  sampler: str = "ddim"
  num_steps: int = 50
  spacing: str = "trailing"  # timestep spacing: leading, trailing, linspace; or karras sigmas
  guidance_scale: float = 1.0
  eta: float = 0.0
  num_samples: int = 64

  def __post_init__(self):
    _check_choice("sampler", self.sampler, samplers.SAMPLERS)
    _check_choice("spacing", self.spacing, samplers.SPACINGS)
    _check(self.num_steps >= 1, "num_steps", self.num_steps, "an integer >= 1")
    _check(self.guidance_scale >= 0, "guidance_scale", self.guidance_scale, ">= 0")
    _check(self.eta >= 0, "eta", self.eta, ">= 0")
    _check(self.num_samples >= 1, "num_samples", self.num_samples, "an integer >= 1")


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

  def __post_init__(self):
    object.__setattr__(self, "sample_prompts", tuple(self.sample_prompts))
    _check(0 <= self.caption_dropout < 1, "caption_dropout", self.caption_dropout, "in [0, 1)")
    _check(isinstance(self.trainable, bool), "trainable", self.trainable, "True or False")
    self.encoder_config()  # Validates the architecture fields.
    self.tokenizer().encode(self.sample_prompts)  # Raises, naming the word, for a prompt the tokenizer cannot encode.

  def tokenizer(self) -> Tokenizer:
    return Tokenizer(self.max_length)

  def encoder_config(self, dtype: str = "float32") -> TextEncoderConfig:
    return TextEncoderConfig(vocab_size=Tokenizer(self.max_length).vocab_size, max_length=self.max_length,
                             width=self.width, depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                             causal=self.causal, activation=self.activation, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class Config:
  seed: int
  data: DataConfig
  model: UNetConfig
  diffusion: DiffusionConfig
  training: TrainingConfig
  sampling: SamplingConfig
  text: TextConfig = dataclasses.field(default_factory=TextConfig)


SECTIONS = {"data": DataConfig, "model": UNetConfig, "diffusion": DiffusionConfig,
            "training": TrainingConfig, "sampling": SamplingConfig, "text": TextConfig}


def parse_config(raw: Mapping[str, Any]) -> Config:
  """Validates a ConfigDict (or plain nested dict) and returns the typed Config."""
  raw = _to_dict(raw)
  _reject_unknown("", raw, ["seed", *SECTIONS])
  sections = {}
  for name, cls in SECTIONS.items():
    values = raw.get(name, {})
    if not isinstance(values, Mapping):
      raise ConfigError(f"config.{name} must be a section of fields, got {values!r}")
    _reject_unknown(f"{name}.", values, [f.name for f in dataclasses.fields(cls)])
    try:
      sections[name] = cls(**values)
    except (ValueError, TypeError) as e:
      raise ConfigError(f"config.{name}: {e}") from None
  config = Config(seed=int(raw.get("seed", 0)), **sections)
  _check_consistency(config)
  return config


def _check_consistency(config: Config) -> None:
  if config.model.image_size != config.data.image_size:
    raise ConfigError(f"config.model.image_size ({config.model.image_size}) must equal config.data.image_size "
                      f"({config.data.image_size}): the U-Net is built for the images the data pipeline yields")
  if config.sampling.num_steps > config.diffusion.num_timesteps:
    raise ConfigError(f"config.sampling.num_steps ({config.sampling.num_steps}) exceeds "
                      f"config.diffusion.num_timesteps ({config.diffusion.num_timesteps})")
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


def _reject_unknown(prefix: str, values: Mapping[str, Any], allowed: list[str]) -> None:
  for key in values:
    if key not in allowed:
      close = difflib.get_close_matches(key, allowed, n=1)
      hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
      raise ConfigError(f"unknown config field config.{prefix}{key}{hint}; "
                        f"fields of config.{prefix.rstrip('.') or '<top>'}: {', '.join(allowed)}")


def _to_dict(raw) -> dict:
  return raw.to_dict() if hasattr(raw, "to_dict") else dict(raw)


def _check(ok: bool, field: str, value, allowed: str) -> None:
  if not ok:
    raise ValueError(f"{field}={value!r} is not allowed: must be {allowed}")


def _check_choice(field: str, value, choices) -> None:
  _check(value in choices, field, value, f"one of {', '.join(choices)}")
