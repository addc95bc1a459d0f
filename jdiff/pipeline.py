"""The notebook face of jdiff: load a trained work dir, then generate images.

    import jdiff
    pipe = jdiff.load("runs/default")
    samples = pipe.generate(num=20, label=3, sampler="ddim", steps=20, guidance=3.0, seed=0)
    samples.images  # uint8 [20, 16, 16, 1]

A text-to-image model (config.model.context_dim > 0) takes prompts where a class model takes labels:

    pipe = jdiff.load("runs/shapes")
    samples = pipe.generate(8, prompt="a red square", negative_prompt="a small square", guidance=5.0)

A latent diffusion work dir (config.latent) samples latents and decodes them with its VAE: the same calls
return images.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Sequence

import jax
import numpy as np

from jdiff import generate as gen
from jdiff import samplers
from jdiff.config import Config, ConfigError, is_vae_config, parse_config
from jdiff.data import model_range_to_uint8, uint8_to_model_range
from jdiff.models.unet import UNet
from jdiff.schedules import Schedule, make_schedule
from jdiff.train import checkpoint, latent, sharding
from jdiff.train.state import abstract_train_state, make_model


@dataclasses.dataclass(frozen=True)
class Samples:
  images: np.ndarray  # uint8 [N, H, W, C]
  labels: np.ndarray | None  # int32 [N], or None for an unconditional model
  seeds: np.ndarray  # the seed of each image: image i is reproduced by its seed alone
  prompts: tuple[str, ...] | None = None  # a text model's prompt of each image


@dataclasses.dataclass
class Pipeline:
  config: Config
  params: dict
  step: int
  codec: latent.LatentCodec | None = None  # a latent diffusion model's VAE: samples are decoded with it

  @functools.cached_property
  def model(self) -> UNet:
    return make_model(self.config)

  @functools.cached_property
  def schedule(self) -> Schedule:
    return make_schedule(self.config.diffusion.schedule, self.config.diffusion.num_timesteps)

  def generate(self, num: int = 16, *, seed: int = 0, label: int | Sequence[int] | None = None,
               prompt: str | Sequence[str] | None = None, batch_size: int = 256,
               progress: Callable[[int, int], None] | None = None, **options) -> Samples:
    """Generates `num` images with seeds seed, seed+1, ...

    label: one class for every image, one per image, or None to cycle through the classes.
    prompt (text models, in place of label): one prompt for every image, one per image, or None to cycle through
      config.text.sample_prompts ("" is the unconditional prompt).
    options (unset ones come from the config's sampling section): sampler, steps, spacing, guidance,
      guidance_rescale, negative_label (a class to steer away from instead of the null class), negative_prompt
      (text models: a prompt to steer away from instead of the empty one), eta, clip_x0 (clip each denoised
      estimate to [-1, 1]; the config decides by default: on for pixel models, off for latent ones).
    """
    options = self._sampling_options(**options)
    if num < 1 or batch_size < 1:
      raise ValueError(f"num={num} and batch_size={batch_size} must be at least 1")
    _check_seeds(seed, seed + num - 1)
    seeds = np.arange(seed, seed + num, dtype=np.int64)
    prompts = self._prompts(prompt, num)
    labels = self._cond(label, prompts, num)
    size = min(batch_size, num)
    chunks = []
    for start in range(0, num, size):
      chunk = slice(start, min(start + size, num))
      chunks.append(self._generate_padded(seeds[chunk], None if labels is None else labels[chunk], size, options))
      if progress:
        progress(chunk.stop, num)
    if prompts is not None:
      return Samples(images=np.concatenate(chunks), labels=None, seeds=seeds, prompts=tuple(prompts))
    return Samples(images=np.concatenate(chunks), labels=labels, seeds=seeds)

  def interpolate(self, num_frames: int = 8, *, seed: int = 0, seed_end: int | None = None,
                  label: int | None = None, label_end: int | None = None, prompt: str | None = None,
                  prompt_end: str | None = None, **options) -> Samples:
    """Frames along the spherical path from seed's noise to seed_end's (default seed + 1), sampled
    deterministically (eta 0); a conditional model's class switches from label to label_end halfway (a text
    model's prompt from prompt to prompt_end)."""
    options = self._sampling_options(**options)
    if options["sampler"] == "ddpm":
      raise ValueError("sampler='ddpm' is stochastic; interpolate with a deterministic one, e.g. ddim")
    seed_end = seed + 1 if seed_end is None else seed_end
    if num_frames < 2:
      raise ValueError(f"num_frames={num_frames} must be at least 2")
    _check_seeds(seed, seed_end)
    halves = (num_frames + 1) // 2
    prompts = None
    if self.config.model.context_dim:
      prompt = (self.config.text.sample_prompts or ("",))[0] if prompt is None else prompt
      prompts = [prompt] * halves + [prompt if prompt_end is None else prompt_end] * (num_frames - halves)
    else:
      self._prompts(prompt_end if prompt is None else prompt, 0)  # raises if a prompt was given
    labels = self._cond(label, prompts, num_frames) if prompts else self._interpolation_labels(
        label, label_end, halves, num_frames - halves)
    mc = self.config.model
    noise = gen.interpolation_noise(seed, seed_end, num_frames, (mc.image_size, mc.image_size, mc.in_channels))
    images = self._sample(noise, None, labels, dict(options, eta=0.0))
    seeds = np.array([seed] * halves + [seed_end] * (num_frames - halves))
    if prompts:
      return Samples(images=images, labels=None, seeds=seeds, prompts=tuple(prompts))
    return Samples(images=images, labels=labels, seeds=seeds)

  def invert(self, images: np.ndarray, *, label: int | Sequence[int] | None = None,
             prompt: str | Sequence[str] | None = None, steps: int | None = None, spacing: str | None = None,
             refine: int = 0, clip_x0: bool | None = None) -> np.ndarray:
    """DDIM inversion: the initial noise [N, H, W, C] from which `decode` (DDIM, eta 0, no guidance, same
    steps and spacing) reproduces uint8 `images`. refine > 0 adds fixed-point iterations per step."""
    options = self._sampling_options(sampler="ddim", steps=steps, spacing=spacing, clip_x0=clip_x0)
    expected = self.image_shape
    if np.asarray(images).dtype != np.uint8 or np.ndim(images) != 4 or np.shape(images)[1:] != expected:
      raise ValueError(f"images must be uint8 [N, {', '.join(map(str, expected))}], got "
                       f"{np.asarray(images).dtype} {np.shape(images)}")
    labels = self._cond(label, self._prompts(prompt, len(images)), len(images))
    x0 = uint8_to_model_range(np.asarray(images))
    if self.codec:
      x0 = self.codec.encode(x0)  # the posterior mean; the returned noise is latent-shaped
    return np.asarray(gen.invert_unet(self.params, self.schedule, x0, labels,
                                      model=self.model, prediction=self.config.diffusion.prediction,
                                      num_steps=options["num_steps"], spacing=options["spacing"], refine=refine,
                                      clip_x0=options["clip_x0"]))

  def decode(self, noise: np.ndarray, *, label: int | Sequence[int] | None = None,
             prompt: str | Sequence[str] | None = None, steps: int | None = None,
             spacing: str | None = None, clip_x0: bool | None = None) -> np.ndarray:
    """uint8 images sampled deterministically (DDIM, eta 0, no guidance) from given initial noise."""
    options = self._sampling_options(sampler="ddim", steps=steps, spacing=spacing, guidance=1.0, eta=0.0,
                                     clip_x0=clip_x0)
    mc = self.config.model
    expected = (mc.image_size, mc.image_size, mc.in_channels)
    noise = np.asarray(noise)
    if noise.ndim != 4 or noise.shape[1:] != expected or not np.issubdtype(noise.dtype, np.floating):
      raise ValueError(f"noise must be float [N, {', '.join(map(str, expected))}], got {noise.dtype} {noise.shape}")
    if not np.all(np.isfinite(noise)):
      raise ValueError("noise holds NaN or infinite values")
    labels = self._cond(label, self._prompts(prompt, len(noise)), len(noise))
    return self._sample(noise.astype(np.float32), None, labels, options)

  def _interpolation_labels(self, label, label_end, first: int, second: int) -> np.ndarray | None:
    if not self.config.model.num_classes:
      return self._labels(label if label_end is None else label_end, 0)  # raises if a label was given
    label = 0 if label is None else label
    return np.concatenate([self._labels(label, first), self._labels(label if label_end is None else label_end,
                                                                     second)])

  def _sampling_options(self, *, sampler: str | None = None, steps: int | None = None, spacing: str | None = None,
                        guidance: float | None = None, guidance_rescale: float = 0.0,
                        negative_label: int | None = None, negative_prompt: str | None = None,
                        eta: float | None = None, clip_x0: bool | None = None) -> dict:
    """The sampler's keyword arguments, defaults filled in from the config and every value checked."""
    sc = self.config.sampling
    sampler, spacing = sampler or sc.sampler, spacing or sc.spacing
    steps = sc.num_steps if steps is None else steps
    self._check_sampler(sampler, steps, spacing)
    if not 0.0 <= guidance_rescale <= 1.0:
      raise ValueError(f"guidance_rescale={guidance_rescale} must be in [0, 1]")
    negative = None if negative_label is None else int(self._labels(negative_label, 1)[0])
    eta = sc.eta if eta is None else eta
    if not (np.isfinite(eta) and eta >= 0):
      raise ValueError(f"eta={eta} must be a finite number >= 0 (0 = deterministic)")
    if self.config.model.context_dim:  # A text model's negative is token ids: the empty prompt's by default.
      negative = self.config.text.tokenizer().encode(negative_prompt or "")[0]
    elif negative_prompt is not None:
      raise ValueError(f"negative_prompt={negative_prompt!r} given, but this model takes no text "
                       "(config.model.context_dim=0)")
    return dict(sampler=sampler, num_steps=steps, spacing=spacing, guidance_rescale=guidance_rescale,
                guidance_scale=self._check_guidance(sc.guidance_scale if guidance is None else guidance),
                negative_label=negative, eta=eta, clip_x0=self.config.clip_x0 if clip_x0 is None else bool(clip_x0))

  def _generate_padded(self, seeds, labels, size: int, options: dict) -> np.ndarray:
    """Pads a short last chunk to `size`, so every chunk reuses one compiled program."""
    n = len(seeds)
    pad = lambda a: np.concatenate([a, np.repeat(a[-1:], size - n, axis=0)])
    noise, keys = gen.seeded_noise(self.model, pad(seeds))
    return self._sample(noise, keys, None if labels is None else pad(labels), options)[:n]

  def _sample(self, noise, keys, labels, options: dict) -> np.ndarray:
    """uint8 images from initial noise; keys=None for deterministic sampling (eta 0), which draws nothing."""
    if keys is None:
      keys = jax.random.split(jax.random.key(0), len(noise))
    options = dict(options)
    negative = options.pop("negative_label")
    negatives = None if negative is None else np.broadcast_to(np.asarray(negative, np.int32),
                                                              (len(noise),) + np.shape(negative))
    images = gen.sample_unet(self.model, self.params, self.schedule, noise, keys, labels=labels,
                             negative_labels=negatives, prediction=self.config.diffusion.prediction, **options)
    if self.codec:
      images = self.codec.decode(images)
    return model_range_to_uint8(images)

  def _prompts(self, prompt, num: int) -> list[str] | None:
    """A text model's prompt for each of `num` images (None: cycle through config.text.sample_prompts)."""
    if not self.config.model.context_dim:
      if prompt is not None:
        raise ValueError(f"prompt={prompt!r} given, but this model takes no text (config.model.context_dim=0): "
                         "use label=...")
      return None
    if prompt is None:
      cycle = self.config.text.sample_prompts or ("",)
      return [cycle[i % len(cycle)] for i in range(num)]
    prompts = [prompt] * num if isinstance(prompt, str) else list(prompt)
    if len(prompts) != num:
      raise ValueError(f"got {len(prompts)} prompts for {num} images: give one prompt, or one per image")
    return prompts

  def _cond(self, label, prompts: list[str] | None, num: int) -> np.ndarray | None:
    """The condition of each image: class labels [N], a text model's prompt token ids [N, L], or None."""
    if prompts is None:
      return self._labels(label, num)
    if label is not None:
      raise ValueError(f"label={label!r} given, but this is a text-to-image model: pass prompt=... instead")
    return self.config.text.tokenizer().encode(prompts)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of the images this model generates (for a latent model, what its VAE decodes to)."""
    if self.codec:
      size = self.config.model.image_size * self.codec.vae.downsample_factor
      return (size, size, self.codec.vae.in_channels)
    mc = self.config.model
    return (mc.image_size, mc.image_size, mc.in_channels)

  def _labels(self, label, num: int) -> np.ndarray | None:
    num_classes = self.config.model.num_classes
    if not num_classes:
      if label is not None:
        raise ValueError(f"label={label!r} given, but this model is unconditional (config.model.num_classes=0)")
      return None
    labels = np.arange(num) % num_classes if label is None else np.broadcast_to(np.asarray(label), (num,))
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
      raise ValueError(f"label {int(bad[0])} is outside this model's classes: use 0..{num_classes - 1}")
    return labels.astype(np.int32)

  def _check_guidance(self, guidance: float) -> float:
    if not (np.isfinite(guidance) and guidance >= 0):
      raise ValueError(f"guidance={guidance} must be a finite number >= 0 (1 = no guidance)")
    conditional = self.config.model.num_classes or self.config.model.context_dim
    if guidance != 1.0 and not conditional:
      raise ValueError(f"guidance={guidance} needs a class-conditional model; this one is unconditional: "
                       "use guidance=1")
    return float(guidance) if conditional else 1.0

  def _check_sampler(self, sampler: str, steps: int, spacing: str) -> None:
    if sampler not in samplers.SAMPLERS:
      raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(samplers.SAMPLERS)}")
    if spacing not in samplers.SPACINGS:
      raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(samplers.SPACINGS)}")
    if not 1 <= steps <= self.config.diffusion.num_timesteps:
      raise ValueError(f"steps={steps} must be between 1 and the model's "
                       f"{self.config.diffusion.num_timesteps} diffusion timesteps")


def _check_seeds(first: int, last: int) -> None:
  """Seeds become uint32 PRNG keys: outside [0, 2**32) two seeds would silently give the same image."""
  for seed in (first, last):
    if not 0 <= seed < 2**32:
      raise ValueError(f"seed {seed} is outside [0, 2**32): use seeds from 0 to {2**32 - 1}")


def load(workdir: str, step: int | None = None, ema: bool = True) -> Pipeline:
  """Restores a trained model from a work dir (its latest checkpoint, or `step`), EMA params by default.

  Without `step`, an unreadable latest checkpoint is reported (a warning naming its path) and the one before it
  is used; a given `step` that is unreadable raises UnreadableCheckpointError.
  """
  ckpt_dir = checkpoint.checkpoint_dir(workdir)
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"no checkpoints in work dir {workdir!r} (looked for {ckpt_dir}): train one with "
                            f"`python train.py --workdir {workdir}`, or pass the --workdir you trained into")
  manager = checkpoint.make_manager(workdir, create=False)
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f"work dir {workdir!r} has no finished checkpoint in {ckpt_dir}")
  if step is not None and step not in steps:
    raise FileNotFoundError(f"no checkpoint at step {step} in {ckpt_dir}; available steps: "
                            f"{', '.join(map(str, sorted(steps)))}")
  # Params on every local device: sampling splits its batch over them (generate.spread_batch).
  replicated = sharding.over_devices(jax.local_devices())

  def restore(s: int) -> Pipeline:
    raw = checkpoint.restore_config_checked(manager, s)
    if is_vae_config(raw):
      raise ConfigError(f"work dir {workdir!r} holds a VAE, not a diffusion model: sample from a latent diffusion "
                        "work dir that uses it, or measure it with bench/vae_psnr.py")
    config = parse_config(raw)
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                                      abstract_train_state(config))
    state = checkpoint.restore_checked(manager, s, abstract)
    codec = latent.load_codec(config) if config.latent.enabled else None
    return Pipeline(config=config, params=state.ema_params if ema else state.params, step=s, codec=codec)

  if step is not None:
    return restore(step)
  return checkpoint.restore_latest(manager, restore)[1]
