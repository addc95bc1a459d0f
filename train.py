"""Trains a diffusion model: python train.py --config configs/default.py --workdir runs/default

A config with a `vae` section (configs/vae_*.py) trains an autoencoder for latent diffusion instead.

Any config field can be overridden, e.g. --config.training.batch_size=32. Rerunning with the same
--workdir resumes from its latest checkpoint. SIGTERM or Ctrl-C saves a checkpoint and exits 0
(docs/reliability.md).
"""
if __name__ == "__main__":  # first, before any thread allocates: jdiff/host_memory.py
  from jdiff.host_memory import keep_freed_memory
  keep_freed_memory()

import os

from absl import app, flags, logging
from ml_collections import config_flags

from jdiff import runtime
from jdiff.config import ConfigError, is_vae_config
from jdiff.data import DatasetUnavailableError
from jdiff.train.checkpoint import CheckpointError
from jdiff.train.faults import NonFiniteError
from jdiff.train.loop import train_and_evaluate
from jdiff.train.vae import train_vae

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Config file (a Python file with get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and sample grids.",
                               required=True)


def main(argv):
  runtime.start_cli(argv)
  try:
    train = train_vae if is_vae_config(_CONFIG.value) else train_and_evaluate
    train(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, DatasetUnavailableError, CheckpointError) as e:
    logging.flush()
    runtime.fail("train.py", e)
  except NonFiniteError as e:
    logging.flush()
    runtime.fail("train.py", e, status=1)


if __name__ == "__main__":
  app.run(main, flags_parser=runtime.parse_flags)
