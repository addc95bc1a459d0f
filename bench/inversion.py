"""DDIM inversion on a trained digits model: real held-out digits are inverted to noise and decoded back.

  python bench/inversion.py --workdir runs/default --steps 10,50,200 --refine 0,2

Prints a Markdown table of the mean absolute reconstruction error in pixels (0..255).
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jdiff  # noqa: E402
from jdiff.metrics import digits as evaluation  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--steps", default="10,50,200")
  parser.add_argument("--refine", default="0,2")
  parser.add_argument("--num", type=int, default=100, help="held-out digits to invert")
  args = parser.parse_args()

  pipe = jdiff.load(args.workdir)
  images, labels = evaluation.real_digits("test", pipe.config.model.image_size)
  images, labels = images[:args.num], labels[:args.num]
  print("| steps | refine | mean abs error (0..255) | max abs error |")
  print("|---|---|---|---|")
  for steps in map(int, args.steps.split(",")):
    for refine in map(int, args.refine.split(",")):
      noise = pipe.invert(images, label=labels, steps=steps, refine=refine)
      back = pipe.generate(latents=noise, label=labels, steps=steps, sampler="ddim", eta=0.0,
                           guidance_scale=1.0).images
      error = np.abs(back.astype(np.float64) - images)
      print(f"| {steps} | {refine} | {error.mean():.2f} | {error.max():.0f} |", flush=True)


if __name__ == "__main__":
  main()
