"""DreamBooth on a trained `shapes` model (configs/shapes.py): a shape it never saw, from a handful of images,
bound to "a sks shape", every weight fine-tuned, with the prior-preservation loss on images the base generates
for "a shape" before training (config.dreambooth.prior_weight = 0 turns it off).

  python bench/dreambooth_shapes.py --base runs/shapes --out runs/dreambooth   # draws the crosses, trains, measures
  python train.py --config configs/dreambooth_shapes.py --workdir runs/db --config.finetune.base=runs/shapes \
      --config.dreambooth.instance_images=crosses.npz

"sks" is not in jdiff's vocabulary: it takes the token id of "sandal", which the shapes captions never use, so the
base's text encoder keeps its size (jdiff.tokenizer.with_identifier). The base's model, text encoder and diffusion
settings replace this config's (jdiff/train/finetune.py).
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.finetune = dict(base=ml_collections.config_dict.placeholder(str))
  config.lora = dict(rank=0)  # full fine-tuning; rank > 0 trains adapters instead
  config.dreambooth = dict(instance_images=ml_collections.config_dict.placeholder(str), instance_prompt="a sks shape",
                           identifier="sks", replaces="sandal", class_prompt="a shape", prior_weight=1.0,
                           num_class_images=100, class_guidance_scale=3.0)
  config.data = dict(name="shapes")  # the image size is the base's
  config.text = dict(caption_dropout=0.1, sample_prompts=("a red circle", "a blue square", "a green triangle"))
  config.training = dict(
      batch_size=16, num_steps=200, learning_rate=2e-4, warmup_steps=10, weight_decay=0.0, grad_clip=1.0,
      ema_decay=0.99, ema_warmup=True, log_every=25, checkpoint_every=200, keep_checkpoints=1, sample_every=0)
  config.sampling = dict(sampler="ddim", steps=20, spacing="trailing", guidance_scale=3.0, eta=0.0, num_samples=16)
  return config
