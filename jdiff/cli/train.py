"""jdiff-train (and train.py): trains a diffusion model, or for a config with a `vae` section a VAE.

  jdiff-train --config default --workdir runs/default
  python train.py --config configs/shapes.py --workdir runs/shapes --config.training.num_steps=4000

--config takes a config file or the name of a bundled one (jdiff.configs); any field can be overridden with
--config.a.b=v. Rerunning with the same --workdir resumes from its latest checkpoint. SIGTERM or Ctrl-C saves a
checkpoint and exits 0 (docs/reliability.md). Flags, the config and the work dir (a directory we can write that no
other process trains in) are checked before anything heavy loads.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from jdiff import configs, locks
from jdiff.cli import runtime

PROGRAM = "train.py"


def define_flags(argv: list[str]) -> flags.FlagValues:
  """The flags, on their own FlagValues: ml_collections finds the --config.a.b overrides in argv when the config
  flag is defined, so each command line gets its flags anew (one process can run the CLI twice; the tests do)."""
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", configs.resolve("default"), "Config file, or the name of a bundled "
                                  "config (default, shapes, ...).", lock_config=True, flag_values=fv, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and sample grids.",
                      required=True, flag_values=fv)
  flags.DEFINE_integer("cpu_devices", 0, "CPU backend only: split the cores into this many XLA devices and shard "
                       "the batch over them (0: one per core that divides the micro-batch; 1: one device).",
                       flag_values=fv)
  flags.DEFINE_bool("keep_host_memory", True, "CPU backend only: keep freed host memory for reuse, so XLA's "
                    "per-step buffers cost no page faults (jdiff/cli/host_memory.py).", flag_values=fv)
  return fv


# What a run writes inside its work dir, when they exist already (a run being resumed).
RUN_DIRS = ("checkpoints", "samples")


def check_workdir(workdir: str) -> None:
  """A work dir that is a file, or that cannot be created or written (its checkpoints and samples directories
  included, for a run being resumed), is refused before anything runs."""
  path = os.path.abspath(workdir)
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(f"--workdir={workdir!r}: {existing} is a file, not a directory; choose another --workdir")
  writable = [existing] + [d for d in (os.path.join(path, name) for name in RUN_DIRS) if os.path.isdir(d)]
  for directory in writable:
    if not os.access(directory, os.W_OK | os.X_OK):
      raise ValueError(f"--workdir={workdir!r}: {directory} is not writable; choose a directory you can write to")


WORKDIR_BUSY = "wait for it to finish, stop it, or choose another --workdir"


def main(argv, fv: flags.FlagValues):
  runtime.start_cli(argv)
  from jdiff.config import ConfigError, is_vae_config, parse_config, parse_vae_config
  raw = fv.config
  try:
    check_workdir(fv.workdir)
    config = parse_vae_config(raw) if is_vae_config(raw) else parse_config(raw)
    multi_process = config.parallel.multi_process()
    if not multi_process:  # A job's other processes find process 0's lock: the training loop asks for them.
      locks.check_free(locks.workdir_lock(fv.workdir), f"--workdir={fv.workdir}", WORKDIR_BUSY)
  except (ValueError, ConfigError, locks.LockedError) as e:
    runtime.fail(PROGRAM, e)
  tc = config.training
  # A multi-process job keeps one CPU device per process: its mesh spans the processes.
  runtime.tune_cpu_process(cpu_devices=1 if multi_process else fv.cpu_devices,
                           micro_batch=tc.batch_size // tc.grad_accum_steps, fsdp=config.parallel.fsdp,
                           keep_host_memory=fv.keep_host_memory)
  from jdiff.checkpoint import CheckpointError, CheckpointSaveError
  from jdiff.data import DatasetUnavailableError
  from jdiff.train import train_and_evaluate
  from jdiff.train.faults import NonFiniteError
  from jdiff.train.loop import FileSystemError
  try:
    result = train_and_evaluate(raw, fv.workdir)
  except (NonFiniteError, CheckpointSaveError, FileSystemError, OSError) as e:  # OSError: before training starts
    logging.flush()
    runtime.fail(PROGRAM, e, status=1)
  except (ConfigError, DatasetUnavailableError, CheckpointError, locks.LockedError) as e:
    logging.flush()
    runtime.fail(PROGRAM, e)
  report(result, is_vae_config(raw))


def report(result, is_vae: bool) -> None:
  """Where the results are and what to run next."""
  workdir = result.workdir
  lines = [f"step {int(result.state.step)}: checkpoints in {os.path.join(workdir, 'checkpoints')}, "
           f"images in {os.path.join(workdir, 'samples')}, logs: tensorboard --logdir {workdir}"]
  if is_vae:
    lines.append(f"next: train a latent model on it with --config.latent.vae_workdir={os.path.abspath(workdir)}")
  elif "controlnet" in result.config:
    lines.append(f"next: python sample.py --workdir {workdir} --control_image edges.png --out samples.png")
  else:
    lines.append(f"next: python sample.py --workdir {workdir} --out samples.png")
  print("\n".join(lines))


def run(argv: list[str] | None = None):
  """The console script's entry point (argv: the command line, default sys.argv); exits with main's status."""
  argv = sys.argv if argv is None else argv
  fv = define_flags(argv)
  app.run(lambda args: main(args, fv), argv=argv, flags_parser=lambda args: runtime.parse_flags(args, fv))


if __name__ == "__main__":
  run()
