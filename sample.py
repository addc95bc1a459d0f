"""Samples from a trained work dir to a PNG grid or an .npz of raw images.

  python sample.py --workdir runs/default --sampler ddim --steps 20 --num 100 --guidance 3 --out grid.png
  python sample.py --workdir runs/default --label 7 --num 64 --out sevens.npz
  python sample.py --workdir runs/default --interpolate 10 --seed 0 --label 3 --label_end 8 --out strip.png
  python sample.py --workdir runs/shapes --prompt "a red square" --negative_prompt "a small square" --guidance 5
"""
if __name__ == "__main__":  # first, before any thread allocates: jdiff/host_memory.py
  from jdiff.host_memory import keep_freed_memory
  keep_freed_memory()

import os

import numpy as np
from absl import app, flags, logging

import jdiff
from jdiff import generate, runtime
from jdiff.config import ConfigError, ParallelConfig
from jdiff.train import distributed
from jdiff.train.checkpoint import CheckpointError

_WORKDIR = flags.DEFINE_string("workdir", None, "Work dir that train.py wrote.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output file: .png for a grid, .npz for raw arrays "
                           "(default: WORKDIR/samples/sample.png).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")
_CHECKPOINT = flags.DEFINE_integer("checkpoint", None, "Checkpoint step to load (default: the latest).")
_SAMPLER = flags.DEFINE_string("sampler", None, "Sampler name (default: the config's).")
_STEPS = flags.DEFINE_integer("steps", None, "Number of sampling steps (default: the config's).")
_NUM = flags.DEFINE_integer("num", 64, "Number of images.")
_SEED = flags.DEFINE_integer("seed", 0, "Image i uses seed SEED + i.")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Classifier-free guidance scale; 1 = none (default: the config's).")
_LABEL = flags.DEFINE_integer("label", None, "Class of every image (default: cycle through the classes).")
_ETA = flags.DEFINE_float("eta", None, "DDIM eta / ancestral noise (default: the config's).")
_SPACING = flags.DEFINE_string("spacing", None, "Timestep spacing: leading, trailing, linspace, or karras sigmas "
                               "(default: the config's).")
_RESCALE = flags.DEFINE_float("guidance_rescale", 0.0, "Guidance rescale phi in [0, 1] (Lin et al., 2023).")
_NEGATIVE = flags.DEFINE_integer("negative_label", None, "A class to steer away from, in place of the null class.")
_INTERPOLATE = flags.DEFINE_integer("interpolate", None, "Write a strip of this many frames interpolating from seed "
                                    "SEED's noise to --seed_end's (and from --label to --label_end) instead.")
_SEED_END = flags.DEFINE_integer("seed_end", None, "Last frame's seed for --interpolate (default: SEED + 1).")
_LABEL_END = flags.DEFINE_integer("label_end", None, "Last frames' class for --interpolate (default: --label).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Images generated per compiled call.")
_PROMPT = flags.DEFINE_string("prompt", None, "Text models: the prompt of every image (default: cycle through "
                              "the config's text.sample_prompts); \"\" samples unconditionally.")
_NEGATIVE_PROMPT = flags.DEFINE_string("negative_prompt", None, "Text models: a prompt to steer away from, in place "
                                       "of the empty prompt.")
flags.DEFINE_alias("negative-prompt", "negative_prompt")
_CLIP = flags.DEFINE_bool("clip_x0", None, "Clip each denoised estimate to [-1, 1] (--noclip_x0: don't); default: "
                          "the config's, which clips pixel models and not latent ones.")
_PROMPT_END = flags.DEFINE_string("prompt_end", None, "Last frames' prompt for --interpolate (default: --prompt).")


def output_path() -> str:
  out = _OUT.value or os.path.join(_WORKDIR.value, "samples", "sample.png")
  if not out.endswith((".png", ".npz")):
    raise ValueError(f"--out={out!r} must end in .png (a grid) or .npz (raw arrays)")
  if os.path.exists(out) and not _OVERWRITE.value:
    raise ValueError(f"--out={out!r} exists; choose another path or pass --overwrite to replace it")
  return out


def write(samples: jdiff.Samples, out: str, columns: int | None) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  if out.endswith(".npz"):
    labels = samples.labels if samples.labels is not None else np.full(len(samples.images), -1, np.int32)
    prompts = {} if samples.prompts is None else {"prompts": np.array(samples.prompts)}
    np.savez(out, images=samples.images, labels=labels, seeds=samples.seeds, **prompts)
  else:
    generate.save_png(generate.make_grid(samples.images, columns=columns), out)


def main(argv):
  runtime.start_cli(argv)
  try:
    if _NUM.value < 1 or (_INTERPOLATE.value is not None and _INTERPOLATE.value < 2):
      raise ValueError(f"--num={_NUM.value} must be at least 1 and --interpolate={_INTERPOLATE.value} at least 2")
    if _BATCH.value < 1:
      raise ValueError(f"--batch_size={_BATCH.value} must be at least 1")
    out = output_path()
    # On the CPU, one XLA device per core that divides a call's batch, as train.py does: sampling splits the
    # batch over them (config.parallel.cpu_devices).
    distributed.split_host_cpu(ParallelConfig(), _INTERPOLATE.value or min(_NUM.value, _BATCH.value))
    pipe = jdiff.load(_WORKDIR.value, step=_CHECKPOINT.value)
    options = dict(sampler=_SAMPLER.value, steps=_STEPS.value, spacing=_SPACING.value, guidance=_GUIDANCE.value,
                   guidance_rescale=_RESCALE.value, negative_label=_NEGATIVE.value, eta=_ETA.value,
                   negative_prompt=_NEGATIVE_PROMPT.value, clip_x0=_CLIP.value)
    if _INTERPOLATE.value:
      samples = pipe.interpolate(_INTERPOLATE.value, seed=_SEED.value, seed_end=_SEED_END.value, label=_LABEL.value,
                                 label_end=_LABEL_END.value, prompt=_PROMPT.value, prompt_end=_PROMPT_END.value,
                                 **options)
    else:
      report = lambda done, total: logging.info("generated %d/%d images", done, total)
      samples = pipe.generate(_NUM.value, seed=_SEED.value, label=_LABEL.value, prompt=_PROMPT.value,
                              batch_size=_BATCH.value, progress=report, **options)
  except (ValueError, FileNotFoundError, ConfigError, CheckpointError) as e:
    runtime.fail("sample.py", e)
  num_classes = pipe.config.model.num_classes
  if pipe.config.model.context_dim and _PROMPT.value is None:  # a column per prompt of the config's sample_prompts
    num_classes = len(pipe.config.text.sample_prompts)
  columns = num_classes if num_classes and _LABEL.value is None and _NUM.value % num_classes == 0 else None
  if _INTERPOLATE.value:
    columns = _INTERPOLATE.value  # one row
  try:
    write(samples, out, columns)
  except OSError as e:
    runtime.fail("sample.py", f"cannot write --out={out!r}: {e}")
  print(f"wrote {len(samples.images)} images from checkpoint {pipe.step} to {out}")


if __name__ == "__main__":
  app.run(main, flags_parser=runtime.parse_flags)
