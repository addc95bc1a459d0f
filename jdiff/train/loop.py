"""The one training loop: data -> a jitted, sharded step of a trainer -> metrics, checkpoints, samples.

Every kind of training (the U-Net, the VAE) is a trainer: it parses its config and supplies its state, a pure
step function, its batches and what to write now and then. The loop owns the rest, the same for all of them:
multi-process start-up, the work dir's lock (one training job per work dir), the mesh, resuming from the latest
readable checkpoint (setting damaged ones aside), SIGTERM/SIGINT (finish the step, save, return), the non-finite
guard, metrics to TensorBoard, periodic checksummed checkpoints (a failed save stops training at once), samples and
evaluations, and the final evaluation.
"""
from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Callable, Iterator, Protocol

import jax
import numpy as np
from absl import logging
from clu import asynclib, metric_writers

from jdiff import checkpoint, sharding
from jdiff.config import ConfigError
from jdiff.data import tf_import
from jdiff.train import distributed, faults
from jdiff.train.state import TrainState


class Trainer(Protocol):
  """What a kind of training supplies to the loop (see jdiff/train/unet.py and vae.py)."""
  config: Any  # typed; has seed, training (TrainingConfig) and parallel (ParallelConfig)
  raw: dict  # the config as every checkpoint stores it
  step_inputs: tuple  # traced inputs of `step` after (state, batch, rng), e.g. the schedule
  resume_sections: tuple[str, ...]  # config sections a resumed run must share with its checkpoint

  def describe(self, state: TrainState) -> str: ...
  def init_state(self, rng: jax.Array) -> TrainState: ...  # pure: jitted onto the state's shardings
  def abstract_state(self) -> TrainState: ...
  def step(self, state: TrainState, batch: dict, rng: jax.Array, *inputs) -> tuple[TrainState, dict]: ...
  def batches(self, start_step: int) -> Iterator[dict]: ...  # this process's host batches from start_step on
  def prepare(self, batch: dict, step: int) -> dict: ...  # on the devices, before the step (e.g. to latents)
  def write_samples(self, state: TrainState, step: int, writer) -> None: ...
  def finish(self, state: TrainState, step: int, writer) -> None: ...
  # Optional: evaluate(state, step, writer), called every training.eval_every steps.


@dataclasses.dataclass(frozen=True)
class TrainResult:
  """What training returns: the final state, and the config as its checkpoints store it (for a latent model the
  resolved VAE path and scaling factor), which with the state is what jdiff.from_state needs."""
  state: TrainState
  config: dict
  workdir: str


TrainerFactory = Callable[..., Trainer]  # (config, raw, workdir, mesh, start_step) -> Trainer


class FileSystemError(RuntimeError):
  """Training stopped because a file could not be written or read (a full disk, say): its logs, a sample grid."""


def run(make_trainer: TrainerFactory, config, raw: dict, workdir: str) -> TrainResult:
  """Trains (or resumes) in `workdir` with the trainer that make_trainer builds for the typed `config`; raises
  locks.LockedError, naming the holder, when another process trains in `workdir`, checkpoint.CheckpointSaveError
  when a checkpoint cannot be saved, and FileSystemError when another file cannot be written."""
  distributed.initialize(config.parallel)
  with distributed.workdir_lock(workdir):
    try:
      return _train(make_trainer, config, raw, workdir)
    except (OSError, asynclib.AsyncError, tf_import.tensorflow().errors.OpError) as e:
      failed_save = _during(e, checkpoint.CheckpointSaveError)
      if failed_save is not None:  # The logs failed to flush on the way out of a failed save: the save comes first.
        raise failed_save from None
      last = checkpoint.latest_step(workdir)
      kept = (f"the last checkpoint is {checkpoint.checkpoint_dir(workdir)}/{last}" if last is not None
              else "no checkpoint was written")
      raise FileSystemError(f"training stopped: {file_error(e)}; {kept}. Fix the cause (free disk space, say) and "
                            "rerun the same command to resume") from e


def _during(error: BaseException, kind: type) -> BaseException | None:
  """The exception of type `kind` that `error` was raised while handling, if any."""
  while error is not None and not isinstance(error, kind):
    error = error.__context__
  return error


def file_error(error: BaseException) -> str:
  """What failed, from the error at the bottom of the chain (clu's asynchronous writer wraps TensorFlow's)."""
  while error.__cause__ is not None:
    error = error.__cause__
  line = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return re.sub(r"^\{\{[^}]*\}\}\s*", "", line)  # TensorFlow's "{{function_node ...}}" prefix


def _train(make_trainer: TrainerFactory, config, raw: dict, workdir: str) -> TrainResult:
  mesh = sharding.make_mesh(fsdp=config.parallel.fsdp)
  tc = config.training
  sharding.check_batch_divides(tc.batch_size, mesh, getattr(tc, "grad_accum_steps", 1))
  start = checkpoint.latest_step(workdir) or 0
  trainer = make_trainer(config, raw, workdir, mesh, start)
  batches = trainer.batches(start)  # Before anything is written: an unavailable dataset leaves the work dir alone.
  manager = checkpoint.make_manager(workdir, keep=tc.keep_checkpoints)
  state_sharding = sharding.state_sharding(trainer.abstract_state(), mesh)
  state = _restore_or_init(trainer, manager, state_sharding, start)
  if int(state.step) != start:  # The latest checkpoint was unreadable: resume from the one that restored.
    start = int(state.step)
    batches = trainer.batches(start)
  logging.info("%s; training steps %d..%d on %d device(s), mesh %s", trainer.describe(state), start, tc.num_steps,
               mesh.size, dict(mesh.shape))
  repl = sharding.replicated(mesh)
  in_shardings = (state_sharding, sharding.batch_sharded(mesh), repl) + (repl,) * len(trainer.step_inputs)
  step_fn = jax.jit(trainer.step, donate_argnums=0, in_shardings=in_shardings, out_shardings=(state_sharding, repl))
  step_fn = distributed.compile_then_sync(step_fn)
  rng = jax.random.key(trainer.config.seed)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start == 0:
    writer.write_hparams(_flatten(trainer.raw))
  history, saved, clock = [], start or None, _Clock()
  with metric_writers.ensure_flushes(writer), faults.StopRequest() as stop, checkpoint.Saver(manager) as saver:
    for step in range(start, tc.num_steps):
      batch = trainer.prepare(sharding.global_batch(next(batches), mesh), step)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = step_fn(state, batch, rng, *trainer.step_inputs)
      history.append(metrics)
      saver.check()
      done = step + 1
      if step == start:  # Rates count from the end of the first step, which compiles.
        clock.start(done, jax.block_until_ready(metrics))
      stopping = distributed.any_process(stop.requested)  # Read once: a signal may arrive at any moment.
      log_now = done % tc.log_every == 0 or done == tc.num_steps
      save_now = done % tc.checkpoint_every == 0 or done == tc.num_steps or stopping
      if log_now or save_now:
        faults.check_finite(history, done, tc.nonfinite, saved)  # Before a NaN step's state could be saved.
      if log_now:
        means = mean_metrics(history)
        rate = clock.rate(done)
        if rate:
          means["steps_per_sec"] = rate
        writer.write_scalars(done, means)
        logging.info("step %d/%d: loss %.5f%s", done, tc.num_steps, means["loss"],
                     f", {rate:.2f} steps/s, {_duration((tc.num_steps - done) / rate)} left" if rate else "")
        history = []
      if save_now:
        saver.save(done, state, trainer.raw)
        saved = done
      if stopping:
        logging.warning("stopped by %s after step %d with a checkpoint in %s; rerun the same command to resume",
                        stopping, done, manager.directory)
        break
      if (tc.sample_every and done % tc.sample_every == 0) or done == tc.num_steps:
        trainer.write_samples(state, done, writer)
      if tc.eval_every and done % tc.eval_every == 0 and hasattr(trainer, "evaluate"):
        trainer.evaluate(state, done, writer)
    else:
      if start < tc.num_steps:
        trainer.finish(state, tc.num_steps, writer)
  return TrainResult(state=state, config=trainer.raw, workdir=workdir)


class _Clock:
  """Steps per second between reports."""

  def start(self, step: int, _=None) -> None:
    self.step, self.time = step, time.perf_counter()

  def rate(self, step: int) -> float | None:
    now, steps = time.perf_counter(), step - self.step
    rate = steps / (now - self.time) if steps else None
    self.step, self.time = step, now
    return rate


def _duration(seconds: float) -> str:
  minutes, seconds = divmod(int(seconds), 60)
  return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{seconds:02d}s"


def _restore_or_init(trainer: Trainer, manager, state_sharding, step: int) -> TrainState:
  if not step:
    return jax.jit(trainer.init_state, out_shardings=state_sharding)(jax.random.key(trainer.config.seed))
  abstract = sharding.abstract_with_sharding(trainer.abstract_state(), state_sharding)

  def restore(s: int) -> TrainState:
    check_resumable(checkpoint.restore_config_checked(manager, s), trainer.raw, trainer.resume_sections)
    return checkpoint.restore_checked(manager, s, abstract)

  step, state, unreadable = checkpoint.restore_latest(manager, restore, before=step + 1)
  for bad in unreadable:
    checkpoint.set_aside(manager, bad)
  logging.info("resuming from checkpoint at step %d in %s", step, manager.directory)
  return state


def check_resumable(saved: dict, current: dict, sections: tuple[str, ...]) -> None:
  """Refuses to resume a checkpoint whose settings in `sections` (the model's, say) differ from the config's."""
  diffs = []
  for section in sections:
    before, now = saved.get(section, {}), current.get(section, {})
    for key in sorted(set(before) | set(now)):
      if _normalise(before.get(key)) != _normalise(now.get(key)):
        diffs.append(f"config.{section}.{key}: checkpoint has {before.get(key)!r}, config has {now.get(key)!r}")
  if diffs:
    raise ConfigError("the work dir holds a checkpoint of a different model; use another --workdir or the "
                      "checkpoint's settings. Mismatches:\n  " + "\n  ".join(diffs))


def _normalise(value):
  return list(value) if isinstance(value, (list, tuple)) else value


def mean_metrics(history: list[dict]) -> dict:
  """Means over the steps that were applied; nonfinite_steps is the count of skipped ones."""
  stacked = jax.device_get(history)
  applied = [m for m in stacked if not m.get("nonfinite_steps")] or stacked
  means = {k: float(np.mean([m[k] for m in applied])) for k in stacked[0]}
  means["nonfinite_steps"] = float(sum(m["nonfinite_steps"] for m in stacked))
  return means


def _flatten(raw: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in raw.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = str(value) if isinstance(value, (list, tuple)) or value is None else value
  return flat

