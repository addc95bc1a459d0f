"""Latent consistency distillation of the text-to-image shapes model (configs/shapes.py) for 1 to 8 step sampling.

  python train.py --config configs/lcm_shapes.py --workdir runs/lcm_shapes --config.distill.teacher=runs/shapes
  python sample.py --workdir runs/lcm_shapes --prompt "a red square" --out lcm.png   # sampler lcm, 4 steps
  python sample.py --workdir runs/lcm_shapes --prompt "a red square" --steps 1 --guidance_scale 5 --out one.png

The student takes the teacher's model, text, data and diffusion sections (config.distill.teacher names its work dir)
plus a guidance-scale input of width distill.guidance_embed_dim, and starts from the teacher's EMA params. The
teacher's DDIM solver skips distill.skip_steps timesteps, guided at a scale drawn from [w_min, w_max] per example;
sampling defaults to the teacher's guidance scale 3, now an input of the student (docs/distillation.md).
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.distill = dict(teacher=ml_collections.config_dict.placeholder(str), method="lcm", steps=4, skip_steps=20,
                        w_min=1.0, w_max=7.0, huber_c=0.001, target_decay=0.95, timestep_scaling=10.0,
                        guidance_embed_dim=64)
  # ema_decay is distill.target_decay: the EMA is the target network, and the model sampled.
  config.training = dict(batch_size=32, num_steps=500, learning_rate=2e-4, warmup_steps=50, weight_decay=0.0,
                         grad_clip=1.0, log_every=50, checkpoint_every=100, keep_checkpoints=2, sample_every=0,
                         nonfinite="stop")
  config.sampling = dict(num_samples=36)
  config.parallel = dict(fsdp=1, distributed="auto", coordinator_address=ml_collections.config_dict.placeholder(str),
                         num_processes=ml_collections.config_dict.placeholder(int),
                         process_id=ml_collections.config_dict.placeholder(int))
  return ml_collections.ConfigDict(config)
