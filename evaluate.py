"""Evaluates a trained work dir: python evaluate.py --workdir runs/default --metric fd,kd,bpd

The same as the console script jdiff-evaluate; see jdiff/cli/evaluate.py for the flags.
"""
from jdiff.cli.evaluate import run

if __name__ == "__main__":
  run()
