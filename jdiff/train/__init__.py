"""Training: `train_and_evaluate(config, workdir)` trains the U-Net or, for a config with a `vae` section, the VAE,
through the one loop of jdiff/train/loop.py. Inference never imports this package."""
from __future__ import annotations

from jdiff import data  # noqa: F401  (before clu loads TensorFlow: jdiff/data/tf_import.py)
from jdiff.config import is_vae_config, parse_config, parse_vae_config
from jdiff.train import loop, unet, vae
from jdiff.train.loop import TrainResult

__all__ = ["TrainResult", "train_and_evaluate"]


def train_and_evaluate(raw_config, workdir: str) -> TrainResult:
  """Trains (or resumes) the run that `raw_config` (a ConfigDict or nested dict) describes, in `workdir`."""
  raw = raw_config.to_dict() if hasattr(raw_config, "to_dict") else dict(raw_config)
  if is_vae_config(raw):
    return loop.run(vae.VAETrainer, parse_vae_config(raw), raw, workdir)
  if "distill" in raw:
    from jdiff.train import distill
    return distill.train(raw, workdir)
  return loop.run(unet.UNetTrainer, parse_config(raw), raw, workdir)
