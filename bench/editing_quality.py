"""Editing quality on held-out images: inpainting and img2img with the class-conditional digits model, outpainting
with the shapes text-to-image model. Prints Markdown tables and writes before/after grids.

  python bench/editing_quality.py --digits runs/default --num 100 --steps 20 --rounds 2 --jumps 5 --grids docs
  python bench/editing_quality.py --shapes runs/shapes --num 100 --steps 20 --grids docs

Inpainting: the held-out (test split) digits with the left, right, top or bottom half masked, or a random box (6 to
10 pixels a side at 16x16), completed class-conditionally with the true label (the config's guidance) and
unconditionally (guidance 0: the null class alone), and with --rounds, class-conditionally with RePaint's
resampling. Columns: the digit classifier's accuracy on the completed images, the largest error in the known region
(uint8 levels; 0 for a pixel model), and the seam score: the mean absolute difference between neighbouring pixels
across the mask's border, over the same quantity on the real images (1: as smooth as real digits). Img2img: each
test digit pushed toward the target class (label + 1) mod 10 with that label; the mean absolute pixel distance to
the input (0..255) and the classifier's agreement with the target and with the source class, per strength.
Outpainting: held-out shapes cut so that a quarter of the image on the side nearest the shape is gone, then
outpainted back with their caption; the shapes detector (jdiff.metrics.shapes) scores colour and kind against the
caption, beside the cut images padded with their edge pixels and the uncut ones.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jdiff  # noqa: E402
from jdiff import images as imaging  # noqa: E402
from jdiff.data import resize_images, shapes  # noqa: E402
from jdiff.metrics import digits as digit_metrics  # noqa: E402
from jdiff.metrics import shapes as shape_metrics  # noqa: E402


def half_masks(size: int, num: int, seed: int) -> dict[str, np.ndarray]:
  """Masks [num, size, size], 1 = regenerate: each half of the image, and a random box per image."""
  masks = {name: np.zeros((num, size, size), bool) for name in ("left", "right", "top", "bottom", "box")}
  half = size // 2
  masks["left"][:, :, :half] = masks["right"][:, :, half:] = True
  masks["top"][:, :half] = masks["bottom"][:, half:] = True
  rng = np.random.default_rng(seed)
  for mask in masks["box"]:
    h, w = rng.integers(size * 3 // 8, size * 5 // 8 + 1, 2)
    y, x = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
    mask[y:y + h, x:x + w] = True
  return masks


def seam_score(completed: np.ndarray, real: np.ndarray, masks: np.ndarray) -> float:
  """Mean |difference| of neighbouring pixels where one is masked and the other is not, completed over real."""
  def across(images):
    x = images[..., 0].astype(np.float32)
    total = count = 0.0
    for axis in (1, 2):
      diff = np.abs(np.diff(x, axis=axis))
      border = np.diff(masks.astype(np.int8), axis=axis) != 0
      total, count = total + diff[border].sum(), count + border.sum()
    return total / max(count, 1)
  return across(completed) / max(across(real), 1e-6)


def grid_rows(*rows: np.ndarray, columns: int = 8) -> np.ndarray:
  return imaging.make_grid(np.concatenate([r[:columns] for r in rows]), columns)


def digits(args) -> None:
  pipe = jdiff.load(args.digits)
  size = pipe.image_shape[0]
  classifier = digit_metrics.make_digit_classifier(size)
  real, labels = digit_metrics.real_digits("test", size)
  real, labels = real[:args.num], labels[:args.num]
  options = dict(steps=args.steps, sampler=args.sampler, batch_size=args.num)
  print(f"digits: {args.digits} (checkpoint {pipe.step}), {len(real)} test digits, {args.sampler}, {args.steps} steps,"
        f" guidance {pipe.config.sampling.guidance_scale:g} (conditional) / 0 (unconditional)\n")
  print(f"real test digits: classifier accuracy {digit_metrics.digit_accuracy(real, labels, classifier):.3f}\n")
  print("| mask | resampling | accuracy, true label | accuracy, unconditional | known-region max error | seam score |"
        " seconds |")
  print("|---|---|---|---|---|---|---|")
  masks = half_masks(size, len(real), seed=0)
  shown = []
  for name, mask in masks.items():
    for jumps, rounds in ((0, 0),) + (((args.jumps, args.rounds),) if args.rounds else ()):
      start = time.perf_counter()
      cond = pipe.inpaint(real, mask, label=labels, resample_jumps=jumps, resample_rounds=rounds, **options).images
      seconds = time.perf_counter() - start
      uncond = None if rounds else pipe.inpaint(real, mask, label=labels, guidance_scale=0.0, **options).images
      known = ~mask[..., None]
      error = int(np.abs(cond.astype(int) - real)[np.broadcast_to(known, real.shape)].max())
      print(f"| {name} | {f'{jumps} x {rounds}' if rounds else 'none'} | "
            f"{digit_metrics.digit_accuracy(cond, labels, classifier):.3f} | "
            f"{'-' if rounds else f'{digit_metrics.digit_accuracy(uncond, labels, classifier):.3f}'} | {error} | "
            f"{seam_score(cond, real, mask):.2f} | {seconds:.1f} |", flush=True)
      if not rounds:
        shown.append(np.where(mask[..., None], 255 - real // 2, real))
        shown.append(cond)
  if args.grids:
    imaging.save_png(grid_rows(real, *shown), os.path.join(args.grids, "editing_inpaint_digits.png"))
  target = (labels + 1) % 10
  print("\n| strength | distance to input (0..255) | agreement with target class | agreement with source class |"
        " seconds |")
  print("|---|---|---|---|---|")
  rows = []
  for strength in (0.0, 0.25, 0.5, 0.75, 1.0):
    start = time.perf_counter()
    edited = pipe.img2img(real, label=target, strength=strength, **options).images
    seconds = time.perf_counter() - start
    rows.append(edited)
    print(f"| {strength:g} | {np.abs(edited.astype(int) - real).mean():.1f} | "
          f"{digit_metrics.digit_accuracy(edited, target, classifier):.3f} | "
          f"{digit_metrics.digit_accuracy(edited, labels, classifier):.3f} | {seconds:.1f} |", flush=True)
  if args.grids:
    imaging.save_png(grid_rows(*rows), os.path.join(args.grids, "editing_img2img_digits.png"))


def shape_sides(images: np.ndarray) -> np.ndarray:
  """The side (0 left, 1 right, 2 top, 3 bottom) nearest each image's shape: its coverage's centre of mass."""
  pixels = images.astype(np.float32)
  background = np.median(np.concatenate([pixels[:, 0], pixels[:, -1]], axis=1), axis=1)
  weight = np.linalg.norm(pixels - background[:, None, None], axis=-1)
  size = images.shape[1]
  coords = np.arange(size) + 0.5
  y = (weight.sum(axis=2) * coords).sum(axis=1) / weight.sum(axis=(1, 2))
  x = (weight.sum(axis=1) * coords).sum(axis=1) / weight.sum(axis=(1, 2))
  distances = np.stack([x, size - x, y, size - y], axis=1)
  return np.argmin(distances, axis=1)


def outpainting(args) -> None:
  pipe = jdiff.load(args.shapes)
  size = pipe.image_shape[0]
  held = shapes.shapes_split("test")
  real = resize_images(held["image"][:args.num], size)
  captions = [str(c) for c in held["caption"][:args.num]]
  colour, kind = held["colour"][:args.num], held["shape"][:args.num]
  cut = size // 4
  names = ("left", "right", "top", "bottom")
  sides = shape_sides(real)
  completed, padded = np.empty_like(real), np.empty_like(real)
  seconds = 0.0
  for side in range(4):
    chosen = np.flatnonzero(sides == side)
    if not len(chosen):
      continue
    keep = {0: np.s_[:, :, cut:], 1: np.s_[:, :, :-cut], 2: np.s_[:, cut:], 3: np.s_[:, :-cut]}[side]
    cropped = real[chosen][keep]
    start = time.perf_counter()
    out = pipe.outpaint(cropped, [captions[i] for i in chosen], **{names[side]: cut}, steps=args.steps,
                        sampler=args.sampler, batch_size=args.num, seed=int(chosen[0]))
    seconds += time.perf_counter() - start
    completed[chosen] = out.images
    pad = [(0, 0), (cut * (side == 2), cut * (side == 3)), (cut * (side == 0), cut * (side == 1)), (0, 0)]
    padded[chosen] = np.pad(cropped, pad, mode="edge")
  print(f"outpainting: {args.shapes} (checkpoint {pipe.step}), {len(real)} test shapes at {size}x{size}, "
        f"{cut} pixels cut from the side nearest the shape and outpainted, {args.sampler}, {args.steps} steps, "
        f"guidance {pipe.config.sampling.guidance_scale:g}\n")
  print("| images | colour | kind | both | seconds |")
  print("|---|---|---|---|---|")
  for name, images, took in (("uncut", real, "-"), ("cut, edge-padded", padded, "-"),
                             ("cut, outpainted", completed, f"{seconds:.1f}")):
    scores = shape_metrics.accuracy(images, colour, kind)
    print(f"| {name} | {scores['colour']:.3f} | {scores['shape']:.3f} | {scores['both']:.3f} | {took} |", flush=True)
  if args.grids:
    imaging.save_png(grid_rows(real, padded, completed), os.path.join(args.grids, "editing_outpaint_shapes.png"))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--digits", help="a class-conditional digits work dir (inpainting and img2img)")
  parser.add_argument("--shapes", help="a shapes text-to-image work dir (outpainting)")
  parser.add_argument("--num", type=int, default=200)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--sampler", default="ddim")
  parser.add_argument("--jumps", type=int, default=5, help="RePaint jump length for the resampling rows")
  parser.add_argument("--rounds", type=int, default=0, help="RePaint rounds for extra rows (0: none)")
  parser.add_argument("--grids", default=None, help="directory for the before/after PNG grids")
  args = parser.parse_args()
  if args.digits:
    digits(args)
  if args.shapes:
    outpainting(args)


if __name__ == "__main__":
  main()
