"""Progressive distillation of the digits model (configs/default.py, v-prediction, cosine schedule) down to 1 step.

  python train.py --config configs/distill_digits.py --workdir runs/distill \\
    --config.distill.teacher=runs/default
  python sample.py --workdir runs/distill --out distilled.png   # 1 DDIM step, no guidance pass
  python sample.py --workdir runs/distill --checkpoint 1200 --out four.png  # the 4-step round's student

The student takes the teacher's model, data and diffusion sections (config.distill.teacher names its work dir) and
starts from its EMA params. Rounds 64 -> 32 -> 16 -> 8 -> 4 -> 2 -> 1 of distill.steps_per_round steps each; the first
teacher is guided at scale 3, which the students reproduce without guidance (docs/distillation.md).
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.distill = dict(teacher=ml_collections.config_dict.placeholder(str), method="progressive", teacher_steps=64,
                        steps=1, steps_per_round=200, weighting="snr+1", guidance_scale=3.0)
  # num_steps, checkpoint_every and keep_checkpoints follow from the rounds (a checkpoint ends each round).
  config.training = dict(batch_size=32, learning_rate=1e-4, warmup_steps=0, weight_decay=0.0, grad_clip=1.0,
                         ema_decay=0.99, ema_warmup=False, log_every=50, sample_every=0, nonfinite="stop")
  config.sampling = dict(num_samples=100)
  config.parallel = dict(fsdp=1, distributed="auto", coordinator_address=ml_collections.config_dict.placeholder(str),
                         num_processes=ml_collections.config_dict.placeholder(int),
                         process_id=ml_collections.config_dict.placeholder(int))
  return ml_collections.ConfigDict(config)
