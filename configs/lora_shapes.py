"""LoRA fine-tuning of a trained `shapes` model (configs/shapes.py): rank-8 adapters on the U-Net's attention
projections (q, k, v, out) and the text encoder's, trained a few hundred steps on the shapes captions.

  python train.py --config configs/lora_shapes.py --workdir runs/lora --config.finetune.base=runs/shapes
  python sample.py --workdir runs/shapes --lora runs/lora/lora.safetensors:1.0 --prompt "a red square" --out x.png

The base's model, text encoder and diffusion settings replace this config's (jdiff/train/finetune.py); the state
holds only the adapters, and the end of training writes them to WORKDIR/lora.safetensors in the layout diffusers'
load_lora_weights reads (docs/fine_tuning.md).
"""
import ml_collections

SAMPLE_PROMPTS = tuple(f"a {colour} {shape}" for colour in ("red", "green", "blue", "yellow", "magenta", "cyan")
                       for shape in ("circle", "square", "triangle"))


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.finetune = dict(base=ml_collections.config_dict.placeholder(str))
  config.lora = dict(rank=8, alpha=8.0, targets=("attention",), text_encoder=True)
  config.data = dict(name="shapes", split="train", image_size=16, random_flip=False,
                     data_dir=ml_collections.config_dict.placeholder(str), caption_template="{label}")
  # The model, the text encoder's architecture and the diffusion settings are the base's.
  config.text = dict(caption_dropout=0.1, sample_prompts=SAMPLE_PROMPTS)
  config.training = dict(
      batch_size=32, num_steps=300, learning_rate=1e-3, warmup_steps=20, weight_decay=0.0, grad_clip=1.0,
      ema_decay=0.99, ema_warmup=True, log_every=50, checkpoint_every=100, keep_checkpoints=2, sample_every=0)
  config.sampling = dict(sampler="ddim", steps=20, spacing="trailing", guidance_scale=3.0, eta=0.0, num_samples=18)
  return config
