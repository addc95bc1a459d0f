"""The training loop: data -> jitted data-parallel train_step -> metrics, checkpoints, sample grids.

`train_and_evaluate(config, workdir)` is what train.py runs and what a notebook can call. It resumes
from the latest readable checkpoint in workdir by itself, and stops cleanly on SIGTERM/SIGINT and on non-finite
steps (jdiff/train/faults.py; docs/reliability.md).
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
from jdiff.train import checkpoint, distributed, faults, latent, sharding
from jdiff.train.state import TrainState, abstract_train_state, create_train_state, make_model, param_count
from jdiff.train.step import train_step

# Sections that fix the shapes and meaning of the parameters: resuming with other values is an error.
RESUME_SECTIONS = ("model", "diffusion")


def train_and_evaluate(raw_config, workdir: str) -> TrainState:
  config = parse_config(raw_config)
  raw = raw_config.to_dict() if hasattr(raw_config, "to_dict") else dict(raw_config)
  distributed.split_host_cpu(config.parallel, config.training.batch_size // config.training.grad_accum_steps)
  distributed.initialize(config.parallel)
  mesh = sharding.make_mesh(fsdp=config.parallel.fsdp)
  sharding.check_batch_divides(config.training.batch_size, mesh, config.training.grad_accum_steps)
  schedule = make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  # Open the data before writing anything, so an unavailable dataset leaves the work dir untouched.
  start = checkpoint.latest_step(workdir) or 0
  iterator = _open_data(config, start)
  codec = encode = None
  if config.latent.enabled:
    codec, raw = latent.prepare_latents(config, raw, workdir, start)
    config = parse_config(raw)
    encode = latent.make_batch_encoder(codec, mesh, config.seed)
  manager = checkpoint.make_manager(workdir, keep=config.training.keep_checkpoints)
  state_sharding = sharding.state_sharding(abstract_train_state(config), mesh)
  state = _restore_or_init(config, raw, manager, state_sharding, start)
  if int(state.step) != start:  # The latest checkpoint was unreadable: resume from the one that restored.
    start = int(state.step)
    iterator = _open_data(config, start)
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
  saved = start or None
  with metric_writers.ensure_flushes(writer), faults.StopRequest() as stop, checkpoint.finishing(manager):
    for step in range(start, tc.num_steps):
      batch = sharding.global_batch(next(iterator), mesh)
      if encode:
        batch = encode(batch, step)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        state, metrics = step_fn(state, batch, rng, schedule)
      history.append(metrics)
      done = step + 1
      progress(done)
      stopping = distributed.any_process(stop.requested)  # Read once: a signal may arrive at any moment.
      save_now = done % tc.checkpoint_every == 0 or done == tc.num_steps or stopping
      if done % tc.log_every == 0 or done == tc.num_steps or save_now:
        faults.check_finite(history, done, tc.nonfinite, saved)  # Before a NaN step's state could be saved.
      if done % tc.log_every == 0 or done == tc.num_steps:
        writer.write_scalars(done, _mean_metrics(history))
        history = []
      if save_now:
        checkpoint.save(manager, done, state, raw)
        saved = done
      if stopping:
        logging.warning("stopped by %s after step %d with a checkpoint in %s; rerun the same command to resume",
                        stopping, done, manager.directory)
        break
      if (tc.sample_every and done % tc.sample_every == 0) or done == tc.num_steps:
        write_sample_grid(config, state, schedule, workdir, done, writer, mesh, codec)
  return state


def _open_data(config: Config, start: int):
  try:
    iterator = data.make_train_iterator(config.data, config.training.batch_size, config.seed,
                                        process_index=jax.process_index(), process_count=jax.process_count(),
                                        start_step=start, captions=bool(config.model.context_dim))
  except ValueError as e:  # By its contract: a bad split, batch size or process layout.
    raise ConfigError(f"config.data: {e}") from None
  if config.model.context_dim:
    iterator = map(functools.partial(tokenize_captions, config.text.tokenizer()), iterator)
  return iterator


def tokenize_captions(tokenizer, batch: dict) -> dict:
  """The batch with its "caption" strings replaced by "tokens", int32 ids [B, max_length]."""
  batch = dict(batch)
  batch["tokens"] = tokenizer.encode(batch.pop("caption"))
  return batch


def _restore_or_init(config: Config, raw: dict, manager, state_sharding, step: int) -> TrainState:
  if not step:
    init = jax.jit(functools.partial(create_train_state, config), out_shardings=state_sharding)
    return init(jax.random.key(config.seed))
  abstract = sharding.abstract_with_sharding(abstract_train_state(config), state_sharding)

  def restore(s: int) -> TrainState:
    check_resumable(checkpoint.restore_config_checked(manager, s), raw)
    return checkpoint.restore_checked(manager, s, abstract)

  step, state, unreadable = checkpoint.restore_latest(manager, restore, before=step + 1)
  for bad in unreadable:
    checkpoint.set_aside(manager, bad)
  logging.info("Resuming from checkpoint at step %d in %s", step, manager.directory)
  return state


def check_resumable(saved: dict, current: dict, sections=RESUME_SECTIONS) -> None:
  """Refuses to resume a checkpoint whose model or diffusion settings (or other `sections`) differ from the config's."""
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


def write_sample_grid(config: Config, state: TrainState, schedule, workdir: str, step: int, writer,
                      mesh=None, codec: latent.LatentCodec | None = None) -> None:
  """Samples with the EMA params and the config's sampling settings (decoding latents with `codec`, if given);
  logs the grid and writes it as PNG.

  With a mesh, the EMA params are first gathered whole onto each of this process's devices, and every process
  samples the same grid on its own, the batch split over its devices (no collectives; the params may be sharded
  over devices of other processes).
  """
  sc, num_classes = config.sampling, config.model.num_classes
  seeds = np.arange(sc.num_samples)
  labels = seeds % num_classes if num_classes else None
  negatives = None
  if config.model.context_dim:  # One column per prompt of config.text.sample_prompts (none: the empty prompt).
    prompts = config.text.sample_prompts or ("",)
    num_classes = len(prompts)
    labels = config.text.tokenizer().encode([prompts[i % num_classes] for i in seeds])
    negatives = config.text.tokenizer().encode("")
  params = state.ema_params if mesh is None else sharding.local_replica(state.ema_params, mesh)
  images = generate.generate(make_model(config), params, schedule, seeds=seeds, labels=labels,
                             negative_labels=negatives, prediction=config.diffusion.prediction, sampler=sc.sampler,
                             num_steps=sc.num_steps, spacing=sc.spacing, guidance_scale=sc.guidance_scale, eta=sc.eta,
                             clip_x0=config.clip_x0)
  if codec:
    images = codec.decode(images)
  columns = num_classes if num_classes and sc.num_samples % num_classes == 0 else None
  grid = generate.make_grid(data.model_range_to_uint8(images), columns=columns)
  writer.write_images(step, {"samples": grid[None]})
  if jax.process_index() == 0:
    generate.save_png(grid, os.path.join(workdir, "samples", f"step_{step:07d}.png"))


def _mean_metrics(history: list[dict]) -> dict:
  """Means over the steps that were applied; nonfinite_steps is the count of skipped ones."""
  stacked = jax.device_get(history)
  applied = [m for m in stacked if not m.get("nonfinite_steps")] or stacked
  means = {k: float(np.mean([m[k] for m in applied])) for k in stacked[0]}
  if "nonfinite_steps" in means:
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
