"""How well a ControlNet trained on `shapes` puts the shape where its control image says: the IoU of the requested
silhouette with the generated shape's, against the frozen base on the same prompts and seeds, and prompt adherence
(jdiff.metrics.shapes: detected colour and shape) with and without control.

  python bench/controlnet_adherence.py --base runs/shapes --controlnet runs/controlnet --num 300

The evaluation set is `num` fresh shapes drawn by jdiff.data.shapes.control_examples (seed --seed, a stream the
training batches never use) at the base's image size: their silhouettes are the requested masks, their control
images (the ControlNet's condition, silhouette or edges) what it is given. A generated image is segmented by its
colour distance from the background (the median of its border pixels): a pixel is the shape's where that distance
exceeds half the image's largest one, and an image whose largest distance is under the detector's MIN_CONTRAST
shows no shape (an empty mask, IoU 0). The first row checks the segmentation on the real images themselves.
Rows: the base with "a {colour} {shape}" (nothing says where), the base with the full caption (size and position
in words, e.g. "a small red circle at the top left"), the ControlNet with "a {colour} {shape}" at each
--control_scale, and with the full caption at scale 1. Prints a Markdown table.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jdiff  # noqa: E402
from jdiff.data import shapes  # noqa: E402
from jdiff.metrics import shapes as adherence  # noqa: E402

EVAL_STREAM = (1 << 21,)


def segment(images: np.ndarray) -> np.ndarray:
  """bool [N, S, S]: the pixels of each uint8 image [N, S, S, 3] that belong to its shape."""
  pixels = images.astype(np.float32)
  border = np.concatenate([pixels[:, 0], pixels[:, -1], pixels[:, 1:-1, 0], pixels[:, 1:-1, -1]], axis=1)
  distance = np.linalg.norm(pixels - np.median(border, axis=1)[:, None, None], axis=-1)
  contrast = distance.max(axis=(1, 2))
  return (distance > 0.5 * contrast[:, None, None]) & (contrast >= adherence.MIN_CONTRAST)[:, None, None]


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Intersection over union [N] of bool masks [N, S, S]."""
  union = (a | b).sum(axis=(1, 2))
  return (a & b).sum(axis=(1, 2)) / np.maximum(union, 1)


def row(name: str, images: np.ndarray, requested: np.ndarray, colours, kinds, seconds: str) -> str:
  scores = iou(segment(images), requested)
  accuracy = adherence.accuracy(images, colours, kinds)
  return (f"| {name} | {scores.mean():.3f} | {np.mean(scores > 0.5):.3f} | {accuracy['colour']:.3f} | "
          f"{accuracy['shape']:.3f} | {accuracy['both']:.3f} | {seconds} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--base", required=True, help="the base work dir (configs/shapes.py)")
  parser.add_argument("--controlnet", required=True, help="the ControlNet work dir (configs/controlnet_shapes.py)")
  parser.add_argument("--num", type=int, default=300)
  parser.add_argument("--seed", type=int, default=1000, help="the evaluation shapes' seed and the samples' first")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--guidance_scale", type=float, default=3.0)
  parser.add_argument("--control_scale", default="1", help="comma-separated conditioning scales")
  args = parser.parse_args()

  base = jdiff.load(args.base)
  controlled = base.with_controlnet(args.controlnet)
  size = base.image_shape[0]
  condition = _condition(args.controlnet)
  examples = shapes.control_examples(args.num, args.seed, EVAL_STREAM, size, condition)
  silhouettes = shapes.control_examples(args.num, args.seed, EVAL_STREAM, size, "silhouette")["control"]
  requested = silhouettes[..., 0] > 127
  colours, kinds = examples["colour"], examples["shape"]
  short = [shapes.caption(c, s) for c, s in zip(colours, kinds)]
  full = [shapes.caption(c, s, z, p) for c, s, z, p in zip(colours, kinds, examples["size"], examples["position"])]
  options = dict(seed=args.seed, steps=args.steps, guidance_scale=args.guidance_scale, sampler="ddim")
  print(f"base {args.base} (step {base.step}), ControlNet {args.controlnet} ({condition}); {args.num} shapes at "
        f"{size}x{size}, ddim {args.steps} steps, guidance {args.guidance_scale:g}\n")
  print("| images | mean IoU | IoU > 0.5 | colour | shape | both | seconds |")
  print("|---|---|---|---|---|---|---|")
  print(row("real images (segmentation check)", examples["image"], requested, colours, kinds, "-"))
  runs = [("base, \"a {colour} {shape}\"", lambda: base.generate(short, **options)),
          ("base, full caption (size, position)", lambda: base.generate(full, **options))]
  for scale in map(float, args.control_scale.split(",")):
    runs.append((f"ControlNet {scale:g}, \"a {{colour}} {{shape}}\"",
                 lambda scale=scale: controlled.generate(short, control_image=examples["control"], control_scale=scale,
                                                         **options)))
  runs.append(("ControlNet 1, full caption", lambda: controlled.generate(full, control_image=examples["control"],
                                                                        **options)))
  for name, make in runs:
    start = time.perf_counter()
    images = make().images
    print(row(name, images, requested, colours, kinds, f"{time.perf_counter() - start:.1f}"), flush=True)


def _condition(workdir: str) -> str:
  """The control images a ControlNet work dir was trained on: 'silhouette' or 'edges'."""
  from jdiff import checkpoint  # pylint: disable=import-outside-toplevel
  manager = checkpoint.make_manager(workdir, create=False)
  return checkpoint.restore_config_checked(manager, max(manager.all_steps()))["controlnet"]["condition"]


if __name__ == "__main__":
  main()
