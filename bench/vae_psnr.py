"""Reconstruction PSNR of a trained VAE on held-out images (what train_vae writes to reconstruction_psnr.json).

  python bench/vae_psnr.py --workdir runs/vae_digits
  python bench/vae_psnr.py --workdir runs/vae_digits --split train --num 360

Images are encoded to the posterior mean, decoded, and rounded to uint8; PSNR (peak 255) is per image, then averaged.
"""
import argparse
import dataclasses
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jdiff import data, latent  # noqa: E402
from jdiff.train.vae import psnr  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--checkpoint", type=int, default=None, help="checkpoint step (default: the latest)")
  parser.add_argument("--split", default=None, help="split of the training dataset (default: the config's)")
  parser.add_argument("--num", type=int, default=0, help="images (0: the whole split)")
  args = parser.parse_args()

  trained = latent.load_vae(args.workdir, args.checkpoint)
  split = args.split or trained.config.evaluation.split
  images, _ = data.load_split(dataclasses.replace(trained.config.data, split=split))
  images = images[:args.num or None]
  latent.reconstruct(trained.config.vae, trained.params, images[:1])  # compile outside the timing
  start = time.perf_counter()
  per_image = psnr(images, latent.reconstruct(trained.config.vae, trained.params, images))
  seconds = time.perf_counter() - start
  cfg = trained.config.vae
  print(f"| VAE (step {trained.step}) | split | images | latents | PSNR mean (dB) | median | min | seconds |")
  print("|---|---|---|---|---|---|---|---|")
  print(f"| {os.path.basename(os.path.abspath(args.workdir))} | {split} | {len(images)} | "
        f"{cfg.latent_size}x{cfg.latent_size}x{cfg.latent_channels} | {per_image.mean():.2f} | "
        f"{np.median(per_image):.2f} | {per_image.min():.2f} | {seconds:.2f} |")


if __name__ == "__main__":
  main()
