"""Super-resolution of digits, 8 -> 16 pixels (SR3): the U-Net sees the noisy 16x16 image beside the 8x8 one
upsampled bicubically (jdiff/conditioning.py), and learns the high-resolution image it came from.

  python train.py --config configs/sr_digits.py --workdir runs/sr_digits
  python sample.py --workdir runs/sr_digits --upscale 2 --upscale_image low.png --out high.png

Training pairs each 16x16 digit with its 2x2 block means, rounded to 8 bits. Not conditioned on the class: the
low-resolution image is the condition. The default config's U-Net, schedule and budget otherwise. Measured in
docs/super_resolution_and_inpainting.md (bench/super_resolution.py: PSNR and SSIM against bicubic upsampling).
"""
from jdiff.configs import default


def get_config():
  config = default.get_config()
  config.model.update(in_channels=2, out_channels=1, num_classes=0)
  config.diffusion.label_dropout = 0.0
  config.conditioning = dict(kind="super_resolution", scale=2, upsample="bicubic")
  config.sampling.update(guidance_scale=1.0, num_samples=10)
  return config
