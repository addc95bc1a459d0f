"""Inpainting by a digits model trained for it (configs/inpaint_digits.py): each held-out digit with one half masked
(left, right, top, bottom) is completed by Pipeline.inpaint_model, given the digit's label, and read by the digit
classifier of jdiff/metrics/digits.py; a whole-image mask measures generation from the label alone. With
--unlabelled the model gets the null class instead, so only the visible half can tell it which digit to complete.

  python bench/inpainting.py --workdir runs/inpaint_digits --steps 20 --guidance_scale 3 --num 100
  python bench/inpainting.py --workdir runs/inpaint_digits --steps 20 --num 100 --unlabelled

Prints a Markdown table: the classifier's accuracy on the completed images, on the real images (its ceiling) and on
the visible half alone (the masked half black, the digits' background); and the known region's error, the RMS
difference (in units of the 0..255 range) between the model's output and the real image where the mask is 0: the
model regenerates the whole image, so this is how well it keeps what it was given.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import jdiff  # noqa: E402
from jdiff import conditioning  # noqa: E402
from jdiff.metrics import digits as evaluation  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--checkpoint", type=int, default=None, help="checkpoint step (default: the latest)")
  parser.add_argument("--sampler", default="ddim")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--guidance_scale", type=float, default=3.0)
  parser.add_argument("--num", type=int, default=0, help="held-out digits (0: the whole test split)")
  parser.add_argument("--seed", type=int, default=1000)
  parser.add_argument("--unlabelled", action="store_true",
                      help="inpaint with the null class (guidance 1): the visible half alone must say the digit")
  args = parser.parse_args()

  pipe = jdiff.load(args.workdir, step=args.checkpoint)
  size = pipe.image_shape[0]
  classifier = evaluation.make_digit_classifier(size)
  real, labels = evaluation.real_digits("test", size)
  if args.num:
    real, labels = real[:args.num], labels[:args.num]
  given = dict(label=None, guidance_scale=1.0) if args.unlabelled else dict(label=labels,
                                                                             guidance_scale=args.guidance_scale)
  options = dict(given, seed=args.seed, sampler=args.sampler, steps=args.steps)
  first = {**options, "label": None if args.unlabelled else labels[:256]}
  pipe.inpaint_model(real[:256], np.ones((size, size)), **first)  # compiles
  print(f"checkpoint step {pipe.step}; {len(real)} held-out digits, {size} px; {args.sampler}, {args.steps} steps, "
        + ("the null class, guidance 1\n" if args.unlabelled else f"their labels, guidance {args.guidance_scale:g}\n"))
  print(f"real digits: accuracy {evaluation.digit_accuracy(real, labels, classifier):.3f}\n")
  print("| mask | accuracy, inpainted | accuracy, visible half alone | known region RMS error | seconds per image |")
  print("|---|---|---|---|---|")
  for side in (*conditioning.HALVES, "whole image"):
    whole = side == "whole image"
    mask = np.ones((size, size), np.float32) if whole else conditioning.half_mask(side, size, size)[..., 0]
    start = time.perf_counter()
    made = pipe.inpaint_model(real, mask, **options).images
    seconds = (time.perf_counter() - start) / len(real)
    known = mask[None, :, :, None] < 0.5
    error = "-" if not known.any() else \
        f"{np.sqrt(np.mean((made.astype(np.float64) - real)[np.broadcast_to(known, real.shape)] ** 2)):.2f}"
    visible = np.where(known, real, 0).astype(np.uint8)
    print(f"| {side} | {evaluation.digit_accuracy(made, labels, classifier):.3f} | "
          f"{evaluation.digit_accuracy(visible, labels, classifier):.3f} | {error} | {seconds:.4f} |", flush=True)


if __name__ == "__main__":
  main()
