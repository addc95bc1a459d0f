"""Stable Diffusion in miniature: text-to-image on the latents of a VAE, all offline.

The captioned `shapes` at 32x32 are encoded by the VAE that configs/vae_shapes.py trains (8x8x4 latents); a U-Net
with cross-attention to a 2-layer CLIP-style text encoder, trained with it from scratch, denoises the latents;
sampling decodes them with the VAE. Captions are dropped to the empty prompt 10% of the time for guidance.

  python train.py --config configs/vae_shapes.py --workdir runs/vae_shapes
  python train.py --config configs/latent_shapes.py --workdir runs/latent_shapes
  python sample.py --workdir runs/latent_shapes --prompt "a red square" --guidance 5 --out red_squares.png
"""
import ml_collections

SAMPLE_PROMPTS = tuple(f"a {colour} {shape}" for colour in ("red", "green", "blue", "yellow", "magenta", "cyan")
                       for shape in ("circle", "square", "triangle"))


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = dict(name="shapes", split="train", image_size=32, random_flip=False,
                     data_dir=ml_collections.config_dict.placeholder(str), shuffle_buffer=10_000,
                     caption_template="{label}")
  config.latent = dict(vae_workdir="vae_shapes", vae_checkpoint=ml_collections.config_dict.placeholder(int),
                       encode="sample", scaling_factor=0.0, scale_batches=8)
  config.model = dict(
      image_size=8, in_channels=4, channels=64, channel_mults=(1, 2), num_res_blocks=1,
      attention_resolutions=(8, 4), num_heads=4, dropout=0.0, num_classes=0, scale_shift=True,
      norm_groups=16, dtype="float32", context_dim=64, transformer_depth=1)
  config.text = dict(max_length=12, width=64, depth=2, num_heads=4, mlp_dim=256, causal=True,
                     activation="quick_gelu", trainable=True, caption_dropout=0.1, sample_prompts=SAMPLE_PROMPTS)
  config.diffusion = dict(schedule="cosine", num_timesteps=1000, prediction="v", min_snr_gamma=0.0,
                          label_dropout=0.0)
  config.training = dict(
      batch_size=64, num_steps=2000, learning_rate=1e-3, warmup_steps=200, weight_decay=0.0, grad_clip=1.0,
      ema_decay=0.999, ema_warmup=True, log_every=100, checkpoint_every=500, keep_checkpoints=2,
      sample_every=1000, nonfinite="stop", grad_accum_steps=1, remat=False)
  config.sampling = dict(sampler="ddim", steps=20, spacing="trailing",
                         guidance_scale=3.0, eta=0.0, num_samples=36)
  config.parallel = dict(fsdp=1, distributed="auto", coordinator_address=ml_collections.config_dict.placeholder(str),
                         num_processes=ml_collections.config_dict.placeholder(int),
                         process_id=ml_collections.config_dict.placeholder(int))
  return ml_collections.ConfigDict(config)
