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


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = dict(name="sklearn_digits", split="train", image_size=16, random_flip=False,
                     data_dir=ml_collections.config_dict.placeholder(str), shuffle_buffer=10_000)

  config.model = dict(
      image_size=16, in_channels=1, channels=32, channel_mults=(1, 2, 2), num_res_blocks=1,
      attention_resolutions=(8,), num_heads=1, dropout=0.0, num_classes=10, scale_shift=True,
      norm_groups=8, dtype="float32")

  config.diffusion = dict(num_timesteps=1000, prediction="flow", label_dropout=0.1, flow_density="logit_normal",
                          flow_logit_mean=0.0, flow_logit_std=1.0, flow_shift=1.0)

  config.training = dict(
      batch_size=32, num_steps=1000, learning_rate=1e-3, warmup_steps=200, weight_decay=0.0, grad_clip=1.0,
      ema_decay=0.999, ema_warmup=True, log_every=100, checkpoint_every=500, keep_checkpoints=3,
      sample_every=500, nonfinite="stop", grad_accum_steps=1, remat=False)

  config.sampling = dict(sampler="flow_euler", steps=20, spacing="trailing",
                         guidance_scale=3.0, eta=0.0, num_samples=100)
  config.parallel = dict(fsdp=1, distributed="auto", coordinator_address=ml_collections.config_dict.placeholder(str),
                         num_processes=ml_collections.config_dict.placeholder(int),
                         process_id=ml_collections.config_dict.placeholder(int))
  return ml_collections.ConfigDict(config)
