"""DreamBooth on a trained `shapes` model: teach it a cross (a plus sign), a shape its data never shows, from 5 images
bound to "a sks shape", with and without prior preservation, and measure what it learnt and what it forgot.

  python bench/dreambooth_shapes.py --base runs/shapes --out runs/dreambooth
  python bench/dreambooth_shapes.py --base runs/shapes --out runs/dreambooth --steps 200 --num 48

1. Draws the instance images (jdiff.metrics.crosses): 5 yellow crosses in the center, with the dataset's jitter, at
   32x32 and resized to the model's size as the dataset's images are.
2. Trains configs/dreambooth_shapes.py from --base twice with train.py (prior_weight 1 and 0), every weight.
3. Samples --num images per prompt from the base and from each run: "a sks shape", "a red sks shape" (a colour the
   instances never had), "a sks shape at the top left" (a place they never were), and reads them with the cross
   detector (validated first on drawn crosses and on the dataset's own shapes, at the model's size). The base reads
   "sks" too, at the id of a word it never saw: its row is the chance level.
4. Adherence to the original prompts: "a {colour} {shape}" for the 15 colour-shape pairs training showed, read by
   the shapes detector (as bench/shapes_adherence.py does), before and after.
Prints Markdown tables and the wall time of each part; the config's sampling settings (DDIM, 20 steps, guidance 3).
"""
import argparse
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jdiff  # noqa: E402
from jdiff.data import resize_images, shapes  # noqa: E402
from jdiff.metrics import crosses, shapes as adherence  # noqa: E402
from jdiff.tokenizer import with_identifier  # noqa: E402

INSTANCE_COLOUR, INSTANCE_POSITION = "yellow", "center"
PROMPTS = {"a sks shape": (None, None), "a red sks shape": ("red", None),
           "a sks shape at the top left": (None, "top left")}


def validate_detector(num: int, size: int) -> list[str]:
  drawn = crosses.draw_crosses(num, seed=1)
  d = crosses.detect_crosses(resize_images(drawn["image"], size))
  real = shapes.shapes_examples(num, seed=2)
  r = crosses.detect_crosses(resize_images(real["image"], size))
  return [f"| detector at {size}x{size} on | read as a cross | colour right | place right |", "|---|---|---|---|",
          f"| {num} drawn crosses (random colour and place) | {d.cross.mean():.3f} | "
          f"{(d.colour == drawn['colour']).mean():.3f} | {(d.position == drawn['position']).mean():.3f} |",
          f"| {num} dataset shapes (circles, squares, triangles) | {r.cross.mean():.3f} | "
          f"{(r.colour == real['colour']).mean():.3f} | {(r.position == real['position']).mean():.3f} |"]


def train(base: str, workdir: str, instances: str, prior_weight: float, steps: int) -> float:
  start = time.perf_counter()
  command = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs",
                                                                                        "dreambooth_shapes.py"),
             "--workdir", workdir, f"--config.finetune.base={base}", f"--config.dreambooth.instance_images={instances}",
             f"--config.dreambooth.prior_weight={prior_weight}", f"--config.training.num_steps={steps}",
             f"--config.training.checkpoint_every={steps}"]
  subprocess.run(command, check=True, env=dict(os.environ, PYTHONPATH=ROOT))
  return time.perf_counter() - start


def subject_row(name: str, pipe, num: int) -> str:
  cells = []
  for prompt, (colour, position) in PROMPTS.items():
    d = crosses.detect_crosses(pipe.generate(prompt, num=num).images)
    ok = d.cross.copy()
    if colour:
      ok &= d.colour == shapes.COLOURS.index(colour)
    if position:
      ok &= d.position == shapes.POSITIONS.index(position)
    cells.append(f"{d.cross.mean():.2f} / {ok.mean():.2f}")
  return f"| {name} | " + " | ".join(cells) + " |"


def original_adherence(pipe, per_pair: int) -> tuple[float, float, float]:
  held = set(shapes.HELD_OUT_PAIRS)
  pairs = [(c, s) for c in shapes.COLOURS for s in shapes.SHAPES if (c, s) not in held]
  colours = np.repeat([shapes.COLOURS.index(c) for c, _ in pairs], per_pair)
  kinds = np.repeat([shapes.SHAPES.index(s) for _, s in pairs], per_pair)
  prompts = [f"a {shapes.COLOURS[c]} {shapes.SHAPES[s]}" for c, s in zip(colours, kinds)]
  images = pipe.generate(prompts).images
  scores = adherence.accuracy(images, colours, kinds)
  return scores["colour"], scores["shape"], scores["both"]


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--base", required=True, help="a trained shapes work dir (configs/shapes.py)")
  parser.add_argument("--out", required=True, help="a directory for the instance images and the two runs")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--num", type=int, default=32, help="samples per subject prompt")
  parser.add_argument("--per_pair", type=int, default=4, help="samples per original colour-shape prompt")
  parser.add_argument("--evaluate", default="", help="comma-separated prior weights whose runs in --out are trained "
                      "already: measure them (and the base) without training")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  base = jdiff.load(args.base)
  size = base.config.model.image_size
  print("\n".join(validate_detector(300, size)), flush=True)
  instances = os.path.join(args.out, "crosses.npz")
  drawn = crosses.draw_crosses(5, seed=0, colour=shapes.COLOURS.index(INSTANCE_COLOUR),
                               position=shapes.POSITIONS.index(INSTANCE_POSITION))
  if not args.evaluate:
    np.savez(instances, image=resize_images(drawn["image"], size))
  runs = {}
  for prior_weight in [float(w) for w in args.evaluate.split(",")] if args.evaluate else (1.0, 0.0):
    workdir = os.path.join(args.out, f"prior_{prior_weight:g}")
    runs[prior_weight] = workdir, 0.0 if args.evaluate else train(args.base, workdir, instances, prior_weight,
                                                                   args.steps)
    print(f"trained {workdir}: {runs[prior_weight][1]:.0f} s", flush=True)
  base.tokenizer = with_identifier(base.tokenizer, "sks", "sandal")
  models = {"base (sks: an unseen token id)": base}
  models.update({f"DreamBooth, {'with' if w else 'no'} prior preservation ({args.steps} steps"
                 f"{f', trained in {t:.0f} s' if t else ''})":
                 jdiff.load(d) for w, (d, t) in runs.items()})
  print(f"\n| model | {' | '.join(PROMPTS)} |\n|---|---|---|---|")
  for name, pipe in models.items():
    start = time.perf_counter()
    row = subject_row(name, pipe, args.num)
    print(row + f" <!-- sampled in {time.perf_counter() - start:.0f} s -->", flush=True)
  print("\ncells: share of samples read as a cross / as a cross with the prompt's colour and place")
  print("\n| model | colour right | shape right | both |\n|---|---|---|---|")
  for name, pipe in models.items():
    colour, shape, both = original_adherence(pipe, args.per_pair)
    print(f"| {name} | {colour:.3f} | {shape:.3f} | {both:.3f} |", flush=True)


if __name__ == "__main__":
  main()
