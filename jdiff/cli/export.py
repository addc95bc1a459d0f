"""jdiff-export (and python -m jdiff.cli.export): a trained work dir as a diffusers pipeline directory.

  jdiff-export --workdir runs/latent_shapes --out exported/latent_shapes

The U-Net of the latest checkpoint (EMA params), and for a text model its text encoder and for a latent model its
VAE, with the scheduler config of the run's sampling defaults; diffusers' from_pretrained reads each component, and
jdiff.load reads the directory back bit for bit. An existing --out is replaced only with --overwrite.
"""
from __future__ import annotations

from absl import app, flags

from jdiff.cli import runtime

FLAGS = flags.FlagValues()
PROGRAM = "export.py"

_WORKDIR = flags.DEFINE_string("workdir", None, "Work dir that train.py wrote.", required=True, flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "The diffusers directory to write.", required=True, flag_values=FLAGS)
_CHECKPOINT = flags.DEFINE_integer("checkpoint", None, "Checkpoint step (default: the latest).", flag_values=FLAGS)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.", flag_values=FLAGS)


def main(argv):
  runtime.start_cli(argv)
  import os  # pylint: disable=import-outside-toplevel
  if os.path.exists(_OUT.value) and not _OVERWRITE.value:
    runtime.fail(PROGRAM, f"--out={_OUT.value!r} exists; choose another directory or pass --overwrite to replace it")
  import jdiff  # pylint: disable=import-outside-toplevel
  from jdiff.checkpoint import CheckpointError  # pylint: disable=import-outside-toplevel
  from jdiff.config import ConfigError  # pylint: disable=import-outside-toplevel
  try:
    pipe = jdiff.load(_WORKDIR.value, step=_CHECKPOINT.value)
    jdiff.export_diffusers(pipe, _OUT.value, overwrite=_OVERWRITE.value)
  except (ValueError, FileNotFoundError, ConfigError, CheckpointError, OSError) as e:
    runtime.fail(PROGRAM, e)
  print(f"wrote checkpoint {pipe.step} of {_WORKDIR.value} to {_OUT.value} in diffusers' format")


def run(argv: list[str] | None = None):
  """The console script's entry point (argv: the command line, default sys.argv); exits with main's status."""
  app.run(main, argv=argv, flags_parser=lambda args: runtime.parse_flags(args, FLAGS))


if __name__ == "__main__":
  run()
