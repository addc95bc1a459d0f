"""Where jdiff's compiled training step spends its time, by kind of operation (XLA:CPU or GPU).

  python bench/profile_step.py --preset medium     # the net and flags of bench/unet_vs_diffusers.py

Traces two steps with jax.profiler, maps every executed XLA kernel back to the HLO it runs (convolution: forward /
input-gradient, weight-gradient or 1x1; dot; GroupNorm; attention; transposes/copies; optimizer; other) and prints
the time per step and share of each kind. The times are summed over XLA's worker threads, so on a loaded machine
they include time spent preempted: read the shares, not the absolute values.
"""
from __future__ import annotations

import collections
import glob
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

import unet_vs_diffusers as bench  # noqa: E402

STEPS = 2


def kernel_kinds(hlo: str) -> dict[str, str]:
  """Fusion/kernel name -> kind, read from the computation each fusion calls."""
  bodies, current, calls = {}, None, {}
  for line in hlo.splitlines():
    header = re.match(r"^%?([\w.\-]+) .*\{$", line)
    if header:
      current = header.group(1)
      bodies[current] = []
    elif current:
      bodies[current].append(line)
    call = re.match(r"\s*%?([\w.\-]+) = .*calls=%?([\w.\-]+)", line)
    if call:
      calls[call.group(1)] = call.group(2)
  return {name: kind_of("\n".join(bodies.get(body, []))) for name, body in calls.items()}


def kind_of(body: str) -> str:
  ops = " ".join(re.findall(r'op_name="([^"]*)"', body))
  if " convolution(" in body:
    window = re.search(r"window=\{size=(\d+)x", body)
    size = window.group(1) if window else "?"
    return {"1": "conv 1x1", "3": "conv 3x3 forward / input gradient"}.get(size, "conv weight gradient")
  if " dot(" in body:
    return "dot (attention, dense)"
  if "norm" in ops:
    return "GroupNorm (+ fused elementwise)"
  if "attn" in ops:
    return "attention, other"
  if "transpose(" in body or " copy(" in body:
    return "transpose / copy"
  if any(word in ops for word in ("adam", "optax", "clip")):
    return "optimizer"
  return "other elementwise"


def main():
  args = bench.parse_args()
  config = bench.jdiff_config(args)
  bench.runtime.tune_cpu_process(cpu_devices=args.cpu_devices, micro_batch=args.batch,
                                 keep_host_memory=not args.nokeep_host_memory)  # what train.py does
  trainer = bench.JdiffTrainer(config)
  kinds = kernel_kinds(trainer.step_fn.as_text())
  trainer.step()
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      wall = sum(trainer.step() for _ in range(STEPS)) / STEPS
    profile = jax.profiler.ProfileData.from_file(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)[0])
  per_kind = collections.Counter()
  for plane in profile.planes:
    for line in plane.lines:
      if not line.name.startswith(("tf_XLAEigen", "Stream")):
        continue
      for event in line.events:
        if event.name in kinds:
          per_kind[kinds[event.name]] += event.duration_ns / 1e6 / STEPS
  total = sum(per_kind.values())
  print(f"step {wall:.3f} s wall; {total:.0f} ms of kernel time per step; load: {bench.load()}")
  print("| kind | ms per step | share |\n|---|---|---|")
  for kind, ms in per_kind.most_common():
    print(f"| {kind} | {ms:.0f} | {ms / total:.0%} |")


if __name__ == "__main__":
  main()
