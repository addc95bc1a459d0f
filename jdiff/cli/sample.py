"""jdiff-sample (and sample.py): images from a trained work dir or a diffusers directory (Stable Diffusion), as a
PNG grid or an .npz of raw arrays.

  jdiff-sample --workdir runs/default --sampler dpmpp_2m --steps 10 --guidance_scale 3 --num 100 --out grid.png
  python sample.py --workdir runs/default --label 7 --num 64 --out sevens.npz
  python sample.py --workdir runs/default --interpolate 10 --seed 0 --label 3 --label_end 8 --out strip.png
  python sample.py --workdir runs/shapes --prompt "a red square" --guidance_scale 5 --out red.png
  python sample.py --workdir runs/sr_digits --upscale 2 --upscale_image low.png --out high.png
  python sample.py --workdir runs/shapes --lora runs/lora/lora.safetensors:0.8 --prompt "a red square" --out red.png
  python sample.py --model stable-diffusion-v1-5 --prompt "a photo of a cat" --sampler dpmpp_2m --steps 25 \
    --guidance_scale 7.5 --height 512 --width 512 --num 1 --out cat.png
  python sample.py --workdir runs/default --init_image in.png --strength 0.6 --label 3 --out out.png
  python sample.py --workdir runs/default --init_image in.png --mask mask.png --label 3 --out out.png
  python sample.py --workdir runs/shapes --init_image in.png --outpaint left=8,right=8 --prompt "a red square" \
    --out wide.png

With --init_image, --num (default 1) edits of that image are made, with seeds SEED, SEED + 1, ...; one is written
as an image of its own size, several as a grid (docs/editing.md).

Flags are checked before the model loads; sampling imports no training code and no TensorFlow. The output is
locked (OUT.lock) from the start, so a second sample.py into the same file is refused at once, and written to a
temporary file that is renamed over it at the end.
"""
from __future__ import annotations

import os

import numpy as np
from absl import app, flags

from jdiff import images as imaging
from jdiff import locks
from jdiff.cli import runtime

FLAGS = flags.FlagValues()  # its own: both CLIs can load in one process (the tests do)
PROGRAM = "sample.py"

_WORKDIR = flags.DEFINE_string("workdir", None, "Work dir that train.py wrote.", flag_values=FLAGS)
_MODEL = flags.DEFINE_string("model", None, "A diffusers pipeline directory (model_index.json, unet/, vae/, "
                             "text_encoder/, tokenizer/, scheduler/), in place of --workdir.", flag_values=FLAGS)
_DTYPE = flags.DEFINE_string("dtype", "float32", "--model only: the networks' dtype: float32, bfloat16 or float16 "
                             "(sampler arithmetic stays float32).", flag_values=FLAGS)
_VARIANT = flags.DEFINE_string("variant", None, "--model only: the weight files' variant, e.g. fp16 for "
                               "diffusion_pytorch_model.fp16.safetensors.", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "Output file: .png for a grid, .npz for raw arrays "
                           "(default: WORKDIR/samples/sample.png; required with --model).", flag_values=FLAGS)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.", flag_values=FLAGS)
_CHECKPOINT = flags.DEFINE_integer("checkpoint", None, "Checkpoint step to load (default: the latest).",
                                   flag_values=FLAGS)
_NUM = flags.DEFINE_integer("num", 64, "Number of images.", flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Image i uses seed SEED + i.", flag_values=FLAGS)
_PROMPT = flags.DEFINE_string("prompt", None, "Text models: the prompt of every image (default: cycle through "
                              "the config's text.sample_prompts); \"\" samples unconditionally.", flag_values=FLAGS)
_NEGATIVE_PROMPT = flags.DEFINE_string("negative_prompt", None, "Text models: a prompt to steer away from, in place "
                                       "of the empty prompt.", flag_values=FLAGS)
_LABEL = flags.DEFINE_integer("label", None, "Class models: the class of every image (default: cycle through them).",
                              flag_values=FLAGS)
_NEGATIVE_LABEL = flags.DEFINE_integer("negative_label", None, "A class to steer away from, in place of the null "
                                       "class.", flag_values=FLAGS)
_SAMPLER = flags.DEFINE_string("sampler", None, "Sampler name (default: the config's; --model: the scheduler "
                               "config's class, read as this sampler's class when given).", flag_values=FLAGS)
_STEPS = flags.DEFINE_integer("steps", None, "Number of sampling steps (default: the config's).", flag_values=FLAGS)
_SPACING = flags.DEFINE_string("spacing", None, "Timestep spacing: leading, trailing, linspace, or karras sigmas "
                               "(default: the config's; --model: the scheduler config's conventions, which a "
                               "spacing replaces with jdiff's own).", flag_values=FLAGS)
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "Classifier-free guidance scale; 1 = none (default: the "
                               "config's).", flag_values=FLAGS)
_RESCALE = flags.DEFINE_float("guidance_rescale", 0.0, "Guidance rescale phi in [0, 1] (Lin et al., 2023).",
                              flag_values=FLAGS)
_ETA = flags.DEFINE_float("eta", None, "DDIM eta / ancestral noise (default: the config's).", flag_values=FLAGS)
_CLIP = flags.DEFINE_bool("clip_x0", None, "Clip each denoised estimate to [-1, 1] (--noclip_x0: don't); default: "
                          "the config's, which clips pixel models and not latent ones.", flag_values=FLAGS)
_INTERPOLATE = flags.DEFINE_integer("interpolate", None, "Write a strip of this many frames interpolating from seed "
                                    "SEED's noise to --seed_end's (and from --label to --label_end) instead.",
                                    flag_values=FLAGS)
_SEED_END = flags.DEFINE_integer("seed_end", None, "Last frame's seed for --interpolate (default: SEED + 1).",
                                 flag_values=FLAGS)
_LABEL_END = flags.DEFINE_integer("label_end", None, "Last frames' class for --interpolate (default: --label).",
                                  flag_values=FLAGS)
_PROMPT_END = flags.DEFINE_string("prompt_end", None, "Last frames' prompt for --interpolate (default: --prompt).",
                                  flag_values=FLAGS)
_INIT_IMAGE = flags.DEFINE_string("init_image", None, "Edit this PNG (grayscale or RGB, as the model's images) instead "
                                   "of generating: img2img, or inpainting with --mask, or outpainting with --outpaint.",
                                   flag_values=FLAGS)
_STRENGTH = flags.DEFINE_float("strength", None, "--init_image: how much to change, in [0, 1]: the last "
                               "int(steps * strength) steps run (default: 0.8 for img2img, 1 with --mask or "
                               "--outpaint).", flag_values=FLAGS)
_MASK = flags.DEFINE_string("mask", None, "--init_image: a PNG of the image's size, white where to regenerate, "
                            "black where to keep the image.", flag_values=FLAGS)
_OUTPAINT = flags.DEFINE_string("outpaint", None, "--init_image: extend the canvas and fill the new area, e.g. "
                                "left=8,right=8 (pixels; sides left, right, top, bottom).", flag_values=FLAGS)
_RESAMPLE = flags.DEFINE_string("resample", None, "--mask or --outpaint: RePaint resampling JUMPS,ROUNDS, e.g. 5,4: "
                                "each run of JUMPS steps is sampled again ROUNDS times.", flag_values=FLAGS)
_UPSCALE = flags.DEFINE_integer("upscale", None, "Super-resolution models: upscale --upscale_image by this factor "
                                "(the model's config.conditioning.scale) and write the image itself to --out.",
                                flag_values=FLAGS)
_UPSCALE_IMAGE = flags.DEFINE_string("upscale_image", None, "The low-resolution PNG for --upscale.",
                                     flag_values=FLAGS)
_HEIGHT = flags.DEFINE_integer("height", None, "Image height (default: the model's size).", flag_values=FLAGS)
_WIDTH = flags.DEFINE_integer("width", None, "Image width (default: the model's size).", flag_values=FLAGS)
_BATCH = flags.DEFINE_integer("batch_size", 256, "Images generated per compiled call.", flag_values=FLAGS)
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "CPU backend only: split the cores into this many XLA "
                                    "devices and the batch over them (0: one per core that divides the batch; one "
                                    "with --model, whose wide layers use every core, and whose params each device "
                                    "would hold).", flag_values=FLAGS)
_LORA = flags.DEFINE_multi_string("lora", [], "A LoRA to merge into the model, FILE[:WEIGHT] (weight default 1): a "
                                  ".safetensors file (diffusers'/PEFT's or kohya's layout) or a LoRA training work "
                                  "dir; repeat the flag to stack several.", flag_values=FLAGS)
_CONTROL_IMAGE = flags.DEFINE_string("control_image", None, "An image file (PNG, ...) that a ControlNet steers every "
                                     "image with, resized to the images' size (needs --controlnet, or a --workdir "
                                     "that trained a ControlNet).", flag_values=FLAGS)
_CONTROLNET = flags.DEFINE_string("controlnet", None, "A ControlNet: a work dir that trained one, or a diffusers "
                                  "ControlNetModel directory (config.json and safetensors).", flag_values=FLAGS)
_CONTROL_SCALE = flags.DEFINE_float("control_scale", 1.0, "The ControlNet's conditioning scale.", flag_values=FLAGS)
_KEEP_HOST_MEMORY = flags.DEFINE_bool("keep_host_memory", True, "CPU backend only: keep freed host memory for "
                                      "reuse (jdiff/cli/host_memory.py).", flag_values=FLAGS)


def output_path() -> str:
  if _MODEL.value and not _OUT.value:
    raise ValueError("--model needs --out, the file to write (.png or .npz)")
  out = _OUT.value or os.path.join(_WORKDIR.value, "samples", "sample.png")
  if not out.endswith((".png", ".npz")):
    raise ValueError(f"--out={out!r} must end in .png (a grid) or .npz (raw arrays)")
  if os.path.isdir(out):
    raise ValueError(f"--out={out!r} is a directory; give a file path")
  return out


def lock_output(out: str) -> locks.Lock:
  """The lock on `out` (OUT.lock) for the whole run, so that two sample.py never write one file; an existing `out`
  is refused, under the lock, unless --overwrite."""
  lock = locks.acquire(f"{out}.lock", f"--out={out!r}", "wait for it to finish or choose another --out")
  if os.path.exists(out) and not _OVERWRITE.value:
    lock.release()
    raise ValueError(f"--out={out!r} exists; choose another path or pass --overwrite to replace it")
  return lock


def write(samples, out: str) -> None:
  """Writes a temporary file beside `out` and renames it over `out`: readers see the old file or the new one,
  never half of one."""
  from jdiff import images as imaging  # pylint: disable=import-outside-toplevel
  root, ext = os.path.splitext(out)
  temporary = f"{root}.tmp-{os.getpid()}{ext}"
  try:
    if (_UPSCALE.value or _INIT_IMAGE.value and len(samples.images) == 1) and out.endswith(".png"):
      imaging.to_pil(samples.images[0]).save(temporary)  # the image itself, at its size
    else:
      samples.save(temporary, columns=_INTERPOLATE.value)  # an interpolation strip is one row
    os.replace(temporary, out)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


def check_flags() -> None:
  """Everything that can be judged without the model, so a typo costs no model load."""
  from jdiff import samplers  # pylint: disable=import-outside-toplevel
  if (_WORKDIR.value is None) == (_MODEL.value is None):
    raise ValueError("pass --workdir (a work dir that train.py wrote) or --model (a diffusers directory), not both")
  if _WORKDIR.value and (_DTYPE.value != "float32" or _VARIANT.value):
    raise ValueError("--dtype and --variant apply to --model; a work dir samples as it was trained")
  if _MODEL.value and _CHECKPOINT.value is not None:
    raise ValueError("--checkpoint applies to --workdir; a diffusers directory holds one model")
  if _NUM.value < 1 or _BATCH.value < 1:
    raise ValueError(f"--num={_NUM.value} and --batch_size={_BATCH.value} must be at least 1")
  if _INTERPOLATE.value is not None and _INTERPOLATE.value < 2:
    raise ValueError(f"--interpolate={_INTERPOLATE.value} must be at least 2 frames")
  if _INTERPOLATE.value and (_HEIGHT.value or _WIDTH.value):
    raise ValueError("--height and --width apply to generated images; --interpolate samples at the model's size")
  if _SAMPLER.value is not None and _SAMPLER.value not in samplers.SAMPLERS:
    raise ValueError(f"unknown sampler {_SAMPLER.value!r}; choose one of {', '.join(samplers.SAMPLERS)}")
  if _SPACING.value is not None and _SPACING.value not in samplers.SPACINGS:
    raise ValueError(f"unknown spacing {_SPACING.value!r}; choose one of {', '.join(samplers.SPACINGS)}")
  if _STEPS.value is not None and _STEPS.value < 1:
    raise ValueError(f"--steps={_STEPS.value} must be at least 1")
  if not 0 <= _SEED.value < 2**32:
    raise ValueError(f"--seed={_SEED.value} is outside [0, 2**32)")
  if (_UPSCALE.value is None) != (_UPSCALE_IMAGE.value is None):
    raise ValueError("--upscale and --upscale_image go together: the factor and the low-resolution PNG")
  if _UPSCALE.value is not None:
    if _INIT_IMAGE.value:
      raise ValueError("--upscale reads --upscale_image; --init_image is for editing: pass one of them")
    if _UPSCALE.value < 2:
      raise ValueError(f"--upscale={_UPSCALE.value} must be an integer factor of at least 2")
    if not os.path.isfile(_UPSCALE_IMAGE.value):
      raise ValueError(f"--upscale_image={_UPSCALE_IMAGE.value!r} is not a file; give the low-resolution PNG")
    if _INTERPOLATE.value or _HEIGHT.value or _WIDTH.value:
      raise ValueError("--upscale makes one image from --upscale_image: drop --interpolate, --height and --width")
  if _CONTROLNET.value and not _CONTROL_IMAGE.value:
    raise ValueError("--controlnet needs --control_image, the image that steers the samples")
  if _CONTROL_IMAGE.value and not os.path.isfile(_CONTROL_IMAGE.value):
    raise ValueError(f"--control_image={_CONTROL_IMAGE.value!r} is not a file: give an image file such as edges.png")
  if _CONTROL_IMAGE.value and _INTERPOLATE.value:
    raise ValueError("--control_image applies to generated images, not to --interpolate")
  if not _CONTROL_SCALE.value >= 0:
    raise ValueError(f"--control_scale={_CONTROL_SCALE.value} must be >= 0")
  if _CONTROL_IMAGE.value and (_INIT_IMAGE.value or _UPSCALE.value):
    raise ValueError("--control_image steers generated images: drop --init_image and --upscale")
  check_edit_flags()
  lora_specs()


EDIT_FLAGS = ("strength", "mask", "outpaint", "resample")
SIDES = ("left", "right", "top", "bottom")


def check_edit_flags() -> None:
  """The editing flags' values, and that the image and mask files read and agree."""
  given = [name for name in EDIT_FLAGS if FLAGS[name].present]
  if not _INIT_IMAGE.value:
    if given:
      raise ValueError(f"--{given[0]} edits an image: pass --init_image=in.png too")
    return
  if _INTERPOLATE.value or _HEIGHT.value or _WIDTH.value:
    raise ValueError("--init_image edits an image of its own size: drop --interpolate, --height and --width")
  if _MASK.value and _OUTPAINT.value:
    raise ValueError("--outpaint makes its own mask: pass --mask or --outpaint, not both")
  if _STRENGTH.value is not None and not 0.0 <= _STRENGTH.value <= 1.0:
    raise ValueError(f"--strength={_STRENGTH.value} must be in [0, 1] (0 keeps the image, 1 regenerates it)")
  if _RESAMPLE.value is not None and not (_MASK.value or _OUTPAINT.value):
    raise ValueError("--resample harmonises an inpainted region: pass --mask or --outpaint")
  resample_options()
  outpaint_sides()
  image = imaging.read_png(_INIT_IMAGE.value)
  if _MASK.value:
    mask = imaging.read_png(_MASK.value, grayscale=True)
    if mask.shape[:2] != image.shape[:2]:
      raise ValueError(f"--mask={_MASK.value!r} is {mask.shape[0]}x{mask.shape[1]} but --init_image="
                       f"{_INIT_IMAGE.value!r} is {image.shape[0]}x{image.shape[1]}: give a mask of the image's size")


def resample_options() -> dict:
  if _RESAMPLE.value is None:
    return {}
  parts = _RESAMPLE.value.split(",")
  if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
    raise ValueError(f"--resample={_RESAMPLE.value!r} must be JUMPS,ROUNDS, two whole numbers, e.g. 5,4")
  return dict(resample_jumps=int(parts[0]), resample_rounds=int(parts[1]))


def outpaint_sides() -> dict:
  if _OUTPAINT.value is None:
    return {}
  sides = {}
  for part in _OUTPAINT.value.split(","):
    name, _, value = part.partition("=")
    name = name.strip()
    if name not in SIDES or not value.strip().isdigit() or name in sides:
      raise ValueError(f"--outpaint={_OUTPAINT.value!r}: give SIDE=PIXELS pairs, each side once, sides "
                       f"{', '.join(SIDES)}, e.g. left=8,right=8")
    sides[name] = int(value)
  if not any(sides.values()):
    raise ValueError(f"--outpaint={_OUTPAINT.value!r} extends no side: give some SIDE=PIXELS above 0")
  return sides


def lora_specs() -> list[tuple[str, float]]:
  """(path, weight) of each --lora FILE[:WEIGHT], checked before the model loads."""
  specs = []
  for spec in _LORA.value:
    path, weight = spec, 1.0
    head, colon, tail = spec.rpartition(":")
    if colon:
      try:
        path, weight = head, float(tail)
      except ValueError:  # a colon inside the path
        pass
    if not os.path.exists(path):
      raise ValueError(f"--lora={spec!r}: no file or directory {path!r}; give FILE[:WEIGHT], e.g. "
                       "runs/lora/lora.safetensors:0.8")
    specs.append((path, weight))
  return specs


def sampling_options() -> dict:
  return dict(sampler=_SAMPLER.value, steps=_STEPS.value, spacing=_SPACING.value, guidance_scale=_GUIDANCE.value,
              guidance_rescale=_RESCALE.value, negative_label=_NEGATIVE_LABEL.value, eta=_ETA.value,
              negative_prompt=_NEGATIVE_PROMPT.value, clip_x0=_CLIP.value)


def main(argv):
  runtime.start_cli(argv)
  try:
    check_flags()
    out = output_path()
    lock = lock_output(out)
  except (ValueError, OSError, locks.LockedError) as e:
    runtime.fail(PROGRAM, e)
  with lock:
    sample_to(out)


def sample_to(out: str) -> None:
  runtime.tune_cpu_process(cpu_devices=_CPU_DEVICES.value or (1 if _MODEL.value else 0),
                           keep_host_memory=_KEEP_HOST_MEMORY.value,
                           micro_batch=_INTERPOLATE.value or min(_NUM.value, _BATCH.value))
  import jdiff  # pylint: disable=import-outside-toplevel
  from jdiff import control  # pylint: disable=import-outside-toplevel
  from jdiff.checkpoint import CheckpointError  # pylint: disable=import-outside-toplevel
  from jdiff.config import ConfigError  # pylint: disable=import-outside-toplevel
  try:
    controlnet, workdir, step = _CONTROLNET.value, _WORKDIR.value, _CHECKPOINT.value
    if _CONTROL_IMAGE.value and not controlnet:  # --workdir is a ControlNet run: its base is in its config
      controlnet, workdir, step = workdir, control.base_of(workdir), None
    if _MODEL.value:
      pipe = jdiff.load(_MODEL.value, dtype=_DTYPE.value, variant=_VARIANT.value)
    else:
      pipe = jdiff.load(workdir, step=step)
    for path, weight in lora_specs():
      pipe = pipe.with_lora(path, weight)
    options = {}
    if controlnet:
      pipe = pipe.with_controlnet(controlnet, step=_CHECKPOINT.value if controlnet == _WORKDIR.value else None)
      options = dict(control_image=read_control_image(_CONTROL_IMAGE.value, pipe), control_scale=_CONTROL_SCALE.value)
    if _INIT_IMAGE.value:
      samples = edit(pipe)
    elif _UPSCALE.value:
      samples = upscale(pipe)
    elif _INTERPOLATE.value:
      samples = pipe.interpolate(_INTERPOLATE.value, seed=_SEED.value, seed_end=_SEED_END.value, label=_LABEL.value,
                                 label_end=_LABEL_END.value, prompt=_PROMPT.value, prompt_end=_PROMPT_END.value,
                                 **sampling_options())
    else:
      samples = pipe.generate(_PROMPT.value, num=_NUM.value, seed=_SEED.value, label=_LABEL.value,
                              height=_HEIGHT.value, width=_WIDTH.value, batch_size=_BATCH.value,
                              progress=runtime.progress_bar("sampling"), **sampling_options(), **options)
  except (ValueError, TypeError, FileNotFoundError, ConfigError, CheckpointError) as e:
    runtime.fail(PROGRAM, e)
  try:
    write(samples, out)
  except OSError as e:
    runtime.fail(PROGRAM, f"cannot write --out={out!r}: {e}")
  origin = _MODEL.value if _MODEL.value else f"checkpoint {pipe.step} of {_WORKDIR.value}"
  print(f"wrote {len(samples.images)} images from {origin} to {out}")


def edit(pipe):
  """Samples editing --init_image as the editing flags say."""
  image = imaging.read_png(_INIT_IMAGE.value)
  channels = pipe.image_shape[-1]
  if image.shape[-1] != channels:
    raise ValueError(f"--init_image={_INIT_IMAGE.value!r} has {image.shape[-1]} channels but the model makes "
                     f"{'grayscale' if channels == 1 else f'{channels}-channel'} images: convert it to "
                     f"{'grayscale' if channels == 1 else 'RGB'}")
  num = _NUM.value if FLAGS["num"].present else 1
  images = np.broadcast_to(image, (num, *image.shape))
  options = dict(seed=_SEED.value, label=_LABEL.value, batch_size=_BATCH.value, **sampling_options())
  if _STRENGTH.value is not None:
    options["strength"] = _STRENGTH.value
  if _MASK.value:
    mask = imaging.read_png(_MASK.value, grayscale=True)[..., 0]
    return pipe.inpaint(images, mask, _PROMPT.value, **resample_options(), **options)
  if _OUTPAINT.value:
    return pipe.outpaint(images, _PROMPT.value, **outpaint_sides(), **resample_options(), **options)
  return pipe.img2img(images, _PROMPT.value, **options)


def upscale(pipe):
  """The samples of --upscale: --upscale_image made --upscale times larger by a super-resolution model."""
  scale, channels = pipe.config.conditioning.scale, pipe.config.model.output_channels
  if pipe.config.conditioning.kind != "super_resolution" or scale != _UPSCALE.value:
    raise ValueError(f"--upscale={_UPSCALE.value}: this model " + (
        f"upscales by {scale}; pass --upscale {scale}" if pipe.config.conditioning.kind == "super_resolution"
        else "is not a super-resolution model (train one with configs/sr_digits.py)"))
  low = imaging.read_png(_UPSCALE_IMAGE.value, grayscale=channels == 1)
  if low.shape[-1] != channels:
    raise ValueError(f"--upscale_image={_UPSCALE_IMAGE.value!r} has {low.shape[-1]} channels but the model makes "
                     f"{channels}-channel images: convert it to RGB")
  return pipe.upscale(low[None], seed=_SEED.value, sampler=_SAMPLER.value, steps=_STEPS.value, spacing=_SPACING.value,
                      guidance_scale=_GUIDANCE.value, eta=_ETA.value, clip_x0=_CLIP.value)


def read_control_image(path: str, pipe):
  """The control image file as uint8 [H, W, C] at the size of the ControlNet's input (bilinear, as diffusers
  resizes it), grey for a one-channel ControlNet, RGB otherwise."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  model = pipe.controlnet.model
  side = (_HEIGHT.value or pipe.image_shape[0], _WIDTH.value or pipe.image_shape[1])
  try:
    image = Image.open(path).convert("L" if model.conditioning_channels == 1 else "RGB")
  except OSError as e:
    raise ValueError(f"--control_image={path!r} cannot be read as an image: {e}") from None
  if image.size != (side[1], side[0]):
    image = image.resize((side[1], side[0]), Image.BILINEAR)
  return np.asarray(image).reshape(side[0], side[1], -1)


def run(argv: list[str] | None = None):
  """The console script's entry point (argv: the command line, default sys.argv); exits with main's status."""
  app.run(main, argv=argv, flags_parser=lambda args: runtime.parse_flags(args, FLAGS))


if __name__ == "__main__":
  run()
