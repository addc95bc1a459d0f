"""A seconds-long smoke run on the offline digits at their native 8x8: for tests and quick checks."""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = dict(name="sklearn_digits", split="train", image_size=8, random_flip=False,
                     data_dir=ml_collections.config_dict.placeholder(str), shuffle_buffer=10_000)
  config.model = dict(
      image_size=8, in_channels=1, channels=16, channel_mults=(1, 2), num_res_blocks=1,
      attention_resolutions=(4,), num_heads=2, dropout=0.0, num_classes=10, scale_shift=True,
      norm_groups=8, dtype="float32")
  config.diffusion = dict(schedule="cosine", num_timesteps=1000, prediction="eps", min_snr_gamma=0.0,
                          label_dropout=0.1)
  config.training = dict(
      batch_size=16, num_steps=20, learning_rate=1e-3, warmup_steps=5, weight_decay=0.0, grad_clip=1.0,
      ema_decay=0.99, ema_warmup=True, log_every=5, checkpoint_every=10, keep_checkpoints=2, sample_every=0,
      nonfinite="stop", grad_accum_steps=1, remat=False)
  config.sampling = dict(sampler="ddim", steps=5, spacing="trailing",
                         guidance_scale=2.0, eta=0.0, num_samples=20)
  config.parallel = dict(fsdp=1, distributed="auto", coordinator_address=ml_collections.config_dict.placeholder(str),
                         num_processes=ml_collections.config_dict.placeholder(int),
                         process_id=ml_collections.config_dict.placeholder(int))
  return ml_collections.ConfigDict(config)
