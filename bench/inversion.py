"""DDIM inversion on a trained digits model: real held-out digits are inverted to noise and decoded back.

  python bench/inversion.py --workdir runs/default --steps 10,50,200 --refine 0,2
  python bench/inversion.py --workdir runs/latent_digits --steps 20 --refine 0 --clip_x0 auto,on

Prints a Markdown table of the mean absolute reconstruction error in pixels (0..255). A latent model inverts the
posterior mean of each image's latents and decodes through the VAE, so its error holds the VAE's; a first row
gives the VAE's round trip alone (encode to the posterior mean, decode). --clip_x0 lists the settings to measure:
auto (the config's: on for pixel models, off for latent ones), on or off (clip each denoised estimate to [-1, 1]).
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jdiff  # noqa: E402
from jdiff.images import model_range_to_uint8, uint8_to_model_range  # noqa: E402
from jdiff.metrics import digits as evaluation  # noqa: E402

CLIP_X0 = {"auto": None, "on": True, "off": False}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--checkpoint", type=int, default=None, help="checkpoint step (default: the latest)")
  parser.add_argument("--steps", default="10,50,200")
  parser.add_argument("--refine", default="0,2")
  parser.add_argument("--clip_x0", default="auto", help="comma-separated settings among auto, on, off")
  parser.add_argument("--num", type=int, default=100, help="held-out digits to invert")
  args = parser.parse_args()
  settings = args.clip_x0.split(",")
  for setting in settings:
    if setting not in CLIP_X0:
      parser.error(f"--clip_x0 takes auto, on or off, not {setting!r}")

  pipe = jdiff.load(args.workdir, step=args.checkpoint)
  images, labels = evaluation.real_digits("test", pipe.image_shape[0])
  images, labels = images[:args.num], labels[:args.num]
  print(f"checkpoint step {pipe.step}, {len(images)} held-out test digits at {pipe.image_shape[0]}x"
        f"{pipe.image_shape[1]}\n")
  print("| steps | refine | clip_x0 | mean abs error (0..255) | max abs error |")
  print("|---|---|---|---|---|")
  if pipe.codec:
    back = model_range_to_uint8(pipe.codec.decode(pipe.codec.encode(uint8_to_model_range(images))))
    error = np.abs(back.astype(np.float64) - images)
    print(f"| VAE round trip alone | - | - | {error.mean():.2f} | {error.max():.0f} |", flush=True)
  for steps in map(int, args.steps.split(",")):
    for refine in map(int, args.refine.split(",")):
      for setting in settings:
        clip_x0 = CLIP_X0[setting]
        noise = pipe.invert(images, label=labels, steps=steps, refine=refine, clip_x0=clip_x0)
        back = pipe.generate(latents=noise, label=labels, steps=steps, sampler="ddim", eta=0.0, guidance_scale=1.0,
                             clip_x0=clip_x0).images
        error = np.abs(back.astype(np.float64) - images)
        shown = f"auto ({'on' if pipe.config.clip_x0 else 'off'})" if clip_x0 is None else setting
        print(f"| {steps} | {refine} | {shown} | {error.mean():.2f} | {error.max():.0f} |", flush=True)


if __name__ == "__main__":
  main()
