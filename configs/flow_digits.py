"""The default digits model (configs/default.py) trained by flow matching (rectified flow, as Stable Diffusion 3 and
Flux): the same U-Net, data, optimizer and budget of 1,000 steps, predicting the velocity eps - x0 of
x_s = (1 - s) x0 + s eps with s drawn from SD3's logit-normal density (mean 0, std 1) and no shift (the images
are 16x16; SD3 shifts by 3 at 1024x1024). It samples by diffusers' FlowMatchEuler step over Flux's levels
linspace(1, 1 / n, n) (sampler 'flow_euler', spacing 'trailing'; spacing 'flow' gives FlowMatchEuler's own, whose
last step is nearly idle); every other sampler runs on it too. docs/flow_matching.md compares
it with the v-prediction default.

  python train.py --config configs/flow_digits.py --workdir runs/flow_digits
"""
import ml_collections

from jdiff.configs import default


def get_config():
  config = default.get_config()
  config.diffusion = ml_collections.ConfigDict(dict(
      num_timesteps=1000, prediction="flow", label_dropout=0.1, flow_density="logit_normal", flow_logit_mean=0.0,
      flow_logit_std=1.0, flow_shift=1.0))
  config.sampling.sampler = "flow_euler"
  return config
