"""The notebook face of jdiff: a trained model and the calls that make images with it.

    import jdiff
    pipe = jdiff.load("runs/default")                      # a work dir that train.py wrote
    samples = pipe.generate(label=3, num=20, steps=10, guidance_scale=3.0, seed=0)
    samples.images                                          # uint8 [20, 16, 16, 1]; .grid() and .to_pil() for PIL

A text-to-image model takes prompts where a class model takes labels:

    pipe = jdiff.load("runs/shapes")
    pipe.generate("a red square", num=8, negative_prompt="a blue square", guidance_scale=5.0).grid()

A latent diffusion model samples latents and decodes them with its VAE: the same calls return images.
`jdiff.from_state(config, state)` builds a pipeline on what training returns, without a work dir.

A Stable Diffusion model in diffusers' directory format loads the same way, and jdiff's models export to it:

    pipe = jdiff.load("stable-diffusion-v1-5", dtype="bfloat16")        # model_index.json, unet/, vae/, ...
    pipe.generate("a photo of a cat", height=512, width=512, steps=25, guidance_scale=7.5).images
    jdiff.export_diffusers(jdiff.load("runs/latent_shapes"), "exported")  # diffusers' from_pretrained reads it

Only inference is imported here: no training code, TensorFlow, TFDS or clu.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Callable, Protocol, Sequence

import jax
import numpy as np

from jdiff import build, checkpoint, control, generate as gen, images as imaging, latent, samplers, schedulers, sharding
from jdiff import conditioning
from jdiff.clip_tokenizer import CLIPTokenizer
from jdiff.config import (Config, ConfigError, DataConfig, DiffusionConfig, SamplingConfig, TextConfig, TrainingConfig,
                          is_vae_config, parse_config)
from jdiff.config import ConditioningConfig
from jdiff.interop import configs, pretrained, weights
from jdiff.models.text import TextToImageUNet
from jdiff.models.unet import DTYPES, UNet
from jdiff.schedules import Schedule
from jdiff.tokenizer import with_identifier

Progress = Callable[[int, int], None]


class PromptTokenizer(Protocol):
  """What a text model's prompts go through: jdiff.tokenizer.Tokenizer, or CLIP's tokenizer for Stable Diffusion."""

  def encode(self, texts: str | Sequence[str]) -> np.ndarray:
    """int32 token ids [N, max_length] of N prompts (a single string gives N = 1)."""


@dataclasses.dataclass(frozen=True)
class Samples:
  """Generated images and what made each one: image i is reproduced by seeds[i] and its label or prompt."""
  images: np.ndarray  # uint8 [N, H, W, C]
  seeds: np.ndarray  # int64 [N]
  labels: np.ndarray | None = None  # a class model's label of each image
  prompts: tuple[str, ...] | None = None  # a text model's prompt of each image
  latents: np.ndarray | None = None  # a latent model's sampled latents, before the VAE decoded them
  cycle: int | None = None  # the images cycle through this many classes or prompts: one grid column each

  def to_pil(self) -> list:
    """The images as PIL images."""
    return [imaging.to_pil(image) for image in self.images]

  @property
  def columns(self) -> int | None:
    """The grid's default number of columns: one per class or prompt the images cycle through, if they do."""
    return self.cycle if self.cycle and len(self.images) % self.cycle == 0 else None

  def grid(self, columns: int | None = None, min_size: int = 0):
    """The images tiled into one PIL image, upscaled (nearest) to at least min_size pixels."""
    return imaging.to_pil(imaging.make_grid(self.images, columns or self.columns), min_size)

  def save(self, path: str, columns: int | None = None) -> None:
    """`.png`: the grid (upscaled to at least 256 pixels); `.npz`: images, seeds, labels (-1: none), prompts."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".npz"):
      labels = self.labels if self.labels is not None else np.full(len(self.images), -1, np.int32)
      extra = {} if self.prompts is None else {"prompts": np.array(self.prompts)}
      np.savez(path, images=self.images, labels=labels, seeds=self.seeds, **extra)
    elif path.endswith(".png"):
      self.grid(columns, min_size=256).save(path)
    else:
      raise ValueError(f"cannot save samples as {path!r}: use a .png (grid) or .npz (raw arrays) path")


@dataclasses.dataclass
class Pipeline:
  """A diffusion model ready to sample: its typed config, parameters, and for a latent model the VAE codec."""
  config: Config
  params: dict
  step: int | None = None  # the checkpoint step the params come from, if any
  codec: latent.LatentCodec | None = None
  tokenizer: PromptTokenizer | None = None  # a text model's; None: the config's word-level Tokenizer
  schedule: Schedule | None = None  # None: the config's diffusion schedule
  source: str | None = None  # the diffusers directory the model was read from, if any
  # A diffusers scheduler_config.json: generate follows it (jdiff.schedulers) unless given a spacing name.
  scheduler_config: dict | None = None
  loras: tuple = ()  # (jdiff.lora.LoRA, weight) merged into params by with_lora, in order
  controlnet: control.Control | None = None  # with_controlnet's: generate then takes control images

  def __post_init__(self):
    if self.schedule is None:
      self.schedule = self.config.diffusion.make_schedule(self.config.model.image_size)
    if self.tokenizer is None and self.is_text_model and not self.source:
      self.tokenizer = self.config.text.tokenizer()
      db = self.config.dreambooth
      if db.enabled:  # A DreamBooth model reads its subject's identifier.
        self.tokenizer = with_identifier(self.tokenizer, db.identifier, db.replaces)

  def with_lora(self, lora, weight: float = 1.0) -> Pipeline:
    """A pipeline whose params have `lora` merged in at `weight` (this one is unchanged): a LoRA file (diffusers'
    PEFT layout or kohya's), a LoRA training work dir (its lora.safetensors) or a jdiff.lora.LoRA. Several LoRAs
    stack: pipe.with_lora(a).with_lora(b, 0.5). A LoRA made for another model raises jdiff.lora.LoRAMismatchError
    naming the module and the shapes."""
    from jdiff import lora as lora_lib  # pylint: disable=import-outside-toplevel
    adapter = lora_lib.resolve(lora, self.params)
    return dataclasses.replace(self, params=lora_lib.merge(self.params, adapter, weight),
                               loras=self.loras + ((adapter, weight),))

  def without_lora(self) -> Pipeline:
    """The pipeline with every LoRA that with_lora merged taken off its params again."""
    from jdiff import lora as lora_lib  # pylint: disable=import-outside-toplevel
    params = self.params
    for adapter, weight in reversed(self.loras):
      params = lora_lib.unmerge(params, adapter, weight)
    return dataclasses.replace(self, params=params, loras=())

  @functools.cached_property
  def model(self) -> UNet:
    return build.make_model(self.config)

  @property
  def is_text_model(self) -> bool:
    return bool(self.config.model.context_dim)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of the images this model generates (for a latent model, what its VAE decodes to)."""
    if self.codec:
      size = self.config.model.image_size * self.codec.vae.downsample_factor
      return (size, size, self.codec.vae.in_channels)
    return self._noise_shape(None, None, conditioned=True)

  @property
  def noise_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of what the sampler runs on: the images, or a latent model's latents."""
    return self._noise_shape(None, None)

  def _noise_shape(self, height: int | None, width: int | None, conditioned: bool = False) -> tuple[int, int, int]:
    """noise_shape for images of height x width (None: the model's own size), which the U-Net's downsampling and
    the VAE's must divide; conditioned: for a U-Net that also takes an image condition."""
    mc = self.config.model
    factor = self.codec.vae.downsample_factor if self.codec else 1
    multiple = factor * 2 ** (len(mc.channel_mults) - 1)
    sides = []
    for name, value in (("height", height), ("width", width)):
      if value is not None and (not isinstance(value, (int, np.integer)) or value < 1 or value % multiple):
        raise ValueError(f"{name}={value!r} must be a positive multiple of {multiple} for this model")
      sides.append(mc.image_size if value is None else value // factor)
    if mc.in_channels != mc.output_channels and not conditioned:
      raise ValueError(f"this U-Net takes {mc.in_channels} channels and predicts {mc.output_channels}: it is "
                       f"conditioned on an image ({self.config.conditioning.kind}); sample it with upscale() or "
                       "inpaint_model()")
    return (sides[0], sides[1], mc.output_channels)

  def generate(self, prompt: str | Sequence[str] | None = None, *, num: int | None = None,
               label: int | Sequence[int] | None = None, negative_prompt: str | None = None,
               negative_label: int | None = None, seed: int = 0, latents: np.ndarray | None = None,
               sampler: str | None = None, steps: int | None = None, spacing: str | None = None,
               guidance_scale: float | None = None, guidance_rescale: float = 0.0, eta: float | None = None,
               clip_x0: bool | None = None, height: int | None = None, width: int | None = None,
               batch_size: int = 256, progress: Progress | None = None, control_image=None,
               control_scale: float = 1.0) -> Samples:
    """Images with seeds seed, seed + 1, ...: image i depends on its seed and condition alone, not on the batch.

    prompt (text models): one prompt for every image or one per image; None cycles through the config's
      text.sample_prompts. label (class models): likewise with classes; None cycles through them.
    num: how many images; default: one per prompt or label given as a list, or per row of `latents`, else 1.
    negative_prompt / negative_label: what guidance steers away from, in place of the empty prompt / null class.
    latents: initial noise [N, H, W, C] (the shape of `noise_shape`, or of the latents of height x width) in place
      of seed's; seeds still draw the noise of stochastic samplers.
    sampler, steps, spacing, guidance_scale, eta: None takes the config's sampling section. guidance_rescale:
      Lin et al. (2023), in [0, 1]. clip_x0: clip each denoised estimate to [-1, 1]; None decides from the data
      (pixel models clip, latent models do not).
    height, width: the images' size (None: the model's), a multiple of the U-Net's and the VAE's downsampling.
    progress(done, total) is called after each batch of at most batch_size images.
    control_image (a pipeline with_controlnet): uint8, or float in [0, 1], [H, W, C] for every image or
      [num, H, W, C], at the images' size; control_scale multiplies the ControlNet's residuals.
    """
    num = self._count(num, prompt, label, latents)
    shape = self._noise_shape(height, width)
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be at least 1")
    _check_seeds(seed, seed + num - 1)
    options = self._sampling_options(sampler=sampler, steps=steps, spacing=spacing, guidance_scale=guidance_scale,
                                     guidance_rescale=guidance_rescale, eta=eta, clip_x0=clip_x0,
                                     negative_prompt=negative_prompt, negative_label=negative_label)
    seeds = np.arange(seed, seed + num, dtype=np.int64)
    prompts = self._prompts(prompt, num)
    conds = self._cond(label, prompts, num)
    noise = None if latents is None else self._check_latents(latents, num, shape)
    controls = self._controls(control_image, control_scale, num, shape, options)
    def sample_batch(pad):
      seeded, keys = gen.seeded_noise(shape, pad(seeds))
      batch_options = options if controls is None else dict(options, control=pad(controls))
      return self._sample(seeded if noise is None else pad(noise), keys, pad(conds), batch_options)
    sampled = _in_batches(num, batch_size, sample_batch, progress)
    cycled = prompt is None and label is None
    cycle = (len(self.config.text.sample_prompts or ("",)) if prompts else self.config.model.num_classes) or None
    return self._samples(sampled, seeds, prompts, None if prompts else conds, cycle if cycled else None)

  def interpolate(self, num_frames: int = 8, *, seed: int = 0, seed_end: int | None = None,
                  prompt: str | None = None, prompt_end: str | None = None, label: int | None = None,
                  label_end: int | None = None, **options) -> Samples:
    """Frames along the spherical path from seed's noise to seed_end's (default seed + 1), sampled
    deterministically (eta 0); a class model's label switches from label to label_end halfway (a text model's
    prompt from prompt to prompt_end). options: generate's sampling options."""
    options = self._sampling_options(**options)
    if options["sampler"] == "ddpm":
      raise ValueError("sampler='ddpm' is stochastic; interpolate with a deterministic one, e.g. ddim")
    seed_end = seed + 1 if seed_end is None else seed_end
    if num_frames < 2:
      raise ValueError(f"num_frames={num_frames} must be at least 2")
    _check_seeds(seed, seed_end)
    first, second = (num_frames + 1) // 2, num_frames // 2
    prompts = None
    if self.is_text_model:
      start = (self.config.text.sample_prompts or ("",))[0] if prompt is None else prompt
      prompts = [start] * first + [start if prompt_end is None else prompt_end] * second
      conds = self._cond(label, prompts, num_frames)
    else:
      self._prompts(prompt if prompt_end is None else prompt_end, 0)  # raises: this model takes no prompt
      conds = self._interpolation_labels(label, label_end, first, second)
    noise = gen.interpolation_noise(seed, seed_end, num_frames, self.noise_shape)
    sampled = self._sample(noise, None, conds, dict(options, eta=0.0))
    seeds = np.array([seed] * first + [seed_end] * second)
    return self._samples(sampled, seeds, prompts, None if prompts else conds, None)

  def invert(self, images: np.ndarray, *, prompt: str | Sequence[str] | None = None,
             label: int | Sequence[int] | None = None, steps: int | None = None, spacing: str | None = None,
             refine: int = 0, clip_x0: bool | None = None) -> np.ndarray:
    """DDIM inversion: the initial noise [N, *noise_shape] from which generate(latents=noise, sampler="ddim",
    eta=0, guidance_scale=1) with the same steps, spacing and condition reproduces uint8 `images`.
    refine > 0 adds fixed-point iterations per step (one model evaluation each)."""
    options = self._sampling_options(sampler="ddim", steps=steps, spacing=spacing, clip_x0=clip_x0)
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != self.image_shape:
      raise ValueError(f"images must be uint8 [N, {', '.join(map(str, self.image_shape))}], got "
                       f"{images.dtype} {images.shape}")
    conds = self._cond(label, self._prompts(prompt, len(images)), len(images))
    x0 = imaging.uint8_to_model_range(images)
    if self.codec:
      x0 = self.codec.encode(x0)  # the posterior mean
    return np.asarray(gen.invert_unet(self.params, options["schedule"], x0, conds, model=self.model,
                                      prediction=self.config.diffusion.prediction, steps=options["steps"],
                                      spacing=options["spacing"], refine=refine, clip_x0=options["clip_x0"]))

  def img2img(self, images: np.ndarray, prompt: str | Sequence[str] | None = None, *, strength: float = 0.8,
              label: int | Sequence[int] | None = None, seed: int = 0, latents: np.ndarray | None = None,
              batch_size: int = 256, progress: Progress | None = None, **options) -> Samples:
    """uint8 `images` [N, H, W, C] redrawn (SDEdit): noised to the level of the first of the last
    int(steps * strength) steps, which then run (diffusers' img2img). strength 0 returns the images (through the
    VAE for a latent model); 1 regenerates them from noise. prompt / label as generate, one or one per image;
    latents: the noise [N, *noise_shape] in place of seed's; options: generate's sampling options."""
    return self._edit(images, None, prompt, label, strength=strength, seed=seed, latents=latents,
                      batch_size=batch_size, progress=progress, options=options)

  def inpaint(self, images: np.ndarray, mask: np.ndarray, prompt: str | Sequence[str] | None = None, *,
              strength: float = 1.0, resample_jumps: int = 0, resample_rounds: int = 0,
              label: int | Sequence[int] | None = None, seed: int = 0, latents: np.ndarray | None = None,
              batch_size: int = 256, progress: Progress | None = None, **options) -> Samples:
    """uint8 `images` [N, H, W, C] with the region where `mask` is 1 (white) regenerated and the rest kept, with
    any model (jdiff.editing): a pixel model's output equals the images outside the mask exactly; a latent model
    regenerates every latent pixel the mask touches and decodes the whole image.

    mask: [H, W] or [N, H, W] (a trailing axis of 1 allowed), bool, uint8 (>= 128: regenerate) or float in [0, 1].
    strength < 1 starts the masked region from the image noised part-way, as img2img. resample_jumps,
    resample_rounds: RePaint's resampling, each segment of that many steps sampled again that many times.
    Everything else as img2img. A model trained for inpainting (config.conditioning.kind 'inpainting', or Stable
    Diffusion's 9-channel U-Net) fills the mask itself: inpaint_model, from noise (strength 1, no resampling)."""
    if self.config.conditioning.kind == "inpainting":
      if strength != 1.0 or resample_jumps or resample_rounds:
        raise ValueError(f"this model was trained for inpainting and regenerates the masked region from noise: drop "
                         f"strength={strength}, resample_jumps={resample_jumps}, resample_rounds={resample_rounds}")
      return self.inpaint_model(images, mask, prompt, label=label, seed=seed, latents=latents, batch_size=batch_size,
                                progress=progress, **options)
    return self._edit(images, mask, prompt, label, strength=strength, seed=seed, latents=latents,
                      batch_size=batch_size, progress=progress, options=options, resample_jumps=resample_jumps,
                      resample_rounds=resample_rounds)

  def outpaint(self, images: np.ndarray, prompt: str | Sequence[str] | None = None, *, left: int = 0,
               right: int = 0, top: int = 0, bottom: int = 0, overlap: int = 2, **inpaint_options) -> Samples:
    """uint8 `images` [N, H, W, C] on a canvas extended by that many pixels on each side, the new area inpainted.
    The new area starts as the nearest edge pixels (what strength < 1 starts from), and the mask reaches `overlap`
    pixels into the image so the seam itself is redrawn. The canvas must be a size the model runs at.
    inpaint_options: inpaint's (strength, resample_jumps, resample_rounds, label, seed, sampling options)."""
    images = self._check_images(images)
    sides = dict(left=left, right=right, top=top, bottom=bottom, overlap=overlap)
    for name, value in sides.items():
      if not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name}={value!r} must be a whole number of pixels >= 0")
    if not left + right + top + bottom:
      raise ValueError("outpaint needs a side to extend: pass left=, right=, top= or bottom= (pixels)")
    n, h, w, _ = images.shape
    height, width = h + top + bottom, w + left + right
    try:
      self._noise_shape(height, width)
    except ValueError as error:
      raise ValueError(f"outpainting {h}x{w} images by left={left}, right={right}, top={top}, bottom={bottom} gives "
                       f"{height}x{width}: {error}; change the extension") from None
    canvas = np.pad(images, ((0, 0), (top, bottom), (left, right), (0, 0)), mode="edge")
    kept = np.zeros((height, width), bool)
    reach = lambda side: overlap if side else 0
    kept[top + reach(top): top + h - reach(bottom), left + reach(left): left + w - reach(right)] = True
    return self.inpaint(canvas, np.broadcast_to(~kept, (n, height, width)), prompt, **inpaint_options)

  def _check_images(self, images) -> np.ndarray:
    images = np.asarray(images)
    channels = self.image_shape[-1]
    if images.dtype != np.uint8 or images.ndim != 4:
      raise ValueError(f"images must be uint8 [N, H, W, {channels}], got {images.dtype} {list(images.shape)}")
    if images.shape[-1] != channels:
      raise ValueError(f"images have {images.shape[-1]} channels, this model takes {channels}: convert them to "
                       f"{'grayscale' if channels == 1 else 'RGB' if channels == 3 else f'{channels} channels'}")
    return images

  def _check_mask(self, mask, images: np.ndarray) -> np.ndarray:
    """The mask as float [N, H, W, 1] at the images' size, 1 = regenerate."""
    n, h, w, _ = images.shape
    mask = np.asarray(mask)
    if mask.ndim in (3, 4) and mask.shape[-1] == 1 and mask.shape[-3:-1] == (h, w):
      mask = mask[..., 0]
    if mask.shape not in ((h, w), (n, h, w)):
      raise ValueError(f"mask has shape {list(mask.shape)} but the images are {h}x{w}: give a mask [{h}, {w}] or "
                       f"[{n}, {h}, {w}] (1 or white = regenerate)")
    if mask.dtype == np.uint8:
      mask = mask >= 128
    mask = mask.astype(np.float32)
    if not np.all((mask >= 0) & (mask <= 1)):
      raise ValueError("mask values must be in [0, 1] (1 = regenerate), or bool, or uint8 (white = regenerate)")
    return np.broadcast_to(mask, (n, h, w))[..., None]

  def _edit(self, images, mask, prompt, label, *, strength: float, seed: int, latents, batch_size: int, progress,
            options: dict, resample_jumps: int = 0, resample_rounds: int = 0) -> Samples:
    images = self._check_images(images)
    num, h, w, _ = images.shape
    shape = self._noise_shape(h, w)
    if not (isinstance(strength, (int, float, np.floating)) and 0.0 <= strength <= 1.0):
      raise ValueError(f"strength={strength!r} must be in [0, 1] (0 keeps the images, 1 regenerates them)")
    for name, value in (("resample_jumps", resample_jumps), ("resample_rounds", resample_rounds)):
      if not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name}={value!r} must be a whole number >= 0 (0: no resampling)")
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be at least 1")
    _check_seeds(seed, seed + num - 1)
    mask = None if mask is None else self._check_mask(mask, images)
    if mask is not None and self.codec:  # a latent pixel is regenerated where any image pixel it covers is
      f = self.codec.vae.downsample_factor
      mask = mask.reshape(num, h // f, f, w // f, f, 1).max(axis=(2, 4))
    options = self._sampling_options(**options)
    seeds = np.arange(seed, seed + num, dtype=np.int64)
    prompts = self._prompts(prompt, num)
    conds = self._cond(label, prompts, num)
    noise = None if latents is None else self._check_latents(latents, num, shape)
    def edit_batch(pad):
      x0 = imaging.uint8_to_model_range(pad(images))
      x0 = np.asarray(self.codec.encode(x0)) if self.codec else x0  # the posterior mean
      seeded, keys = gen.seeded_noise(shape, pad(seeds))
      return self._edit_batch(x0, seeded if noise is None else pad(noise), pad(mask), keys, pad(conds), options,
                              strength=float(strength), resample_jumps=int(resample_jumps),
                              resample_rounds=int(resample_rounds))
    sampled = _in_batches(num, batch_size, edit_batch, progress)
    return self._samples(sampled, seeds, prompts, None if prompts else conds, None)

  def _edit_batch(self, x0, noise, mask, keys, conds, options: dict, **edit_options) -> np.ndarray:
    options = dict(options)
    negative = options.pop("negative_label")
    schedule = options.pop("schedule")
    negatives = None if negative is None else np.broadcast_to(np.asarray(negative, np.int32),
                                                              (len(noise),) + np.shape(negative))
    return np.asarray(gen.edit_unet(self.model, self.params, schedule, x0, noise, keys, mask=mask, labels=conds,
                                    negative_labels=negatives, prediction=self.config.diffusion.prediction,
                                    **options, **edit_options))


  def upscale(self, images: np.ndarray, *, label: int | Sequence[int] | None = None, seed: int = 0,
              sampler: str | None = None, steps: int | None = None, spacing: str | None = None,
              guidance_scale: float | None = None, eta: float | None = None, clip_x0: bool | None = None,
              batch_size: int = 256, progress: Progress | None = None) -> Samples:
    """Super-resolution by a model trained with config.conditioning.kind 'super_resolution': uint8 images
    [N, h, w, C] -> Samples of [N, h * scale, w * scale, C], image i from seed + i. The low-resolution images are
    upsampled (config.conditioning.upsample) and fed beside the noise at every step. label: for a class-conditional
    model; the other options as in generate."""
    cc = self.config.conditioning
    if cc.kind != "super_resolution":
      raise ValueError(f"upscale needs a super-resolution model (config.conditioning.kind='super_resolution'); this "
                       f"one's kind is {cc.kind!r}")
    images = np.asarray(images)
    channels = self.config.model.output_channels
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != channels:
      raise ValueError(f"images must be uint8 [N, height, width, {channels}], got {images.dtype} {images.shape}")
    height, width = images.shape[1] * cc.scale, images.shape[2] * cc.scale
    shape = self._noise_shape(height, width, conditioned=True)
    low = imaging.uint8_to_model_range(images)
    image_cond = np.asarray(conditioning.super_resolution_condition(low, height, width, cc.upsample))
    options = self._sampling_options(sampler=sampler, steps=steps, spacing=spacing, guidance_scale=guidance_scale,
                                     eta=eta, clip_x0=clip_x0)
    conds = self._cond(label, None, len(images))
    sampled, seeds = self._sample_conditioned(image_cond, conds, None, seed, options, shape, batch_size, progress)
    return self._samples(sampled, seeds, None, conds, None)

  def inpaint_model(self, images: np.ndarray, mask: np.ndarray, prompt: str | Sequence[str] | None = None, *,
                    label: int | Sequence[int] | None = None, negative_prompt: str | None = None,
                    negative_label: int | None = None, seed: int = 0, latents: np.ndarray | None = None,
                    sampler: str | None = None, steps: int | None = None, spacing: str | None = None,
                    guidance_scale: float | None = None, guidance_rescale: float = 0.0, eta: float | None = None,
                    clip_x0: bool | None = None, batch_size: int = 256, progress: Progress | None = None) -> Samples:
    """Inpainting by a model trained for it: Stable Diffusion's 9-channel inpainting U-Net (a diffusers directory),
    or a jdiff model with config.conditioning.kind 'inpainting'. The U-Net sees [x_t, mask, masked image] (a latent
    model: the mask at the latents' size and the masked image's latents, the VAE's posterior mean) at every step
    and generates the whole image, the known region included, from noise.

    images: uint8 [N, H, W, C]. mask: [N, H, W] or [N, H, W, 1], or one [H, W] for all: True, >= 0.5 (float) or
    >= 128 (uint8) where the model fills in. A mask of all ones generates from scratch. latents: initial noise
    [N, *noise shape] in place of seed's. prompt, label and the rest as in generate.
    """
    images = np.asarray(images)
    channels = self.image_shape[-1]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != channels:
      raise ValueError(f"images must be uint8 [N, height, width, {channels}], got {images.dtype} {images.shape}")
    num, height, width = images.shape[:3]
    mc = self.config.model
    if mc.cond_channels != mc.output_channels + 1:
      raise ValueError(f"inpaint_model needs a U-Net trained for inpainting, taking [x, mask, masked image] "
                       f"({2 * mc.output_channels + 1} channels); this one takes {mc.in_channels}")
    shape = self._noise_shape(height, width, conditioned=True)
    fill = _mask_array(mask, num, height, width)
    x = imaging.uint8_to_model_range(images)
    if self.codec:
      factor = self.codec.vae.downsample_factor
      masked = self.codec.encode(np.asarray(conditioning.masked(x, fill)))
      image_cond = np.concatenate([np.asarray(conditioning.mask_to_latent_size(fill, factor)), np.asarray(masked)],
                                  axis=-1)
    else:
      image_cond = np.asarray(conditioning.inpainting_condition(x, fill))
    options = self._sampling_options(sampler=sampler, steps=steps, spacing=spacing, guidance_scale=guidance_scale,
                                     guidance_rescale=guidance_rescale, eta=eta, clip_x0=clip_x0,
                                     negative_prompt=negative_prompt, negative_label=negative_label)
    prompts = self._prompts(prompt, num)
    conds = self._cond(label, prompts, num)
    noise = None if latents is None else self._check_latents(latents, num, shape)
    sampled, seeds = self._sample_conditioned(image_cond, conds, noise, seed, options, shape, batch_size, progress)
    return self._samples(sampled, seeds, prompts, None if prompts else conds, None)

  def _sample_conditioned(self, image_cond: np.ndarray, conds, noise, seed: int, options: dict, shape,
                          batch_size: int, progress: Progress | None) -> tuple[np.ndarray, np.ndarray]:
    """(what the sampler returns, seeds) for one image condition per row, in batches of at most batch_size (a
    short last batch padded, so that every batch reuses one compiled program)."""
    num = len(image_cond)
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be at least 1")
    _check_seeds(seed, seed + num - 1)
    seeds = np.arange(seed, seed + num, dtype=np.int64)
    options = dict(options)
    negative, schedule = options.pop("negative_label"), options.pop("schedule")
    def sample_batch(pad):
      seeded, keys = gen.seeded_noise(shape, pad(seeds))
      negatives = None if negative is None else np.broadcast_to(np.asarray(negative, np.int32),
                                                                (len(keys),) + np.shape(negative))
      return gen.sample_conditioned(self.model, self.params, schedule, seeded if noise is None else pad(noise),
                                    keys, pad(image_cond), labels=pad(conds), negative_labels=negatives,
                                    prediction=self.config.diffusion.prediction, **options)
    return _in_batches(num, batch_size, sample_batch, progress), seeds

  def _count(self, num, prompt, label, latents) -> int:
    if prompt is not None and not (isinstance(prompt, str) or _is_str_sequence(prompt)):
      raise TypeError(f"prompt must be a string or a list of strings, got {prompt!r}; to set how many images, "
                      "pass num=...")
    if num is None:
      given = [len(x) for x in (prompt, label, latents) if x is not None and not isinstance(x, (str, int))
               and np.ndim(x) > 0]
      num = given[0] if given else 1
    if not isinstance(num, (int, np.integer)) or num < 1:
      raise ValueError(f"num={num!r} must be an integer >= 1")
    return int(num)

  def _check_latents(self, latents, num: int, shape: tuple[int, int, int]) -> np.ndarray:
    latents = np.asarray(latents)
    expected = (num, *shape)
    if latents.shape != expected or not np.issubdtype(latents.dtype, np.floating):
      raise ValueError(f"latents must be float {list(expected)}, got {latents.dtype} {list(latents.shape)}")
    if not np.all(np.isfinite(latents)):
      raise ValueError("latents hold NaN or infinite values")
    return latents.astype(np.float32)

  def _samples(self, sampled: np.ndarray, seeds, prompts, labels, cycle) -> Samples:
    decoded = np.asarray(self.codec.decode(sampled)) if self.codec else sampled
    return Samples(images=imaging.model_range_to_uint8(decoded), seeds=seeds, labels=labels,
                   prompts=None if prompts is None else tuple(prompts),
                   latents=sampled if self.codec else None, cycle=cycle)

  def _interpolation_labels(self, label, label_end, first: int, second: int) -> np.ndarray | None:
    if not self.config.model.num_classes:
      return self._labels(label if label_end is None else label_end, 0)  # raises if a label was given
    label = 0 if label is None else label
    return np.concatenate([self._labels(label, first),
                           self._labels(label if label_end is None else label_end, second)])

  def _sampling_options(self, *, sampler: str | None = None, steps: int | None = None, spacing: str | None = None,
                        guidance_scale: float | None = None, guidance_rescale: float = 0.0,
                        negative_label: int | None = None, negative_prompt: str | None = None,
                        eta: float | None = None, clip_x0: bool | None = None) -> dict:
    """The sampler's keyword arguments, defaults filled in from the config and every value checked."""
    sc = self.config.sampling
    schedule = self.schedule
    if self.scheduler_config is not None and spacing is None:
      self._check_sampler(sampler or sc.sampler, sc.steps, sc.spacing)
      schedule, shipped = self._scheduler_options(sampler)
      sampler, spacing = shipped["sampler"], shipped["spacing"]
      eta = shipped["eta"] if eta is None else eta
      clip_x0 = shipped["clip_x0"] if clip_x0 is None else clip_x0
    sampler, spacing = sampler or sc.sampler, spacing or sc.spacing
    if spacing == "flow":
      spacing = self._flow_levels()
    steps = sc.steps if steps is None else steps
    self._check_sampler(sampler, steps, spacing)
    if sampler == "lcm" and isinstance(spacing, str):
      spacing = self._lcm_spacing()
    if not 0.0 <= guidance_rescale <= 1.0:
      raise ValueError(f"guidance_rescale={guidance_rescale} must be in [0, 1]")
    eta = sc.eta if eta is None else eta
    if not (np.isfinite(eta) and eta >= 0):
      raise ValueError(f"eta={eta} must be a finite number >= 0 (0 = deterministic)")
    negative = None if negative_label is None else int(self._labels(negative_label, 1)[0])
    if self.is_text_model:  # A text model's negative is token ids: the empty prompt's by default.
      negative = self._tokens(negative_prompt or "")[0]
    elif negative_prompt is not None:
      raise ValueError(f"negative_prompt={negative_prompt!r} given, but this model takes no text "
                       "(config.model.context_dim=0)")
    return dict(sampler=sampler, steps=steps, spacing=spacing, guidance_rescale=guidance_rescale,
                guidance_scale=self._check_guidance(sc.guidance_scale if guidance_scale is None else guidance_scale),
                negative_label=negative, eta=eta, schedule=schedule,
                clip_x0=self.config.clip_x0 if clip_x0 is None else bool(clip_x0))

  def _flow_levels(self) -> schedulers.FlowMatchLevels:
    """The 'flow' spacing of a flow model: FlowMatchEuler's levels with the model's shift."""
    dc = self.config.diffusion
    if dc.prediction != "flow":
      raise ValueError(f"spacing 'flow' is for flow models; this one predicts {dc.prediction!r}: choose one of "
                       f"{', '.join(s for s in samplers.SPACINGS if s != 'flow')}")
    return schedulers.FlowMatchLevels(shift=dc.flow_shift_for(self.config.model.image_size),
                                      dynamic=dc.flow_resolution_shift, num_train_timesteps=dc.num_timesteps)

  def _lcm_spacing(self) -> samplers.LCMSpacing:
    """The 'lcm' sampler's timesteps and boundary condition: those a consistency-distilled model was trained with
    (config.distill), else LCMScheduler's defaults."""
    dc = self.config.distill
    if dc.enabled and dc.method == "lcm":
      return samplers.LCMSpacing(original_steps=self.config.diffusion.num_timesteps // dc.skip_steps,
                                 timestep_scaling=dc.timestep_scaling)
    return samplers.LCMSpacing()

  def _scheduler_options(self, sampler: str | None) -> tuple[Schedule, dict]:
    """The schedule and sampler options of the directory's scheduler config, read as `sampler`'s class (None: its
    own class), as diffusers' pipeline samples with it."""
    try:
      return schedulers.sampler_options_from_diffusers(self.scheduler_config, sampler)
    except ValueError as error:
      raise ValueError(f"{error} (in {self.source}/scheduler/scheduler_config.json; or pass a spacing name to "
                       "sample with jdiff's own conventions)") from None

  def _sample(self, noise, keys, conds, options: dict) -> np.ndarray:
    """What the sampler returns from initial noise (images in [-1, 1], or latents), as a host array; keys=None
    for deterministic sampling (eta 0), which draws nothing."""
    if keys is None:
      keys = jax.random.split(jax.random.key(0), len(noise))
    options = dict(options)
    negative = options.pop("negative_label")
    schedule = options.pop("schedule")
    negatives = None if negative is None else np.broadcast_to(np.asarray(negative, np.int32),
                                                              (len(noise),) + np.shape(negative))
    if self.controlnet is not None:
      if "control" not in options:
        raise ValueError("a pipeline with a ControlNet samples only through generate(control_image=...)")
      options.update(controlnet=self.controlnet.model, control_params=self.controlnet.params)
    return np.asarray(gen.sample_unet(self.model, self.params, schedule, noise, keys, labels=conds,
                                      negative_labels=negatives, prediction=self.config.diffusion.prediction,
                                      **options))

  def with_controlnet(self, controlnet: str | control.Control, *, step: int | None = None) -> Pipeline:
    """This pipeline steered by a ControlNet: a jdiff ControlNet work dir (its EMA params at `step`, default the
    latest), a diffusers ControlNetModel directory (config.json and diffusion_pytorch_model.safetensors), or a
    jdiff.control.Control. One that does not fit this base model raises ValueError naming the shapes that differ."""
    unet_params = self.params["unet"] if self.is_text_model else self.params
    if isinstance(controlnet, str):
      where = controlnet
      controlnet = control.load(controlnet, self.config.model, step=step, dtype=self.config.model.dtype)
    else:
      where = "given"
    control.check_fits(controlnet.model, controlnet.params, self.config.model, unet_params, where)
    return dataclasses.replace(self, controlnet=dataclasses.replace(
        controlnet, model=dataclasses.replace(controlnet.model, config=self.config.model)))

  def _controls(self, control_image, control_scale: float, num: int, shape, options: dict) -> np.ndarray | None:
    """The control images [num, ...] in [0, 1] (control_scale goes into options), or None without a ControlNet."""
    if self.controlnet is None:
      if control_image is not None:
        raise ValueError("control_image given, but this pipeline has no ControlNet: use "
                         "pipe.with_controlnet(path) first")
      return None
    if control_image is None:
      raise ValueError("this pipeline has a ControlNet: pass control_image=... (or use the pipeline without it)")
    if not (np.isfinite(control_scale) and control_scale >= 0):
      raise ValueError(f"control_scale={control_scale} must be a finite number >= 0")
    options["control_scale"] = float(control_scale)
    f = self.controlnet.model.control_factor
    return control.control_images(control_image, num,
                                  (shape[0] * f, shape[1] * f, self.controlnet.model.conditioning_channels))

  def _prompts(self, prompt, num: int) -> list[str] | None:
    """A text model's prompt for each of `num` images (None: cycle through config.text.sample_prompts)."""
    if not self.is_text_model:
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
    return self._tokens(prompts)

  def _tokens(self, prompts: str | list[str]) -> np.ndarray:
    if self.tokenizer is None:
      raise ValueError(f"this pipeline has no tokenizer for its prompts: pass jdiff.load({self.source!r}, "
                       "tokenizer=...) an object whose encode(prompts) returns int32 token ids [N, "
                       f"{self.config.text.max_length}]")
    return np.asarray(self.tokenizer.encode(prompts), np.int32)

  def _labels(self, label, num: int) -> np.ndarray | None:
    num_classes = self.config.model.num_classes
    if not num_classes:
      if label is not None:
        raise ValueError(f"label={label!r} given, but this model is unconditional (config.model.num_classes=0)")
      return None
    labels = np.arange(num) % num_classes if label is None else np.asarray(label)
    if labels.ndim == 0:
      labels = np.broadcast_to(labels, (num,))
    if labels.shape != (num,):
      raise ValueError(f"got {len(labels)} labels for {num} images: give one label, or one per image")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
      raise ValueError(f"label {int(bad[0])} is outside this model's classes: use 0..{num_classes - 1}")
    return labels.astype(np.int32)

  def _check_guidance(self, guidance_scale: float) -> float:
    if not (np.isfinite(guidance_scale) and guidance_scale >= 0):
      raise ValueError(f"guidance_scale={guidance_scale} must be a finite number >= 0 (1 = no guidance)")
    conditional = self.config.model.num_classes or self.config.model.context_dim
    if guidance_scale != 1.0 and not conditional:
      raise ValueError(f"guidance_scale={guidance_scale} needs a conditional model; this one is unconditional: "
                       "use guidance_scale=1")
    return float(guidance_scale) if conditional else 1.0

  def _check_sampler(self, sampler: str, steps: int, spacing) -> None:
    if sampler not in samplers.SAMPLERS:
      raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(samplers.SAMPLERS)}")
    if isinstance(spacing, str) and spacing not in samplers.SPACINGS or \
        not isinstance(spacing, str) and not callable(getattr(spacing, "levels", None)):
      raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(samplers.SPACINGS)}, or a rule with "
                       "a levels method (jdiff.schedulers.DiffusersLevels)")
    if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= self.config.diffusion.num_timesteps:
      raise ValueError(f"steps={steps!r} must be an integer between 1 and the model's "
                       f"{self.config.diffusion.num_timesteps} diffusion timesteps")


def _in_batches(num: int, batch_size: int, sample_batch: Callable, progress: Progress | None) -> np.ndarray:
  """sample_batch(pad) over batches of min(batch_size, num) rows, concatenated: pad(a) is a's rows of the batch (None
  stays None), a short last batch padded by repeating its last row, so that every batch reuses one compiled
  program."""
  size = min(batch_size, num)
  outputs = []
  for start in range(0, num, size):
    part = slice(start, min(start + size, num))
    n = part.stop - part.start
    pad = lambda a: None if a is None else np.concatenate([a[part], np.repeat(a[part][-1:], size - n, axis=0)])
    outputs.append(np.asarray(sample_batch(pad))[:n])
    if progress:
      progress(part.stop, num)
  return np.concatenate(outputs)


def _is_str_sequence(value) -> bool:
  return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def _mask_array(mask, num: int, height: int, width: int) -> np.ndarray:
  """float32 [num, height, width, 1], 1 where to fill in, from a mask as inpaint_model takes it."""
  mask = np.asarray(mask)
  if mask.ndim == 4 and mask.shape[-1] == 1:
    mask = mask[..., 0]
  if mask.ndim == 2:
    mask = np.broadcast_to(mask, (num, *mask.shape))
  if mask.shape != (num, height, width):
    raise ValueError(f"mask must be [{num}, {height}, {width}] (or [{height}, {width}] for every image), got "
                     f"{list(mask.shape)}")
  threshold = 128 if mask.dtype == np.uint8 else 0.5
  return (mask >= threshold).astype(np.float32)[..., None]


def _check_seeds(first: int, last: int) -> None:
  """Seeds become uint32 PRNG keys: outside [0, 2**32) two seeds would silently give the same image."""
  for seed in (first, last):
    if not 0 <= seed < 2**32:
      raise ValueError(f"seed {seed} is outside [0, 2**32): use seeds from 0 to {2**32 - 1}")


def load(path: str, step: int | None = None, ema: bool = True, *, dtype: str | None = None,
         variant: str | None = None, tokenizer: PromptTokenizer | None = None) -> Pipeline:
  """A model ready to sample, replicated over this process's devices (sampling splits its batch over them), from
  `path`: a work dir that train.py wrote, or a diffusers pipeline directory (model_index.json beside unet/ and
  scheduler/, and for Stable Diffusion vae/, text_encoder/ and tokenizer/).

  Work dirs: the latest checkpoint, or `step`; EMA params by default. Without `step`, an unreadable latest checkpoint
  is reported (a warning naming its path) and the one before it is used; a given `step` that is unreadable raises
  UnreadableCheckpointError.
  Diffusers directories: dtype ('float32', the default, 'bfloat16' or 'float16') is the params' and the networks'
  compute dtype (schedules and sampler updates stay fp32); variant picks weight files such as
  diffusion_pytorch_model.fp16.safetensors; tokenizer turns prompts into token ids: an object whose
  encode(prompts) returns int32 ids [N, max_length] (default: CLIP's, from the directory's tokenizer/). generate
  then samples as the directory's scheduler config says (jdiff.schedulers) unless given a spacing name.
  """
  if pretrained.is_diffusers_dir(path):
    if step is not None or not ema:
      raise ValueError(f"{path} is a diffusers directory: step and ema apply to jdiff work dirs")
    return _load_diffusers(path, dtype or "float32", variant, tokenizer)
  if os.path.isfile(path):
    raise ValueError(f"{path} is a file; jdiff.load reads a work dir or a diffusers directory (with model_index.json). "
                     f"For a single-file checkpoint: {weights.CONVERT_HINT}")
  if (dtype, variant, tokenizer) != (None, None, None):
    raise ValueError(f"dtype, variant and tokenizer apply to diffusers directories; {path} is not one (it has no "
                     "model_index.json)")
  return _load_workdir(path, step, ema)


def _load_workdir(workdir: str, step: int | None, ema: bool) -> Pipeline:
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
  replicated = sharding.over_devices(jax.local_devices())

  def restore(s: int) -> Pipeline:
    raw = checkpoint.restore_config_checked(manager, s)
    if is_vae_config(raw):
      raise ConfigError(f"work dir {workdir!r} holds a VAE, not a diffusion model: sample from a latent diffusion "
                        "work dir that uses it, or measure it with bench/vae_psnr.py")
    if "controlnet" in raw:
      raise ConfigError(f"work dir {workdir!r} holds a ControlNet: load its base and attach it, "
                        f"jdiff.load(base).with_controlnet({workdir!r})")
    config = parse_config(raw)
    if config.lora.enabled:
      raise ConfigError(f"work dir {workdir!r} holds LoRA adapters of {config.finetune.base}, not a model: apply them "
                        f"to it with jdiff.load({config.finetune.base!r}).with_lora({workdir!r}), or sample.py "
                        f"--workdir {config.finetune.base} --lora {workdir}")
    if config.distill.enabled:  # a distilled student samples the steps it was distilled for
      config = dataclasses.replace(config, sampling=dataclasses.replace(
          config.sampling, steps=config.distill.student_steps(s)))
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                                      build.abstract_params(config))
    params = checkpoint.restore_params(manager, s, abstract, "ema_params" if ema else "params")
    return Pipeline(config=config, params=params, step=s, codec=_codec(config))

  if step is not None:
    return restore(step)
  return checkpoint.restore_latest(manager, restore)[1]


def from_state(config, state, *, ema: bool = True) -> Pipeline:
  """A pipeline on parameters in memory, no work dir needed.

  config: the run's config (a ConfigDict, dict or typed Config); for a latent model, the one training resolved
    (TrainResult.config), which names the VAE and its scaling factor.
  state: what training returns (a TrainResult or TrainState: its EMA params, or params with ema=False), or a
    params tree itself.
  """
  state = getattr(state, "state", state)
  params = getattr(state, "ema_params" if ema else "params", state)
  config = config if isinstance(config, Config) else parse_config(config)
  return Pipeline(config=config, params=params, step=int(state.step) if hasattr(state, "step") else None,
                  codec=_codec(config))


def _codec(config: Config) -> latent.LatentCodec | None:
  if not config.latent.enabled:
    return None
  if not (config.latent.scaling_factor and os.path.isabs(config.latent.vae_workdir)):
    raise ConfigError("this latent model's config does not name its trained VAE and scaling factor: pass the config "
                      "that training resolved (TrainResult.config, or the one in its checkpoints)")
  return latent.load_codec(config)


def _load_diffusers(path: str, dtype: str, variant: str | None, tokenizer) -> Pipeline:
  """A Pipeline on a diffusers directory's components, with the typed Config jdiff would train it with, sampling
  as its scheduler config says and reading prompts with its tokenizer/ (CLIP's BPE) unless given `tokenizer`."""
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
  parts = pretrained.read_components(path, dtype=dtype, variant=variant,
                                     sharding=sharding.over_devices(jax.local_devices()))
  raw, unet = parts.scheduler, parts.unet
  text = TextConfig()
  if parts.text:
    tc = parts.text
    text = TextConfig(max_length=tc.max_length, width=tc.width, depth=tc.depth, num_heads=tc.num_heads,
                      mlp_dim=tc.mlp_dim, causal=tc.causal, activation=tc.activation, trainable=False,
                      vocab_size=tc.vocab_size)
    if tokenizer is None and os.path.isdir(os.path.join(path, "tokenizer")):
      tokenizer = CLIPTokenizer.from_dir(os.path.join(path, "tokenizer"), max_length=tc.max_length)
  scheduler = raw
  try:
    _, shipped = schedulers.sampler_options_from_diffusers(raw)
    levels = shipped["spacing"]
    sampler, spacing, clip = shipped["sampler"], "karras" if levels.karras else levels.spacing, shipped["clip_x0"]
  except ValueError as error:  # jdiff cannot follow this scheduler: its own conventions, said out loud
    cls = raw.get("_class_name")
    sampler = {c: s for s, c in reversed(schedulers.CLASS_OF_SAMPLER.items())}.get(cls, "dpmpp_2m")
    spacing = raw.get("timestep_spacing", schedulers.CLASS_DEFAULTS.get(cls, {}).get("timestep_spacing"))
    spacing = spacing if spacing in samplers.SPACINGS else "trailing"
    clip, scheduler = bool(raw.get("clip_sample", False)), None
    warnings.warn(f"{path}/scheduler/scheduler_config.json: {error}; jdiff samples this model with its own "
                  f"conventions ({sampler}, {spacing} spacing)", stacklevel=3)
  factor = parts.vae.downsample_factor if parts.vae else 1
  conditional = bool(unet.context_dim or unet.num_classes)
  prediction = schedulers.PREDICTIONS[raw.get("prediction_type", "epsilon")]
  config = Config(seed=0, data=DataConfig(image_size=unet.image_size * factor), model=unet,
                  diffusion=DiffusionConfig(schedule=configs.schedule_name(raw),
                                            num_timesteps=int(raw.get("num_train_timesteps", 1000)),
                                            prediction=prediction,
                                            zero_terminal_snr=bool(raw.get("rescale_betas_zero_snr", False))),
                  training=TrainingConfig(), text=text,
                  sampling=SamplingConfig(sampler=sampler, spacing=spacing, guidance_scale=7.5 if conditional else 1.0,
                                          clip_x0=clip and parts.vae is None),
                  conditioning=ConditioningConfig(kind="inpainting" if unet.cond_channels == unet.output_channels + 1
                                                  else "none"))
  codec = parts.vae and latent.LatentCodec(parts.vae, parts.vae_params, parts.scaling_factor, sample=False)
  params = {"text_encoder": parts.text_params, "unet": parts.unet_params} if parts.text else parts.unet_params
  return Pipeline(config=config, params=params, codec=codec, tokenizer=tokenizer, source=os.path.abspath(path),
                  schedule=schedulers.diffusers_schedule(raw), scheduler_config=scheduler)


def export_diffusers(pipe: Pipeline, directory: str, *, overwrite: bool = False) -> None:
  """Writes a pipeline's U-Net, and its text encoder and VAE where it has them, as a diffusers directory:
  `diffusers` loads each component with from_pretrained(directory, subfolder=...) (a text-to-image latent model as a
  whole StableDiffusionPipeline) and computes what jdiff computes, and jdiff.load reads it back bit for bit.

  The scheduler config is the one the pipeline was read with, else jdiff's sampling defaults (its sampler's
  scheduler on its schedule); a diffusers directory's tokenizer/ is copied. An existing `directory` is replaced only
  with overwrite=True.
  """
  model = pipe.model
  text = model.text if isinstance(model, TextToImageUNet) else None
  source_scheduler = pipe.source and os.path.join(pipe.source, "scheduler", "scheduler_config.json")
  if source_scheduler and os.path.isfile(source_scheduler):
    scheduler = pretrained.read_config(pipe.source, "scheduler", "scheduler_config.json")
  else:
    dc, sc = pipe.config.diffusion, pipe.config.sampling
    scheduler = configs.diffusers_scheduler_config(schedule=dc.schedule, num_timesteps=dc.num_timesteps,
                                                   prediction=dc.prediction, sampler=sc.sampler, spacing=sc.spacing,
                                                   clip_x0=pipe.config.clip_x0, zero_terminal_snr=dc.zero_terminal_snr)
  tokenizer_dir = pipe.source and os.path.join(pipe.source, "tokenizer")
  codec = pipe.codec
  pretrained.export(directory, unet=pipe.config.model, unet_params=pipe.params["unet"] if text else pipe.params,
                    scheduler=scheduler, text=text, text_params=pipe.params["text_encoder"] if text else None,
                    vae=codec and codec.vae, vae_params=codec and codec.params,
                    scaling_factor=codec and codec.scaling_factor,
                    tokenizer_dir=tokenizer_dir if tokenizer_dir and os.path.isdir(tokenizer_dir) else None,
                    overwrite=overwrite)
