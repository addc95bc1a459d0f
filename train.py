"""Trains a diffusion model (or a VAE): python train.py --config configs/default.py --workdir runs/default

The same as the console script jdiff-train; see jdiff/cli/train.py for the flags.
"""
from jdiff.cli.train import run

if __name__ == "__main__":
  run()
