"""DDPM's CIFAR-10 model and training settings (Ho et al., 2020): 35.7M parameters, linear schedule, T=1000.

Needs the TFDS `cifar10` dataset prepared ahead where there is no network:
  tfds build cifar10 --data_dir DIR   (on a machine with network), then --config.data.data_dir=DIR.
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = dict(name="cifar10", split="train", image_size=32, random_flip=True,
                     data_dir=ml_collections.config_dict.placeholder(str), shuffle_buffer=10_000)

  # DDPM injects the time embedding additively (scale_shift=False) and uses one attention head.
  config.model = dict(
      image_size=32, in_channels=3, channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
      attention_resolutions=(16,), num_heads=1, dropout=0.1, num_classes=0, scale_shift=False,
      norm_groups=32, dtype="float32")

  config.diffusion = dict(schedule="linear", num_timesteps=1000, prediction="eps", min_snr_gamma=0.0,
                          label_dropout=0.0)

  config.training = dict(
      batch_size=128, num_steps=800_000, learning_rate=2e-4, warmup_steps=5000, weight_decay=0.0, grad_clip=1.0,
      ema_decay=0.9999, ema_warmup=False, log_every=100, checkpoint_every=5000, keep_checkpoints=3,
      sample_every=20_000, nonfinite="stop", grad_accum_steps=1, remat=False)

  config.sampling = dict(sampler="ddim", steps=100, spacing="trailing",
                         guidance_scale=1.0, eta=0.0, num_samples=64)
  config.parallel = dict(fsdp=1, distributed="auto", coordinator_address=ml_collections.config_dict.placeholder(str),
                         num_processes=ml_collections.config_dict.placeholder(int),
                         process_id=ml_collections.config_dict.placeholder(int))
  return ml_collections.ConfigDict(config)
