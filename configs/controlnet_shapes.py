"""A ControlNet on the shapes text-to-image model: the shape's filled silhouette (or, with
--config.controlnet.condition=edges, its edge map) steers where the frozen base draws it.

  python train.py --config configs/controlnet_shapes.py --workdir runs/controlnet \
    --config.finetune.base=runs/shapes

The base (a work dir trained with configs/shapes.py) fixes the model, diffusion and text sections; the ones below
are the shapes config's, so the config parses on its own, and training replaces them with the base's. Only the
ControlNet trains: its encoder starts as a copy of the base U-Net's, its zero convolutions at zero.
"""
import ml_collections

from jdiff.configs import shapes


def get_config():
  config = shapes.get_config()
  config.finetune = dict(base=ml_collections.config_dict.placeholder(str))
  config.controlnet = dict(conditioning_channels=1, embedding_channels=(32,), condition="silhouette", scale=1.0)
  config.text.caption_dropout = 0.1
  config.training.update(num_steps=600, learning_rate=3e-4, warmup_steps=50, ema_decay=0.99, ema_warmup=True,
                         log_every=50, checkpoint_every=200, sample_every=300)
  config.sampling.num_samples = 36
  return config
