"""Prompt adherence of a text-to-image model trained on `shapes`: the share of samples whose colour and shape, read by
a pixel-level detector (jdiff.adherence), are the prompt's, against the classifier-free guidance scale.

  python bench/shapes_adherence.py --workdir runs/shapes --guidance 0,1,3,7

Prompts are "a {colour} {shape}". 'held-out' prompts name the colour-shape pairs that training never showed
(red triangle, green circle, blue square); 'seen' prompts the other 15. Guidance 0 samples the unconditional model
(the empty prompt), so its row is the chance level of the data. The first rows validate the detector on real images
of the 'heldout' and 'test' splits at the model's image size. Prints a Markdown table.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jdiff  # noqa: E402
from jdiff.metrics import shapes as adherence  # noqa: E402
from jdiff.data import resize_images, shapes  # noqa: E402


def prompt_set(pairs, per_prompt: int) -> tuple[list[str], np.ndarray, np.ndarray]:
  """(prompts, colours, shapes) with each (colour, shape) pair repeated per_prompt times."""
  colours = np.repeat([shapes.COLOURS.index(c) for c, _ in pairs], per_prompt)
  kinds = np.repeat([shapes.SHAPES.index(s) for _, s in pairs], per_prompt)
  return [shapes.caption(c, s) for c, s in zip(colours, kinds)], colours, kinds


def row(name: str, guidance: str, scores: dict, seconds: str = "-") -> str:
  return f"| {name} | {guidance} | {scores['colour']:.3f} | {scores['shape']:.3f} | {scores['both']:.3f} | {seconds} |"


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--checkpoint", type=int, default=None, help="checkpoint step (default: the latest)")
  parser.add_argument("--guidance", default="0,1,3,7")
  parser.add_argument("--sampler", default="ddim")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--heldout_per_prompt", type=int, default=100, help="samples per held-out prompt (3 prompts)")
  parser.add_argument("--seen_per_prompt", type=int, default=20, help="samples per seen prompt (15 prompts)")
  parser.add_argument("--seed", type=int, default=1000, help="first seed (the training-time grids use 0..)")
  args = parser.parse_args()

  pipe = jdiff.load(args.workdir, step=args.checkpoint)
  size = pipe.config.model.image_size
  held = list(shapes.HELD_OUT_PAIRS)
  seen = [(c, s) for c in shapes.COLOURS for s in shapes.SHAPES if (c, s) not in held]
  sets = {"held-out": prompt_set(held, args.heldout_per_prompt), "seen": prompt_set(seen, args.seen_per_prompt)}
  print(f"checkpoint step {pipe.step}, image size {size}, {args.sampler} {args.steps} steps; samples: "
        f"{len(sets['held-out'][0])} held-out, {len(sets['seen'][0])} seen\n")
  print("| prompts | guidance | colour | shape | both | seconds |")
  print("|---|---|---|---|---|---|")
  for split, name in (("heldout", "real held-out images (detector check)"),
                      ("test", "real test images (detector check)")):
    real = shapes.shapes_split(split)
    print(row(name, "-", adherence.accuracy(resize_images(real["image"], size), real["colour"], real["shape"])))
  for guidance in map(float, args.guidance.split(",")):
    for name, (prompts, colours, kinds) in sets.items():
      start = time.perf_counter()
      samples = pipe.generate(prompts, seed=args.seed, sampler=args.sampler, steps=args.steps,
                              guidance_scale=guidance)
      seconds = f"{time.perf_counter() - start:.1f}"
      print(row(name, f"{guidance:g}", adherence.accuracy(samples.images, colours, kinds), seconds), flush=True)


if __name__ == "__main__":
  main()
