"""Text-to-image in miniature: the captioned `shapes` (offline) at 16x16, a U-Net cross-attending to a small text
encoder trained with it from scratch.

Captions such as "a small red circle at the top left" are tokenized (jdiff.tokenizer, at most 12 tokens) and
encoded by a 2-layer causal Transformer laid out like CLIP's text model; the U-Net's attention blocks at 8x8 and
in the middle are Stable Diffusion's transformer blocks (self-attention, cross-attention to the text, GEGLU
feed-forward). 10% of captions are dropped to the empty prompt, so classifier-free guidance works. No random
flips: they would swap left and right without the captions knowing. The 'heldout' colour-shape pairs (red
triangle, green circle, blue square) are never trained on: bench/shapes_adherence.py measures them.
"""
import ml_collections

SAMPLE_PROMPTS = tuple(f"a {colour} {shape}" for colour in ("red", "green", "blue", "yellow", "magenta", "cyan")
                       for shape in ("circle", "square", "triangle"))


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = dict(name="shapes", split="train", image_size=16, random_flip=False,
                     data_dir=ml_collections.config_dict.placeholder(str), shuffle_buffer=10_000,
                     caption_template="{label}")

  config.model = dict(
      image_size=16, in_channels=3, channels=32, channel_mults=(1, 2, 2), num_res_blocks=1,
      attention_resolutions=(8,), num_heads=4, dropout=0.0, num_classes=0, scale_shift=True,
      norm_groups=8, dtype="float32", context_dim=64, transformer_depth=1)

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
