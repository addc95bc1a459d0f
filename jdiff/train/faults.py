"""Faults the training loop survives: preemption signals and non-finite steps.

`StopRequest` turns SIGTERM and SIGINT into a flag the loop reads after each step, so a preempted run finishes the
step, writes a checkpoint and returns; a second signal of the same kind acts at once (as if no handler were set).
`check_finite` reads the per-step `nonfinite_steps` metric at the loop's sync points (logging, checkpointing) and,
under training.nonfinite="stop", raises NonFiniteError naming the first bad step. train_step never applies a
non-finite update (see step.keep_if_finite), so the state in memory, and every checkpoint, stays finite.
"""
from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from absl import logging

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class NonFiniteError(RuntimeError):
  """A training step had a non-finite loss or gradient and training.nonfinite is "stop"."""


class StopRequest:
  """Context manager: while active, SIGTERM/SIGINT set `requested` (the signal's name) instead of killing."""

  def __init__(self, signals=SIGNALS):
    self.signals = signals
    self.requested: str | None = None
    self._previous = {}

  def __enter__(self) -> StopRequest:
    if threading.current_thread() is threading.main_thread():  # Python allows handlers only there.
      for sig in self.signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum, frame) -> None:
    name = signal.Signals(signum).name
    if self.requested == name:  # Asked twice: stop now, the way the signal would have without us.
      signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
      signal.raise_signal(signum)
      return
    self.requested = name
    logging.warning("%s received: finishing this step, then saving a checkpoint and exiting (send it again to "
                    "stop at once)", name)


def check_finite(history: list[dict], last_step: int, policy: str, last_checkpoint: int | None) -> int:
  """The number of non-finite steps in `history` (the metrics of steps last_step - len + 1 .. last_step).

  Raises NonFiniteError under policy "stop" if there is one, naming the first, its loss and gradient norm.
  """
  flags = np.asarray(jax.device_get([m["nonfinite_steps"] for m in history]))
  count = int(flags.sum())
  if count and policy == "stop":
    first = int(np.argmax(flags))
    bad = jax.device_get(history[first])
    kept = (f"the last checkpoint, step {last_checkpoint}, is kept" if last_checkpoint is not None
            else "no checkpoint was written")
    raise NonFiniteError(
        f"non-finite loss or gradient at step {last_step - len(history) + first + 1} (loss={float(bad['loss'])}, "
        f"grad_norm={float(bad['grad_norm'])}): training stopped without saving; {kept}. Lower "
        "config.training.learning_rate, or set config.training.nonfinite=skip to skip such steps")
  return count
