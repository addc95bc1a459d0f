"""Super-resolution quality: PSNR and SSIM (jdiff/metrics/similarity.py) of a super-resolution model's outputs
against the real high-resolution held-out images, beside nearest and bicubic upsampling of the same inputs.

  python bench/super_resolution.py --workdir runs/sr_digits --steps 20
  python bench/super_resolution.py --workdir runs/sr_digits --steps 5,20,50 --samples 4

Each held-out ('test' split) image at the model's output size is reduced as training reduces it (block means,
rounded to 8 bits) and upsampled back by each method. With --samples k > 1 the model is also scored on the pixel
mean of k samples per input (seeds apart), the estimate of E[x | low resolution] that PSNR rewards. Prints a
Markdown table; seconds are the model's per image, after a first batch that compiles.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import jdiff  # noqa: E402
from jdiff import conditioning, images  # noqa: E402
from jdiff.metrics import quality, similarity  # noqa: E402


def row(name: str, made: np.ndarray, real: np.ndarray, seconds: str = "-") -> str:
  p, s = similarity.psnr(made, real), similarity.ssim(made, real)
  se = lambda v: np.std(v) / np.sqrt(len(v))
  return f"| {name} | {np.mean(p):.2f} ± {se(p):.2f} | {np.mean(s):.4f} ± {se(s):.4f} | {seconds} |"


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--checkpoint", type=int, default=None, help="checkpoint step (default: the latest)")
  parser.add_argument("--sampler", default="ddim")
  parser.add_argument("--steps", default="20")
  parser.add_argument("--samples", type=int, default=1, help="also score the mean of this many samples per input")
  parser.add_argument("--num", type=int, default=0, help="held-out images (0: the whole split)")
  parser.add_argument("--seed", type=int, default=1000)
  args = parser.parse_args()

  pipe = jdiff.load(args.workdir, step=args.checkpoint)
  cc = pipe.config.conditioning
  real = quality.real_split(pipe, "test").images
  real = real[:args.num] if args.num else real
  low = images.model_range_to_uint8(conditioning.low_resolution(images.uint8_to_model_range(real), cc.scale))
  size = real.shape[1:3]
  up = lambda method: images.model_range_to_uint8(
      conditioning.upsample(images.uint8_to_model_range(low), *size, method))
  print(f"checkpoint step {pipe.step}; {len(real)} held-out {pipe.config.data.name} images, "
        f"{low.shape[1]} -> {size[0]} px; PSNR (dB) and SSIM, mean ± standard error over the images\n")
  print("| method | PSNR | SSIM | seconds per image |")
  print("|---|---|---|---|")
  print(row("nearest", up("nearest"), real))
  print(row("bicubic", up("bicubic"), real))
  for steps in map(int, args.steps.split(",")):
    pipe.upscale(low[:min(256, len(low))], seed=args.seed, sampler=args.sampler, steps=steps)  # compiles
    start = time.perf_counter()
    runs = [pipe.upscale(low, seed=args.seed + k * len(low), sampler=args.sampler, steps=steps).images
            for k in range(args.samples)]
    seconds = (time.perf_counter() - start) / (len(low) * args.samples)
    print(row(f"{args.sampler}, {steps} steps", runs[0], real, f"{seconds:.4f}"), flush=True)
    if args.samples > 1:
      mean = images.model_range_to_uint8(np.mean([images.uint8_to_model_range(r) for r in runs], axis=0))
      print(row(f"{args.sampler}, {steps} steps, mean of {args.samples}", mean, real), flush=True)


if __name__ == "__main__":
  main()
