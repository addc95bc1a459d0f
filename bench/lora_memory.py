"""Memory of LoRA training against full fine-tuning on Stable Diffusion 1.5's U-Net and CLIP ViT-L/14 text encoder
(random weights, nothing allocated): the training state from jax.eval_shape, and the compiled step's buffers from
XLA's memory analysis (jit(...).lower(...).compile().memory_analysis()).

  python bench/lora_memory.py                         # batch 1 at 512x512 (64x64x4 latents), ranks 4 and 64
  python bench/lora_memory.py --batch 2 --ranks 8 --size 32

Full fine-tuning: the state holds the params, their EMA and Adam's two moments (the text encoder frozen by
config.text.trainable=False gets no gradient, but its weights stay in the state as the U-Net's do). LoRA (rank r on
the U-Net's attention q, k, v, out): the state holds the adapters alone; the frozen weights are an input of the step.
Prints a Markdown table; sizes in MiB of float32.
"""
import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# SD 1.5's UNet2DConditionModel config (the fields that differ from diffusers' defaults are the defaults themselves).
SD15_UNET = dict(_class_name="UNet2DConditionModel", sample_size=64, in_channels=4, out_channels=4,
                 block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=8,
                 cross_attention_dim=768, norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, use_linear_projection=False)
MIB = 2**20


def nbytes(tree) -> int:
  import jax
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def sd15_config(batch: int, size: int, rank: int):
  from jdiff.config import Config, DataConfig, DiffusionConfig, LoraConfig, SamplingConfig, TextConfig, TrainingConfig
  from jdiff.interop import configs
  from jdiff.models.text import CLIP_VIT_L14_TEXT
  unet = configs.unet_config(dict(SD15_UNET, sample_size=size), "float32")
  text = TextConfig(**{f: getattr(CLIP_VIT_L14_TEXT, f) for f in ("max_length", "width", "depth", "num_heads",
                                                                   "mlp_dim", "causal", "activation", "vocab_size")},
                    trainable=False)
  return Config(seed=0, data=DataConfig(image_size=size), model=unet, diffusion=DiffusionConfig(),
                training=TrainingConfig(batch_size=batch), sampling=SamplingConfig(), text=text,
                lora=LoraConfig(rank=rank, alpha=float(rank or 1), targets=("attention",)))


def setup(config):
  """(abstract state, jitted step, its abstract arguments after the state, frozen weights' bytes) of the config's
  training: full fine-tuning for lora.rank 0, else LoRA."""
  import jax
  from jdiff import build, lora
  from jdiff.train.finetune import lora_train_step
  from jdiff.train.state import fresh_state
  from jdiff.train.step import abstract_train_state, train_step
  mc = config.model
  batch = {"image": jax.ShapeDtypeStruct((config.training.batch_size, mc.image_size, mc.image_size, mc.in_channels),
                                         "float32"),
           "tokens": jax.ShapeDtypeStruct((config.training.batch_size, config.text.max_length), "int32")}
  inputs = (batch, jax.random.key(0), config.diffusion.make_schedule())
  params = build.abstract_params(config)
  if not config.lora.enabled:
    step = jax.jit(functools.partial(train_step, config=config), donate_argnums=0)
    return abstract_train_state(config), step, inputs, 0, params
  paths = lora.target_paths(params, config.lora.targets, ("unet",))
  state = jax.eval_shape(lambda: fresh_state(lora.init_adapters(jax.random.key(0), params, paths, config.lora.rank),
                                             config.training))
  step = jax.jit(functools.partial(lora_train_step, config=config), donate_argnums=0)
  return state, step, inputs + (params,), nbytes(params), params


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--size", type=int, default=64, help="latent side (64 = 512x512 images)")
  parser.add_argument("--ranks", default="4,64", help="comma-separated LoRA ranks (full fine-tuning always runs)")
  args = parser.parse_args()
  # Buffer assignment, which the memory analysis reports, precedes LLVM's code generation: skipping LLVM's
  # optimisations changes no number here and saves most of the compile time of an SD-size step.
  os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()
  import jax
  rows = []
  print(f"| method (batch {args.batch}, {args.size}x{args.size}x4 latents) | trainable params | training state (MiB) "
        "| of it Adam moments (MiB) | frozen weights, a step input (MiB) |\n|---|---|---|---|---|")
  for rank in [0] + [int(r) for r in args.ranks.split(",")]:
    name = "full fine-tuning" if not rank else f"LoRA rank {rank}, U-Net attention q/k/v/out"
    state, step, inputs, frozen, params = setup(sd15_config(args.batch, args.size, rank))
    count = lambda tree: sum(x.size for x in jax.tree_util.tree_leaves(tree))
    print(f"| {name} ({count(params) / 1e6:.1f}M params in all) | {count(state.params):,} | "
          f"{nbytes(state) / MIB:,.1f} | {nbytes(state.opt_state) / MIB:,.1f} | {frozen / MIB:,.1f} |", flush=True)
    rows.append((name, state, step, inputs))
  print("\n| method | XLA temporaries (MiB) | arguments (MiB) | outputs (MiB) | aliased (MiB) | arguments + outputs - "
        "aliased + temporaries (MiB) | compile (s) |\n|---|---|---|---|---|---|---|")
  for name, state, step, inputs in rows[1:] + rows[:1]:  # full fine-tuning's step, the largest compile, last
    start = time.perf_counter()
    a = step.lower(state, *inputs).compile().memory_analysis()
    total = a.argument_size_in_bytes + a.output_size_in_bytes - a.alias_size_in_bytes + a.temp_size_in_bytes
    print(f"| {name} | {a.temp_size_in_bytes / MIB:,.1f} | {a.argument_size_in_bytes / MIB:,.1f} | "
          f"{a.output_size_in_bytes / MIB:,.1f} | {a.alias_size_in_bytes / MIB:,.1f} | {total / MIB:,.1f} | "
          f"{time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
  main()
