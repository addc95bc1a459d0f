"""Prompt adherence of a text-to-image model trained on `shapes`: the share of samples whose colour and shape, read by
a pixel-level detector (jdiff.metrics.shapes), are the prompt's, against the classifier-free guidance scale.

  python bench/shapes_adherence.py --workdir runs/shapes --guidance_scale 0,1,3,7
  python bench/shapes_adherence.py --workdir runs/latent_shapes --guidance_scale 3 --clip_x0 on
  python bench/shapes_adherence.py --workdir runs/shapes --guidance_scale 7 --negative_prompt "" \
      --negative_prompt "a {other_colour} {shape}" --negative_prompt "{other_shape}"

Prompts are "a {colour} {shape}" (--prompt changes the template). 'held-out' prompts name the colour-shape pairs
that training never showed (red triangle, green circle, blue square); 'seen' prompts the other 15. Guidance 0
samples the unconditional model (the empty prompt), so its row is the chance level of the data. The first rows
validate the detector on real images of the 'heldout' and 'test' splits at the model's image size; for a latent
model, further rows score the same images after a round trip through the model's VAE (posterior mean, decoded),
the best its samples can look. --detect_size S resizes every image (samples and real ones, after the VAE) to SxS
before the detector reads it, e.g. 16 to read a 32x32 latent model's samples at the 16x16 of configs/shapes.py.
--per_pair adds a row for each held-out pair.

--clip_x0 auto leaves clipping of the denoised estimate to the model's config (on for pixel models, off for latent
ones); on or off forces it. Each --negative_prompt is a template filled per colour-shape pair, as --prompt is:
{colour} and {shape} are the pair's, {other_colour} the next colour in the dataset's list (red -> green -> blue ->
yellow -> magenta -> cyan -> red), {other_shape} the next shape (circle -> square -> triangle -> circle); "" is the
empty prompt, the default. Every negative prompt samples the same seeds. The scores always compare the detected
colour and shape with the pair's: with --prompt "a {shape}" --negative_prompt "{colour}", the colour column is the
share of samples drawn in the very colour the negative prompt names. Prints a Markdown table.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jdiff  # noqa: E402
from jdiff.data import resize_images, shapes  # noqa: E402
from jdiff.images import model_range_to_uint8, uint8_to_model_range  # noqa: E402
from jdiff.metrics import shapes as adherence  # noqa: E402

CLIP_X0 = {"auto": None, "on": True, "off": False}


def prompt_set(pairs, per_prompt: int, template: str) -> tuple[list[str], np.ndarray, np.ndarray]:
  """(prompts, colours, shapes) with each (colour, shape) pair repeated per_prompt times."""
  colours = np.repeat([shapes.COLOURS.index(c) for c, _ in pairs], per_prompt)
  kinds = np.repeat([shapes.SHAPES.index(s) for _, s in pairs], per_prompt)
  return [fill(template, c, s) for c, s in zip(colours, kinds)], colours, kinds


def fill(template: str, colour: int, shape: int) -> str:
  """A prompt or negative prompt template filled for the colour-shape pair."""
  return template.format(colour=shapes.COLOURS[colour], shape=shapes.SHAPES[shape],
                         other_colour=shapes.COLOURS[(colour + 1) % len(shapes.COLOURS)],
                         other_shape=shapes.SHAPES[(shape + 1) % len(shapes.SHAPES)])


def generate(pipe, prompts, colours, kinds, negative: str | None, seed: int, options: dict) -> np.ndarray:
  """Images for the prompts with seeds seed, seed + 1, ...; a negative template is filled per run of one
  colour-shape pair (the pipeline takes one negative prompt per call), keeping each image's seed."""
  if negative is None:
    return pipe.generate(prompts, seed=seed, **options).images
  images, start = [], 0
  while start < len(prompts):
    stop = start
    while stop < len(prompts) and (colours[stop], kinds[stop]) == (colours[start], kinds[start]):
      stop += 1
    images.append(pipe.generate(prompts[start:stop], seed=seed + start,
                                negative_prompt=fill(negative, colours[start], kinds[start]), **options).images)
    start = stop
  return np.concatenate(images)


def pair_rows(cells: list[str], images, colours, kinds, per_pair: bool) -> list[str]:
  """The row of all images, then (per_pair) one for each colour-shape pair among them."""
  rows = [row(cells, adherence.accuracy(images, colours, kinds))]
  if per_pair:
    for colour, shape in shapes.HELD_OUT_PAIRS:
      mine = (colours == shapes.COLOURS.index(colour)) & (kinds == shapes.SHAPES.index(shape))
      rows.append(row([f"{cells[0]}: {colour} {shape}"] + cells[1:],
                      adherence.accuracy(images[mine], colours[mine], kinds[mine])))
  return rows


def row(cells: list[str], scores: dict, seconds: str = "-") -> str:
  return (f"| {' | '.join(cells)} | {scores['colour']:.3f} | {scores['shape']:.3f} | {scores['both']:.3f} "
          f"| {seconds} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--checkpoint", type=int, default=None, help="checkpoint step (default: the latest)")
  parser.add_argument("--guidance_scale", default="0,1,3,7")
  parser.add_argument("--sampler", default="ddim")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--clip_x0", choices=tuple(CLIP_X0), default="auto",
                      help="clip the denoised estimate to [-1, 1] (auto: the config decides)")
  parser.add_argument("--prompt", default="a {colour} {shape}",
                      help="the prompt template of each colour-shape pair (placeholders as --negative_prompt's)")
  parser.add_argument("--negative_prompt", action="append", default=None,
                      help="a negative prompt template (repeatable; see above); default: the empty prompt only")
  parser.add_argument("--heldout_per_prompt", type=int, default=100, help="samples per held-out prompt (3 prompts)")
  parser.add_argument("--seen_per_prompt", type=int, default=20, help="samples per seen prompt (15 prompts)")
  parser.add_argument("--seed", type=int, default=1000, help="first seed (the training-time grids use 0..)")
  parser.add_argument("--no_real", action="store_true", help="skip the detector-check rows on real images")
  parser.add_argument("--per_pair", action="store_true", help="a row for each held-out pair")
  parser.add_argument("--detect_size", type=int, default=0,
                      help="resize images to this size for the detector (0: the model's image size)")
  args = parser.parse_args()

  pipe = jdiff.load(args.workdir, step=args.checkpoint)
  size = pipe.image_shape[0]
  detect_size = args.detect_size or size
  readable = lambda images: resize_images(images, detect_size)
  held = list(shapes.HELD_OUT_PAIRS)
  seen = [(c, s) for c in shapes.COLOURS for s in shapes.SHAPES if (c, s) not in held]
  sets = {"held-out": prompt_set(held, args.heldout_per_prompt, args.prompt),
          "seen": prompt_set(seen, args.seen_per_prompt, args.prompt)}
  clip_x0 = CLIP_X0[args.clip_x0]
  negatives = args.negative_prompt
  clipping = pipe.config.clip_x0 if clip_x0 is None else clip_x0
  print(f"checkpoint step {pipe.step}, image size {size} (read at {detect_size}), {args.sampler} {args.steps} steps, "
        f"clip_x0 {args.clip_x0} ({'on' if clipping else 'off'}), prompts \"{args.prompt}\"; samples: "
        f"{len(sets['held-out'][0])} held-out, {len(sets['seen'][0])} seen\n")
  extra = ["negative prompt"] if negatives else []
  header = ["prompts", "guidance"] + extra + ["colour", "shape", "both", "seconds"]
  print(f"| {' | '.join(header)} |")
  print("|" + "---|" * len(header))
  if not args.no_real:
    for split, name in (("heldout", "real held-out images"), ("test", "real test images")):
      real = shapes.shapes_split(split)
      images = resize_images(real["image"], size)
      per_pair = args.per_pair and split == "heldout"
      print(*pair_rows([f"{name} (detector check)", "-"] + ["-"] * len(extra), readable(images), real["colour"],
                       real["shape"], per_pair), sep="\n")
      if pipe.codec:
        round_trip = model_range_to_uint8(pipe.codec.decode(pipe.codec.encode(uint8_to_model_range(images))))
        print(*pair_rows([f"{name} through the VAE", "-"] + ["-"] * len(extra), readable(round_trip), real["colour"],
                         real["shape"], per_pair), sep="\n")
  for guidance in map(float, args.guidance_scale.split(",")):
    for negative in negatives or [None]:
      for name, (prompts, colours, kinds) in sets.items():
        start = time.perf_counter()
        images = readable(generate(pipe, prompts, colours, kinds, negative, args.seed,
                                   dict(sampler=args.sampler, steps=args.steps, guidance_scale=guidance,
                                        clip_x0=clip_x0)))
        seconds = f"{time.perf_counter() - start:.1f}"
        cells = [name, f"{guidance:g}"] + ([f'"{negative}"'] if negatives else [])
        print(row(cells, adherence.accuracy(images, colours, kinds), seconds), flush=True)
        if args.per_pair and name == "held-out":
          print(*pair_rows(cells, images, colours, kinds, True)[1:], sep="\n", flush=True)


if __name__ == "__main__":
  main()
