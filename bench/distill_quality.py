"""Few-step students against their teacher: quality and sampling time at each step count.

  python bench/distill_quality.py --workdir runs/distill                   # progressive distillation, digits
  python bench/distill_quality.py --workdir runs/lcm_shapes --steps 1,2,4 --teacher_steps 20,50

Digits (a class model): the share of samples a classifier trained on real digits reads as their class
(jdiff/metrics/digits.py) and the Fréchet distance to the training split on the dataset's own features
(jdiff/metrics/features.py, as jdiff-evaluate --metric fd computes it). Shapes (a text model): prompt adherence,
the share of samples whose detected colour and shape are the prompt's (jdiff/metrics/shapes.py; held-out and seen
pairs as bench/shapes_adherence.py reads them), and the same Fréchet distance.

A progressive-distillation work dir gives one student row per round (each round's checkpoint, at the steps it was
distilled for, one evaluation per step) and the teacher at the same steps with its guidance (two evaluations per
step); a consistency-distilled one gives the student at --steps (sampler lcm) and the teacher at --teacher_steps
(DDIM). Seconds: wall time per image (batch --batch), compilation excluded. Training time per round: the span
between the round's first and last logged steps in the work dir's TensorBoard events, scaled to the round's steps.
Prints Markdown tables.
"""
import argparse
import glob
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jdiff  # noqa: E402
from jdiff import checkpoint  # noqa: E402
from jdiff.data import shapes  # noqa: E402
from jdiff.metrics import digits, fid, quality  # noqa: E402
from jdiff.metrics import shapes as adherence  # noqa: E402


class Scorer:
  """Accuracy (digits) or prompt adherence (shapes), the Fréchet distance, and seconds per image of a pipeline."""

  def __init__(self, pipe, num: int, seed: int, batch: int):
    self.num, self.seed, self.batch = num, seed, batch
    self.network = quality.own_features(pipe)
    self.reference = fid.FeatureStats.of(self.network(quality.real_split(pipe, "train").images), self.network.space)
    self.text = pipe.is_text_model
    if self.text:
      pairs = [(c, s) for c in shapes.COLOURS for s in shapes.SHAPES]
      self.colours = np.repeat([shapes.COLOURS.index(c) for c, _ in pairs], -(-num // len(pairs)))[:num]
      self.kinds = np.repeat([shapes.SHAPES.index(s) for _, s in pairs], -(-num // len(pairs)))[:num]
      self.prompts = [f"a {shapes.COLOURS[c]} {shapes.SHAPES[s]}" for c, s in zip(self.colours, self.kinds)]
    else:
      self.classifier = digits.make_digit_classifier(pipe.image_shape[0])

  def __call__(self, pipe, **options) -> tuple[float, float, float]:
    condition = {"prompt": self.prompts} if self.text else {"label": np.arange(self.num) % 10}
    warm = {k: v[:self.batch] for k, v in condition.items()}
    pipe.generate(num=min(self.batch, self.num), seed=self.seed, batch_size=self.batch, **warm, **options)
    start = time.perf_counter()
    samples = pipe.generate(num=self.num, seed=self.seed, batch_size=self.batch, **condition, **options)
    seconds = (time.perf_counter() - start) / self.num
    if self.text:
      found = adherence.detect(samples.images)
      score = float(np.mean((found.colour == self.colours) & (found.shape == self.kinds)))
    else:
      score = digits.digit_accuracy(samples.images, samples.labels, self.classifier)
    fd = quality.distances(self.network(samples.images), self.reference, self.network.space, kid=False)["fd"]
    return score, fd, seconds


def round_seconds(workdir: str, steps_per_round: int, rounds: int) -> list[float | None]:
  """Training wall time of each round from the logged steps' wall times (the last run that logged each step)."""
  from tensorflow.compat.v1 import train as tf_train  # pylint: disable=import-outside-toplevel
  times = {}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    for event in tf_train.summary_iterator(path):
      if any(v.tag == "loss" for v in event.summary.value):
        times[event.step] = event.wall_time
  out = []
  for r in range(rounds):
    inside = sorted(s for s in times if r * steps_per_round < s <= (r + 1) * steps_per_round)
    first = max((s for s in times if s <= r * steps_per_round), default=None)
    start = first if first is not None else (inside[0] if inside else None)
    if not inside or start is None or inside[-1] == start:
      out.append(None)
      continue
    out.append((times[inside[-1]] - times[start]) * steps_per_round / (inside[-1] - start))
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--steps", default="1,2,4", help="a consistency model's sampling steps")
  parser.add_argument("--teacher_steps", default="20", help="extra teacher rows (DDIM) at these steps")
  parser.add_argument("--rounds", default=None, help="progressive distillation: only these rounds (e.g. 1,2,3)")
  parser.add_argument("--num", type=int, default=500)
  parser.add_argument("--seed", type=int, default=1000)
  parser.add_argument("--batch", type=int, default=250)
  args = parser.parse_args()

  student = jdiff.load(args.workdir)
  dc = student.config.distill
  if not dc.enabled:
    sys.exit(f"{args.workdir} holds no distilled model (its config has no distill.teacher)")
  teacher = jdiff.load(dc.teacher)
  guidance = teacher.config.sampling.guidance_scale
  score = Scorer(teacher, args.num, args.seed, args.batch)
  metric = "adherence" if teacher.is_text_model else "accuracy"
  print(f"{args.workdir}: {dc.method} distillation of {dc.teacher}; {args.num} samples per row from seed {args.seed}, "
        f"Fréchet distance on {score.network.name}\n")
  print(f"| model | sampler | steps | evaluations/image | {metric} | Fréchet distance | s/image | training |")
  print("|---|---|---|---|---|---|---|---|")
  rows = []
  if dc.method == "progressive":
    durations = round_seconds(args.workdir, dc.steps_per_round, dc.rounds)
    manager = checkpoint.make_manager(args.workdir, create=False)
    wanted = range(dc.rounds) if args.rounds is None else [int(r) - 1 for r in args.rounds.split(",") if r]
    for r in wanted:
      step = (r + 1) * dc.steps_per_round
      if step not in manager.all_steps():
        continue
      pipe = jdiff.load(args.workdir, step=step)
      n = pipe.config.sampling.steps
      trained = f"round {r + 1}: {dc.steps_per_round} steps, {durations[r]:.0f} s" if durations[r] else "-"
      rows.append((f"student, round {r + 1}", pipe, dict(sampler="ddim", steps=n), n, trained))
      rows.append(("teacher", teacher, dict(sampler="ddim", steps=n, guidance_scale=guidance), 2 * n, "-"))
  else:
    for n in map(int, args.steps.split(",")):
      rows.append(("student", student, dict(sampler="lcm", steps=n), n,
                   f"{student.step} steps" if n == int(args.steps.split(",")[0]) else ""))
  for n in [int(n) for n in args.teacher_steps.split(",") if n]:
    rows.append(("teacher", teacher, dict(sampler="ddim", steps=n, guidance_scale=guidance), 2 * n, "-"))
  for name, pipe, options, evaluations, trained in rows:
    value, fd, seconds = score(pipe, **options)
    print(f"| {name} | {options['sampler']} | {options['steps']} | {evaluations} | {value:.3f} | {fd:.3g} | "
          f"{seconds * 1e3:.2f} ms | {trained} |", flush=True)


if __name__ == "__main__":
  main()
