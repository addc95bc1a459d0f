"""Latent vs pixel diffusion at the same image size: train-step and sampling time of one U-Net definition on
32x32x1 digit pixels and on the 8x8x4 latents of configs/vae_digits.py's VAE.

  python bench/latent_vs_pixel.py
  python bench/latent_vs_pixel.py --batch 32 --num 100 --steps 20 --repeats 5

Both use configs/latent_digits.py's U-Net (widths, depth, attention at the lowest level); only the input size and
channels differ. The latent rows include the VAE's work: encoding each training batch (a posterior sample) and
decoding the samples. Weights are random (the time does not depend on them). Medians of --repeats timed runs after
one compiling run; prints a Markdown table.
"""
import argparse
import functools
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jdiff import latent  # noqa: E402
from jdiff.build import param_count  # noqa: E402
from jdiff.config import parse_config, parse_vae_config  # noqa: E402
from jdiff.configs import latent_digits, vae_digits  # noqa: E402
from jdiff.models.vae import AutoencoderKL, init_vae_params  # noqa: E402
from jdiff.pipeline import Pipeline  # noqa: E402
from jdiff.schedules import make_schedule  # noqa: E402
from jdiff.train.step import create_train_state, train_step  # noqa: E402


def configs():
  """(pixel config, latent config): the same U-Net on 32x32x1 images and on 8x8x4 latents."""
  raw = latent_digits.get_config()
  lat = parse_config(raw)
  raw.latent.vae_workdir = None
  raw.model.update(image_size=32, in_channels=1, attention_resolutions=(16,))
  return parse_config(raw), lat


def median_seconds(fn, repeats: int) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measure(config, codec, args) -> tuple[float, float]:
  """(seconds per train step, seconds to sample args.num images) for one configuration."""
  schedule = make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  state = jax.jit(functools.partial(create_train_state, config))(jax.random.key(0))
  step = jax.jit(functools.partial(train_step, config=config))
  size = config.data.image_size
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(-1, 1, (args.batch, size, size, 1)).astype(np.float32),
           "label": rng.integers(0, 10, args.batch).astype(np.int32)}
  encode = (lambda b: b) if codec is None else (lambda b: dict(b, image=codec.encode(b["image"], jax.random.key(1))))
  train = lambda: step(state, encode(batch), jax.random.key(0), schedule)[1]["loss"]
  pipe = Pipeline(config=config, params=state.ema_params, codec=codec)
  sample = lambda: pipe.generate(num=args.num, sampler="ddim", steps=args.steps, guidance_scale=3.0).images
  return median_seconds(train, args.repeats), median_seconds(sample, max(1, args.repeats // 2))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--num", type=int, default=100, help="images sampled")
  parser.add_argument("--steps", type=int, default=20, help="DDIM steps (guidance 3, i.e. 2 U-Net passes a step)")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  pixel, lat = configs()
  vae_config = parse_vae_config(vae_digits.get_config()).vae
  codec = latent.LatentCodec(vae_config, init_vae_params(AutoencoderKL(vae_config), jax.random.key(0)), 1.0)
  print(f"{jax.devices()[0].platform}, {jax.device_count()} device(s); batch {args.batch}; {args.num} images with "
        f"{args.steps} DDIM steps at guidance 3\n")
  print("| diffusion on | U-Net input | U-Net params | train step (ms) | sampling (s) |")
  print("|---|---|---|---|---|")
  for name, config, c in (("pixels", pixel, None), ("VAE latents", lat, codec)):
    step_s, sample_s = measure(config, c, args)
    mc = config.model
    params = param_count(jax.eval_shape(lambda: create_train_state(config, jax.random.key(0))).params)
    print(f"| {name} | {mc.image_size}x{mc.image_size}x{mc.in_channels} | {params:,} | {1000 * step_s:.1f} | "
          f"{sample_s:.2f} |", flush=True)


if __name__ == "__main__":
  main()
