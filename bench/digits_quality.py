"""Sample quality of a trained digits model: the share of class-conditional samples that a classifier trained
on real digits reads as their intended class, per sampler, step count and guidance scale, with sampling time.

  python bench/digits_quality.py --workdir runs/default --samplers ddim --steps 20 --guidance_scale 3
  python bench/digits_quality.py --workdir runs/default --samplers ddim,euler,heun,dpmpp_2m --steps 5,10,20,50
  python bench/digits_quality.py --workdir runs/latent_digits --guidance_scale 1,3 --clip_x0 on

Prints a Markdown table. Real test digits give the classifier's own ceiling (first row). --clip_x0 auto leaves
clipping of the denoised estimate to the config (on for pixel models, off for latent ones); on or off forces it.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jdiff  # noqa: E402
from jdiff.metrics import digits as evaluation  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--checkpoint", type=int, default=None, help="checkpoint step (default: the latest)")
  parser.add_argument("--samplers", default="ddim")
  parser.add_argument("--steps", default="20")
  parser.add_argument("--guidance_scale", default="3")
  parser.add_argument("--spacing", default=None, help="timestep spacing or karras (default: the config's)")
  parser.add_argument("--num", type=int, default=500, help="samples per row, cycling through the classes")
  parser.add_argument("--seed", type=int, default=1000, help="first seed (the training-time grids use 0..)")
  parser.add_argument("--clip_x0", choices=("auto", "on", "off"), default="auto",
                      help="clip the denoised estimate to [-1, 1] (auto: the config decides)")
  args = parser.parse_args()

  pipe = jdiff.load(args.workdir, step=args.checkpoint)
  size = pipe.image_shape[0]
  classifier = evaluation.make_digit_classifier(size)
  real, labels = evaluation.real_digits("test", size)
  clip_x0 = {"auto": None, "on": True, "off": False}[args.clip_x0]
  clipping = pipe.config.clip_x0 if clip_x0 is None else clip_x0
  print(f"checkpoint step {pipe.step}, {args.num} samples per row, image size {size}, clip_x0 {args.clip_x0} "
        f"({'on' if clipping else 'off'})\n")
  print("| sampler | steps | guidance | accuracy | seconds |")
  print("|---|---|---|---|---|")
  print(f"| real test digits | - | - | {evaluation.digit_accuracy(real, labels, classifier):.3f} | - |")
  for sampler in args.samplers.split(","):
    for steps in map(int, args.steps.split(",")):
      for guidance in map(float, args.guidance_scale.split(",")):
        acc, seconds = evaluation.sample_accuracy(pipe, classifier, num=args.num, seed=args.seed, sampler=sampler,
                                                  steps=steps, guidance_scale=guidance, spacing=args.spacing,
                                                  clip_x0=clip_x0)
        print(f"| {sampler} | {steps} | {guidance:g} | {acc:.3f} | {seconds:.2f} |", flush=True)


if __name__ == "__main__":
  main()
