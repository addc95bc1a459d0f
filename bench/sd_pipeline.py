"""Stable Diffusion 1.5's size in jdiff and in diffusers on the same random weights, written in diffusers' format
(no download): jdiff's load time and peak host memory, and text-to-image time, first call and steady state.

  pip install -e '.[bench]'
  python bench/sd_pipeline.py --dir /tmp/sd15_random                      # 256x256, 10 steps, batch 1 and 4
  python bench/sd_pipeline.py --dir /tmp/sd15_random --size 512 --steps 25  # the full-size run (GPU)

The first run writes DIR: UNet2DConditionModel, AutoencoderKL and CLIPTextModel with SD 1.5's configs (859.5M,
83.7M and 123.1M parameters) and random weights, fp32 safetensors plus the fp16 variant, a tokenizer, and SD 1.5's
scheduler config. Loading is measured in fresh processes (ru_maxrss before and after jdiff.load, and diffusers'
StableDiffusionPipeline.from_pretrained for comparison). Sampling: both
pipelines get the same prompts and initial latents, DPM-Solver++(2M) read from the directory's scheduler config
(as `DPMSolverMultistepScheduler.from_config` reads it) and guidance 7.5; the frameworks alternate (A, B, A, B)
so that load from other processes hits both.
jdiff runs as `sample.py --model` does: one XLA device, freed host memory kept for reuse.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

sys.modules["torchvision"] = None  # transformers imports it when present; this machine's build does not match torch
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

PROMPT = "a photo of a cat"
WORDS = "a photo of cat".split()

MEASURE_LOAD = """
import resource, sys, time
sys.path.insert(0, {root!r})
from jdiff.cli import runtime
runtime.tune_cpu_process(cpu_devices=1, micro_batch=1)
import jax, jdiff
jax.numpy.zeros(1).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
pipe = jdiff.load({path!r}, dtype={dtype!r}, variant={variant!r})
jax.block_until_ready(jax.tree.leaves((pipe.params, pipe.codec.params)))
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
size = sum(x.nbytes for x in jax.tree.leaves((pipe.params, pipe.codec.params)))
print(seconds, before * 1024, peak * 1024, size)
"""


MEASURE_DIFFUSERS_LOAD = """
import resource, sys, time
sys.modules["torchvision"] = None
import torch
from diffusers import StableDiffusionPipeline
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
pipe = StableDiffusionPipeline.from_pretrained({path!r}, torch_dtype={dtype}, variant={variant!r})
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
size = sum(p.numel() * p.element_size() for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
print(seconds, before * 1024, peak * 1024, size)
"""


def write_model(directory: str) -> None:
  import torch  # pylint: disable=import-outside-toplevel
  from diffusers import AutoencoderKL, UNet2DConditionModel  # pylint: disable=import-outside-toplevel
  from transformers import CLIPTextConfig, CLIPTextModel  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures"))
  from make_diffusers_fixtures import (write_clip_tokenizer,  # pylint: disable=import-outside-toplevel
                                       write_shipped_scheduler)
  torch.manual_seed(0)
  os.makedirs(directory)
  write_clip_tokenizer(os.path.join(directory, "tokenizer"), WORDS, "<|endoftext|>")
  write_shipped_scheduler(os.path.join(directory, "scheduler"), "epsilon")
  text = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                        num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
  for name, build in (("text_encoder", lambda: CLIPTextModel(text)),
                      ("vae", lambda: AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                                    down_block_types=("DownEncoderBlock2D",) * 4,
                                                    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)),
                      ("unet", lambda: UNet2DConditionModel(sample_size=64, cross_attention_dim=768))):
    model = build().eval()
    count = sum(p.numel() for p in model.parameters())
    # fp32 last: transformers records the dtype it saved in config.json and loads the plain files as that dtype.
    model.to(torch.float16).save_pretrained(os.path.join(directory, name), variant="fp16")
    model.to(torch.float32).save_pretrained(os.path.join(directory, name))
    print(f"wrote {name}: {count:,} parameters", flush=True)
    del model
  index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
           "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
           "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
           "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [None, None],
           "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False}
  with open(os.path.join(directory, "model_index.json"), "w") as f:
    json.dump(index, f, indent=2)


def measure_load(directory: str, dtype: str, variant: str | None, framework: str) -> dict:
  if framework == "jdiff":
    code = MEASURE_LOAD.format(root=ROOT, path=directory, dtype=dtype, variant=variant)
  else:
    code = MEASURE_DIFFUSERS_LOAD.format(path=directory, dtype=f"torch.{dtype}", variant=variant)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
  seconds, before, peak, size = map(float, out.split()[-4:])
  return dict(seconds=seconds, before=before, peak=peak, size=size)


class Jdiff:
  def __init__(self, directory: str):
    import jdiff  # pylint: disable=import-outside-toplevel
    self.pipe = jdiff.load(directory)  # its CLIP tokenizer, its scheduler config read as DPM-Solver++

  def __call__(self, latents: np.ndarray, steps: int, size: int) -> np.ndarray:
    samples = self.pipe.generate(PROMPT, num=len(latents), latents=latents.transpose(0, 2, 3, 1), sampler="dpmpp_2m",
                                 steps=steps, guidance_scale=7.5, height=size, width=size)
    return samples.images


class Diffusers:
  def __init__(self, directory: str):
    import torch  # pylint: disable=import-outside-toplevel
    from diffusers import (DPMSolverMultistepScheduler,  # pylint: disable=import-outside-toplevel
                           StableDiffusionPipeline)
    self.torch = torch
    self.pipe = StableDiffusionPipeline.from_pretrained(directory)
    self.pipe.scheduler = DPMSolverMultistepScheduler.from_config(self.pipe.scheduler.config)
    self.pipe.set_progress_bar_config(disable=True)

  def __call__(self, latents: np.ndarray, steps: int, size: int) -> np.ndarray:
    with self.torch.no_grad():
      images = self.pipe([PROMPT] * len(latents), latents=self.torch.tensor(latents), num_inference_steps=steps,
                         guidance_scale=7.5, height=size, width=size, output_type="np").images
    return np.round(images * 255).astype(np.uint8)


def timed(fn, *args) -> tuple[float, np.ndarray]:
  start = time.perf_counter()
  out = fn(*args)
  return time.perf_counter() - start, out


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dir", required=True, help="the random SD-1.5-size pipeline (written when missing)")
  parser.add_argument("--size", type=int, default=256, help="image height and width")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--batch", default="1,4", help="images per call, comma-separated")
  parser.add_argument("--repeats", type=int, default=1, help="steady-state calls of each, after the first")
  parser.add_argument("--skip_load", action="store_true", help="skip the load-time and memory measurement")
  parser.add_argument("--skip_speed", action="store_true", help="skip the sampling measurement")
  return parser.parse_args()


def main():
  args = parse_args()
  if not os.path.isdir(args.dir):
    write_model(args.dir)
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"load: {os.getloadavg()[0]:.2f}", flush=True)
  if not args.skip_load:
    gib = 2 ** 30
    print("\n| load | dtype | seconds | params (GiB) | peak host RSS (GiB) | RSS before loading (GiB) |")
    print("|---|---|---|---|---|---|")
    for framework, dtype, variant in (("jdiff", "float32", None), ("diffusers", "float32", None),
                                      ("jdiff", "bfloat16", None), ("jdiff", "float16", "fp16"),
                                      ("diffusers", "float16", "fp16")):
      m = measure_load(args.dir, dtype, variant, framework)
      print(f"| {framework} | {dtype}{' (fp16 files)' if variant else ''} | {m['seconds']:.1f} | {m['size'] / gib:.2f} "
            f"| {m['peak'] / gib:.2f} | {m['before'] / gib:.2f} |", flush=True)
  if args.skip_speed:
    return
  from jdiff.cli import runtime  # pylint: disable=import-outside-toplevel
  runtime.tune_cpu_process(cpu_devices=1, micro_batch=1)
  frameworks = {"jdiff": Jdiff(args.dir), "diffusers": Diffusers(args.dir)}
  print(f"\n{args.size}x{args.size}, {args.steps} steps of DPM-Solver++(2M), guidance 7.5, fp32; seconds per image")
  print("| batch | framework | first call | steady state | max |jdiff - diffusers| (uint8) |")
  print("|---|---|---|---|---|")
  for batch in map(int, args.batch.split(",")):
    latents = np.random.default_rng(batch).normal(size=(batch, 4, args.size // 8, args.size // 8)).astype(np.float32)
    first, steady, images = {}, {name: [] for name in frameworks}, {}
    for name, run in frameworks.items():
      first[name], images[name] = timed(run, latents, args.steps, args.size)
    for _ in range(args.repeats):
      for name, run in frameworks.items():
        steady[name].append(timed(run, latents, args.steps, args.size)[0])
    diff = int(np.abs(images["jdiff"].astype(int) - images["diffusers"]).max())
    for name in frameworks:
      best = min(steady[name]) / batch if steady[name] else float("nan")
      print(f"| {batch} | {name} | {first[name] / batch:.2f} | {best:.2f} | {diff} |", flush=True)
  print(f"load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
