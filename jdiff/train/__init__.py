"""Training: `train_and_evaluate(config, workdir)` trains the U-Net, for a config with a `vae` section the VAE, for
one with a `controlnet` section a ControlNet on a frozen base model, for one with `finetune.base` a fine-tuning of
that base (every weight, or LoRA adapters), and for one with `distill.teacher` a few-step student of that teacher,
through the one loop of jdiff/train/loop.py. Inference never imports this package."""
from __future__ import annotations

from jdiff import data  # noqa: F401  (before clu loads TensorFlow: jdiff/data/tf_import.py)
from jdiff.config import is_controlnet_config, is_vae_config, parse_config, parse_vae_config
from jdiff.train import controlnet, distill, finetune, loop, unet, vae
from jdiff.train.loop import TrainResult

__all__ = ["TrainResult", "train_and_evaluate"]


def train_and_evaluate(raw_config, workdir: str) -> TrainResult:
  """Trains (or resumes) the run that `raw_config` (a ConfigDict or nested dict) describes, in `workdir`."""
  raw = raw_config.to_dict() if hasattr(raw_config, "to_dict") else dict(raw_config)
  if is_vae_config(raw):
    return loop.run(vae.VAETrainer, parse_vae_config(raw), raw, workdir)
  if "distill" in raw:
    return distill.train(raw, workdir)
  config = parse_config(raw)
  if is_controlnet_config(raw):
    return loop.run(controlnet.ControlNetTrainer, config, raw, workdir)
  return loop.run(finetune.FinetuneTrainer if config.finetune.base else unet.UNetTrainer, config, raw, workdir)
