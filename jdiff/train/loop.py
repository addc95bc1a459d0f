"""The training loop: data -> jitted data-parallel train_step -> metrics, checkpoints, sample grids.

`train_and_evaluate(config, workdir)` is what train.py runs and what a notebook can call. It resumes
from the latest checkpoint in workdir by itself.
"""
from __future__ import annotations

import functools
import os

import jax
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from jdiff import data, generate
from jdiff.config import Config, ConfigError, parse_config
from jdiff.schedules import make_schedule
from jdiff.train import checkpoint, distributed, sharding
from jdiff.train.state import TrainState, abstract_train_state, create_train_state, make_model, param_count
from jdiff.train.step import train_step

# Sections that fix the shapes and meaning of the parameters: resuming with other values is an error.
RESUME_SECTIONS = ("model", "diffusion")


def train_and_evaluate(raw_config, workdir: str) -> TrainState:
  config = parse_config(raw_config)
  raw = raw_config.to_dict() if hasattr(raw_config, "to_dict") else dict(raw_config)
  distributed.initialize(config.parallel)
  mesh = sharding.make_mesh(fsdp=config.parallel.fsdp)
  sharding.check_batch_divides(config.training.batch_size, mesh, config.training.grad_accum_steps)
  schedule = make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  # Open the data before writing anything, so an unavailable dataset leaves the work dir untouched.
  start = checkpoint.latest_step(workdir) or 0
  iterator = data.make_train_iterator(config.data, config.training.batch_size, config.seed,
                                      process_index=jax.process_index(), process_count=jax.process_count(),
                                      start_step=start)
  manager = checkpoint.make_manager(workdir, keep=config.training.keep_checkpoints)
  state_sharding = sharding.state_sharding(abstract_train_state(config), mesh)
  state = _restore_or_init(config, raw, manager, state_sharding, start)
  logging.info("U-Net with %d parameters; training steps %d..%d on %d device(s), mesh %s",
               param_count(state.params), start, config.training.num_steps, mesh.size, dict(mesh.shape))
  repl = sharding.replicated(mesh)
  step_fn = jax.jit(functools.partial(train_step, config=config),
                    in_shardings=(state_sharding, sharding.batch_sharded(mesh), repl, repl),
                    out_shardings=(state_sharding, repl), donate_argnums=0)
  step_fn = distributed.compile_then_sync(step_fn)
  rng = jax.random.key(config.seed)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start == 0:
    writer.write_hparams(_flatten(raw))
  progress = periodic_actions.ReportProgress(num_train_steps=config.training.num_steps, writer=writer)
  history = []
  tc = config.training
  with metric_writers.ensure_flushes(writer):
    for step in range(start, tc.num_steps):
      batch = sharding.global_batch(next(iterator), mesh)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = step_fn(state, batch, rng, schedule)
      history.append(metrics)
      done = step + 1
      progress(done)
      if done % tc.log_every == 0 or done == tc.num_steps:
        writer.write_scalars(done, _mean_metrics(history))
        history = []
      if done % tc.checkpoint_every == 0 or done == tc.num_steps:
        checkpoint.save(manager, done, state, raw)
      if (tc.sample_every and done % tc.sample_every == 0) or done == tc.num_steps:
        write_sample_grid(config, state, schedule, workdir, done, writer, mesh)
  manager.wait_until_finished()
  return state


def _restore_or_init(config: Config, raw: dict, manager, state_sharding, step: int) -> TrainState:
  if not step:
    init = jax.jit(functools.partial(create_train_state, config), out_shardings=state_sharding)
    return init(jax.random.key(config.seed))
  check_resumable(checkpoint.restore_config(manager, step), raw)
  abstract = sharding.abstract_with_sharding(abstract_train_state(config), state_sharding)
  logging.info("Resuming from checkpoint at step %d in %s", step, manager.directory)
  return checkpoint.restore_state(manager, step, abstract)


def check_resumable(saved: dict, current: dict) -> None:
  """Refuses to resume a checkpoint whose model or diffusion settings differ from the config's."""
  diffs = []
  for section in RESUME_SECTIONS:
    before, now = saved.get(section, {}), current.get(section, {})
    for key in sorted(set(before) | set(now)):
      if _normalise(before.get(key)) != _normalise(now.get(key)):
        diffs.append(f"config.{section}.{key}: checkpoint has {before.get(key)!r}, config has {now.get(key)!r}")
  if diffs:
    raise ConfigError("the work dir holds a checkpoint of a different model; use another --workdir or the "
                      "checkpoint's settings. Mismatches:\n  " + "\n  ".join(diffs))


def _normalise(value):
  return list(value) if isinstance(value, (list, tuple)) else value


def write_sample_grid(config: Config, state: TrainState, schedule, workdir: str, step: int, writer,
                      mesh=None) -> None:
  """Samples with the EMA params and the config's sampling settings; logs the grid and writes it as PNG.

  With a mesh, the EMA params are first gathered onto this process's first device, and every process samples
  the same grid there on its own (no collectives; the params may be sharded over devices of other processes).
  """
  sc, num_classes = config.sampling, config.model.num_classes
  seeds = np.arange(sc.num_samples)
  labels = seeds % num_classes if num_classes else None
  params = state.ema_params if mesh is None else sharding.local_copy(state.ema_params, mesh)
  images = generate.generate(make_model(config), params, schedule, seeds=seeds, labels=labels,
                             prediction=config.diffusion.prediction, sampler=sc.sampler, num_steps=sc.num_steps,
                             spacing=sc.spacing, guidance_scale=sc.guidance_scale, eta=sc.eta)
  columns = num_classes if num_classes and sc.num_samples % num_classes == 0 else None
  grid = generate.make_grid(data.model_range_to_uint8(images), columns=columns)
  writer.write_images(step, {"samples": grid[None]})
  if jax.process_index() == 0:
    generate.save_png(grid, os.path.join(workdir, "samples", f"step_{step:07d}.png"))


def _mean_metrics(history: list[dict]) -> dict:
  stacked = jax.device_get(history)
  return {k: float(np.mean([m[k] for m in stacked])) for k in stacked[0]}


def _flatten(raw: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in raw.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = str(value) if isinstance(value, (list, tuple)) or value is None else value
  return flat
