"""Latent diffusion on the digits: the U-Net of configs/default.py's kind trained on the 8x8x4 latents of the VAE
that configs/vae_digits.py trains (32x32 digits), then sampled and decoded to 32x32 images.

  python train.py --config configs/vae_digits.py --workdir runs/vae_digits
  python train.py --config configs/latent_digits.py --workdir runs/latent_digits
  python sample.py --workdir runs/latent_digits --num 100 --out grid.png

The scaling factor (1 / std of the latents of the first 8 batches) is computed when training starts and stored
in the checkpoint's config, with the VAE's absolute path and step.
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = dict(name="sklearn_digits", split="train", image_size=32, random_flip=False,
                     data_dir=ml_collections.config_dict.placeholder(str), shuffle_buffer=10_000)
  config.latent = dict(vae_workdir="vae_digits", vae_checkpoint=ml_collections.config_dict.placeholder(int),
                       encode="sample", scaling_factor=0.0, scale_batches=8)
  config.model = dict(
      image_size=8, in_channels=4, channels=64, channel_mults=(1, 2), num_res_blocks=1,
      attention_resolutions=(4,), num_heads=1, dropout=0.0, num_classes=10, scale_shift=True,
      norm_groups=16, dtype="float32")
  config.diffusion = dict(schedule="cosine", num_timesteps=1000, prediction="v", min_snr_gamma=0.0,
                          label_dropout=0.1)
  config.training = dict(
      batch_size=32, num_steps=2000, learning_rate=1e-3, warmup_steps=200, weight_decay=0.0, grad_clip=1.0,
      ema_decay=0.999, ema_warmup=True, log_every=100, checkpoint_every=1000, keep_checkpoints=2,
      sample_every=1000, nonfinite="stop", grad_accum_steps=1, remat=False)
  config.sampling = dict(sampler="ddim", steps=20, spacing="trailing",
                         guidance_scale=3.0, eta=0.0, num_samples=100)
  config.parallel = dict(fsdp=1, distributed="auto", coordinator_address=ml_collections.config_dict.placeholder(str),
                         num_processes=ml_collections.config_dict.placeholder(int),
                         process_id=ml_collections.config_dict.placeholder(int))
  return ml_collections.ConfigDict(config)
