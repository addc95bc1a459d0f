"""Stable Diffusion 1.5's autoencoder shape: 83,653,863 parameters, RGB -> 4-channel latents at 1/8 the size.

The architecture matches SD-1.5's AutoencoderKL layer for layer (jdiff's parameter names differ, and no weights are
loaded). Data is RGB CIFAR-10 upsampled to 256 px only to have a complete runnable config: it needs the cifar10 TFDS
data prepared and a GPU. tests/test_vae.py counts its parameters with jax.eval_shape.
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = dict(name="cifar10", split="train", image_size=256, random_flip=True,
                     data_dir=ml_collections.config_dict.placeholder(str), shuffle_buffer=10_000)
  config.vae = dict(
      downsample_padding="end", image_size=256, in_channels=3, latent_channels=4,
      block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_groups=32, mid_attention=True, dtype="bfloat16")
  config.loss = dict(reconstruction="l1", kl_weight=1e-6)
  config.training = dict(
      batch_size=16, num_steps=100_000, learning_rate=4.5e-6 * 16, warmup_steps=1000, weight_decay=0.0,
      grad_clip=1.0, ema_decay=0.999, ema_warmup=True, log_every=100, checkpoint_every=5000, keep_checkpoints=3,
      sample_every=5000)
  config.evaluation = dict(split="test", num_images=1000)
  config.parallel = dict(fsdp=1, distributed="auto", coordinator_address=ml_collections.config_dict.placeholder(str),
                         num_processes=ml_collections.config_dict.placeholder(int),
                         process_id=ml_collections.config_dict.placeholder(int))
  return ml_collections.ConfigDict(config)
