"""What checksums cost a checkpoint: save and restore of a config's training state with them and without.

  python bench/checkpoint_checksums.py                    # configs/cifar10.py's state (35.7M parameters)
  python bench/checkpoint_checksums.py --config default --repeats 5

The state is built from the config's shapes (jax.eval_shape), no training: normal random values like trained
weights (zstd cannot shrink them), or zeros with --zeros. After one round untimed, each repeat times in turn: orbax
saving the state and config as jdiff did before checksums, then jdiff's Saver (the same plus the checksums item);
restore_checked of the first (shapes and dtypes checked, nothing to verify: what jdiff did before), then of the
second (the same, then the restored values against the checksums). A save is timed to the end of its background
write; which of a pair goes first alternates. Medians of the repeats, and the checksums alone.
"""
import argparse
import functools
import itertools
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from jdiff import checkpoint, checksums, configs  # noqa: E402
from jdiff.config import parse_config  # noqa: E402
from jdiff.train.step import create_train_state  # noqa: E402


def make_state(config, zeros: bool):
  abstract = jax.eval_shape(functools.partial(create_train_state, config), jax.random.key(0))
  leaves, tree = jax.tree_util.tree_flatten(abstract)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  values = [jnp.zeros(x.shape, x.dtype) if zeros or not jnp.issubdtype(x.dtype, jnp.floating)
            else jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return jax.block_until_ready(jax.tree_util.tree_unflatten(tree, values))


def seconds(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="cifar10")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--zeros", action="store_true", help="zeros instead of random values")
  args = parser.parse_args()
  raw = configs.get(args.config).to_dict()
  state = make_state(parse_config(raw), args.zeros)
  sharded = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  size = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
  times = {name: [] for name in ("save", "save+checksums", "restore", "restore+checksums", "checksums")}
  with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as workdir:
    manager = checkpoint.make_manager(workdir, keep=4)
    saver = checkpoint.Saver(manager)
    steps = itertools.count(1)
    for repeat in range(args.repeats + 1):
      saved = {}

      def save_plain():
        saved["plain"] = next(steps)
        manager.save(saved["plain"], args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                             config=ocp.args.JsonSave(raw)))
        manager.wait_until_finished()

      def save_checked():
        saved["checked"] = next(steps)
        saver.save(saved["checked"], state, raw)
        saver.wait()

      runs = {"save": save_plain, "save+checksums": save_checked,
              "restore": lambda: jax.block_until_ready(checkpoint.restore_checked(manager, saved["plain"], sharded)),
              "restore+checksums": lambda: jax.block_until_ready(
                  checkpoint.restore_checked(manager, saved["checked"], sharded)),
              "checksums": lambda: checksums.of_leaves(state)}
      order = list(runs) if repeat % 2 else ["save+checksums", "save", "restore+checksums", "restore", "checksums"]
      measured = {name: seconds(runs[name]) for name in order}  # alternating which of a pair goes first
      for name, value in measured.items():
        if repeat:  # the first round warms up
          times[name].append(value)
  median = {name: statistics.median(values) for name, values in times.items()}
  values = "zeros" if args.zeros else "random values"
  print(f"{args.config}: {len(jax.tree_util.tree_leaves(state))} arrays, {size / 2**20:.0f} MiB ({values}), "
        f"{jax.devices()[0].platform}, {args.repeats} repeats, median seconds")
  print("| | without checksums | with checksums | ratio |")
  print("|---|---|---|---|")
  for name in ("save", "restore"):
    print(f"| {name} | {median[name]:.2f} | {median[name + '+checksums']:.2f} | "
          f"{median[name + '+checksums'] / median[name]:.2f} |")
  print(f"| the checksums alone | | {median['checksums']:.2f} ({size / 2**20 / median['checksums']:.0f} MiB/s) | |")


if __name__ == "__main__":
  main()
