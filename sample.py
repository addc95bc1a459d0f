"""Samples from a trained work dir: python sample.py --workdir runs/default --out grid.png

The same as the console script jdiff-sample; see jdiff/cli/sample.py for the flags.
"""
from jdiff.cli.sample import run

if __name__ == "__main__":
  run()
