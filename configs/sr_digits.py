"""Super-resolution of digits, 8 -> 16 pixels (SR3): the U-Net sees the noisy 16x16 image beside the 8x8 one
upsampled bicubically (jdiff/conditioning.py), and learns the high-resolution image it came from.

  python train.py --config configs/sr_digits.py --workdir runs/sr_digits
  python sample.py --workdir runs/sr_digits --upscale 2 --upscale_image low.png --out high.png

Training pairs each 16x16 digit with its 2x2 block means, rounded to 8 bits. Not conditioned on the class: the
low-resolution image is the condition. The default config's U-Net, schedule and budget otherwise. Measured in
docs/super_resolution_and_inpainting.md (bench/super_resolution.py: PSNR and SSIM against bicubic upsampling).
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = dict(name="sklearn_digits", split="train", image_size=16, random_flip=False,
                     data_dir=ml_collections.config_dict.placeholder(str), shuffle_buffer=10_000)

  config.model = dict(
      image_size=16, in_channels=2, out_channels=1, channels=32, channel_mults=(1, 2, 2), num_res_blocks=1,
      attention_resolutions=(8,), num_heads=1, dropout=0.0, num_classes=0, scale_shift=True,
      norm_groups=8, dtype="float32")

  config.diffusion = dict(schedule="cosine", num_timesteps=1000, prediction="v", min_snr_gamma=0.0,
                          label_dropout=0.0)
  config.conditioning = dict(kind="super_resolution", scale=2, upsample="bicubic")

  config.training = dict(
      batch_size=32, num_steps=1000, learning_rate=1e-3, warmup_steps=200, weight_decay=0.0, grad_clip=1.0,
      ema_decay=0.999, ema_warmup=True, log_every=100, checkpoint_every=500, keep_checkpoints=3,
      sample_every=500, nonfinite="stop", grad_accum_steps=1, remat=False)

  config.sampling = dict(sampler="ddim", steps=20, spacing="trailing",
                         guidance_scale=1.0, eta=0.0, num_samples=10)
  config.parallel = dict(fsdp=1, distributed="auto", coordinator_address=ml_collections.config_dict.placeholder(str),
                         num_processes=ml_collections.config_dict.placeholder(int),
                         process_id=ml_collections.config_dict.placeholder(int))
  return ml_collections.ConfigDict(config)
