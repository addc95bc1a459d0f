"""Class-conditional digits trained for inpainting, in Stable Diffusion's inpainting layout on pixels: the U-Net
sees [noisy image, mask, masked image] (3 channels; jdiff/conditioning.py) and predicts the whole image.

  python train.py --config configs/inpaint_digits.py --workdir runs/inpaint_digits

Masks are random rectangles and brush strokes (jdiff/train/masks.py), and a tenth of the images are fully masked,
so the model also generates from its label alone. The default config's U-Net, schedule and budget otherwise.
Sampled with `Pipeline.inpaint_model`; measured in docs/super_resolution_and_inpainting.md (bench/inpainting.py).
"""
from jdiff.configs import default


def get_config():
  config = default.get_config()
  config.model.update(in_channels=3, out_channels=1)
  config.conditioning = dict(kind="inpainting", full_mask_rate=0.1)
  config.sampling.num_samples = 10
  return config
