"""A small VAE for the offline digits at 32x32 (upsampled from 8x8): 4x downsampling to 8x8x4 latents.

Trains in a few minutes on a 2-core CPU; reconstruction PSNR on the 360 held-out test digits is written to
WORKDIR/reconstruction_psnr.json (docs/latent_diffusion.md has the measured value). Its latents feed
configs/latent_digits.py.
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = dict(name="sklearn_digits", split="train", image_size=32, random_flip=False,
                     data_dir=ml_collections.config_dict.placeholder(str), shuffle_buffer=10_000)
  config.vae = dict(
      downsample_padding="end", image_size=32, in_channels=1, latent_channels=4, block_out_channels=(32, 64, 64),
      layers_per_block=1, norm_groups=16, mid_attention=True, dtype="float32")
  config.loss = dict(reconstruction="l1", kl_weight=1e-6)
  config.training = dict(
      batch_size=32, num_steps=2000, learning_rate=1e-3, warmup_steps=100, weight_decay=0.0, grad_clip=1.0,
      ema_decay=0.999, ema_warmup=True, log_every=100, checkpoint_every=1000, keep_checkpoints=2, sample_every=1000)
  config.evaluation = dict(split="test", num_images=0)
  config.parallel = dict(fsdp=1, distributed="auto", coordinator_address=ml_collections.config_dict.placeholder(str),
                         num_processes=ml_collections.config_dict.placeholder(int),
                         process_id=ml_collections.config_dict.placeholder(int))
  return ml_collections.ConfigDict(config)
