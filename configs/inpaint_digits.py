"""Class-conditional digits trained for inpainting, in Stable Diffusion's inpainting layout on pixels: the U-Net
sees [noisy image, mask, masked image] (3 channels; jdiff/conditioning.py) and predicts the whole image.

  python train.py --config configs/inpaint_digits.py --workdir runs/inpaint_digits

Masks are random rectangles and brush strokes (jdiff/train/masks.py), and a tenth of the images are fully masked,
so the model also generates from its label alone. The default config's U-Net, schedule and budget otherwise.
Sampled with `Pipeline.inpaint_model`; measured in docs/super_resolution_and_inpainting.md (bench/inpainting.py).
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = dict(name="sklearn_digits", split="train", image_size=16, random_flip=False,
                     data_dir=ml_collections.config_dict.placeholder(str), shuffle_buffer=10_000)

  config.model = dict(
      image_size=16, in_channels=3, out_channels=1, channels=32, channel_mults=(1, 2, 2), num_res_blocks=1,
      attention_resolutions=(8,), num_heads=1, dropout=0.0, num_classes=10, scale_shift=True,
      norm_groups=8, dtype="float32")

  config.diffusion = dict(schedule="cosine", num_timesteps=1000, prediction="v", min_snr_gamma=0.0,
                          label_dropout=0.1)
  config.conditioning = dict(kind="inpainting", full_mask_rate=0.1)

  config.training = dict(
      batch_size=32, num_steps=1000, learning_rate=1e-3, warmup_steps=200, weight_decay=0.0, grad_clip=1.0,
      ema_decay=0.999, ema_warmup=True, log_every=100, checkpoint_every=500, keep_checkpoints=3,
      sample_every=500, nonfinite="stop", grad_accum_steps=1, remat=False)

  config.sampling = dict(sampler="ddim", steps=20, spacing="trailing",
                         guidance_scale=3.0, eta=0.0, num_samples=10)
  config.parallel = dict(fsdp=1, distributed="auto", coordinator_address=ml_collections.config_dict.placeholder(str),
                         num_processes=ml_collections.config_dict.placeholder(int),
                         process_id=ml_collections.config_dict.placeholder(int))
  return ml_collections.ConfigDict(config)
