"""The grace period a scheduler should give train.py: the seconds from SIGTERM to the process's exit.

  python bench/sigterm_grace.py --config tiny --runs 3
  python bench/sigterm_grace.py --config default --runs 3
  python bench/sigterm_grace.py --config cifar10 --runs 1 --config.data.name=shapes --config.data.image_size=32

Each run starts a real train.py in a fresh work dir with one log line per step, waits until it has trained
`--after` steps (past the compilation), sends SIGTERM a random fraction of a step later, and times the phases:
signal -> the "stopped by SIGTERM" line (the step in progress finishes and the checkpoint's arrays are copied off
the devices), -> exit (the save is written and the process ends). The cifar10 config needs its dataset; the third
command trains the same model on jdiff's offline shapes at 32x32 instead.
"""
import argparse
import os
import queue
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed_lines(stream, lines: queue.Queue) -> None:
  for line in stream:
    lines.put((time.perf_counter(), line))
  lines.put((time.perf_counter(), None))


def one_run(config: str, overrides: list[str], after: int, rng: random.Random) -> dict:
  """Phases of one SIGTERM, in seconds; also the step time measured from the log lines before it."""
  with tempfile.TemporaryDirectory() as workdir:
    command = [sys.executable, os.path.join(ROOT, "train.py"), "--config", config, "--workdir", workdir,
               "--config.training.num_steps=1000000", "--config.training.log_every=1", *overrides]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=timed_lines, args=(proc.stderr, lines), daemon=True).start()
    step_times, sent, stopped, log = [], None, None, []
    while True:
      when, line = lines.get()
      if line is None:
        break
      log.append(line)
      if line.startswith("step ") and sent is None:
        step_times.append(when)
        if len(step_times) == after:
          step = statistics.median(b - a for a, b in zip(step_times[1:], step_times[2:]))
          time.sleep(rng.uniform(0.0, step))
          proc.send_signal(signal.SIGTERM)
          sent = time.perf_counter()
      elif "stopped by SIGTERM" in line:
        stopped = when
    returncode = proc.wait()
    exited = time.perf_counter()
    if returncode != 0 or stopped is None:
      raise SystemExit(f"train.py exited {returncode} without stopping cleanly:\n{''.join(log[-20:])}")
  return {"step": step, "to_stopped": stopped - sent, "to_exit": exited - sent}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="tiny")
  parser.add_argument("--runs", type=int, default=3)
  parser.add_argument("--after", type=int, default=6, help="steps trained before the signal (at least 4)")
  parser.add_argument("--seed", type=int, default=0)
  args, overrides = parser.parse_known_args()
  rng = random.Random(args.seed)
  runs = [one_run(args.config, overrides, max(args.after, 4), rng) for _ in range(args.runs)]
  print("| config | runs | step (s) | SIGTERM -> stopped (s) | SIGTERM -> exit (s), median | max |")
  print("|---|---|---|---|---|---|")
  print(f"| {args.config} {' '.join(overrides)} | {len(runs)} | {statistics.median(r['step'] for r in runs):.2f} | "
        f"{statistics.median(r['to_stopped'] for r in runs):.2f} | "
        f"{statistics.median(r['to_exit'] for r in runs):.2f} | {max(r['to_exit'] for r in runs):.2f} |")


if __name__ == "__main__":
  main()
