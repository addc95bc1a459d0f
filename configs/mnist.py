"""Class-conditional MNIST at 28x28 with classifier-free guidance.

Needs the TFDS `mnist` dataset prepared ahead where there is no network:
  tfds build mnist --data_dir DIR   (on a machine with network), then --config.data.data_dir=DIR.
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = dict(name="mnist", split="train", image_size=28, random_flip=False,
                     data_dir=ml_collections.config_dict.placeholder(str), shuffle_buffer=10_000)
  config.model = dict(
      image_size=28, in_channels=1, channels=64, channel_mults=(1, 2, 2), num_res_blocks=2,
      attention_resolutions=(7,), num_heads=4, dropout=0.1, num_classes=10, scale_shift=True,
      norm_groups=32, dtype="float32")
  config.diffusion = dict(schedule="cosine", num_timesteps=1000, prediction="eps", min_snr_gamma=0.0,
                          label_dropout=0.1)
  config.training = dict(
      batch_size=128, num_steps=50_000, learning_rate=2e-4, warmup_steps=1000, weight_decay=0.0, grad_clip=1.0,
      ema_decay=0.9995, ema_warmup=True, log_every=100, checkpoint_every=2500, keep_checkpoints=3,
      sample_every=5000, nonfinite="stop", grad_accum_steps=1, remat=False)
  config.sampling = dict(sampler="ddim", steps=50, spacing="trailing",
                         guidance_scale=3.0, eta=0.0, num_samples=100)
  config.parallel = dict(fsdp=1, distributed="auto", coordinator_address=ml_collections.config_dict.placeholder(str),
                         num_processes=ml_collections.config_dict.placeholder(int),
                         process_id=ml_collections.config_dict.placeholder(int))
  return ml_collections.ConfigDict(config)
