"""Progressive distillation (Salimans & Ho, 2022): a student that takes one DDIM step where its teacher takes two.

A run is a sequence of rounds in one work dir, through the one loop (jdiff/train/loop.py). Round r occupies training
steps [r S, (r + 1) S) with S = distill.steps_per_round; its teacher samples teacher_steps / 2^r DDIM steps and its
student learns to sample half as many. The state carries the round's teacher params beside the student's, so the
round is a function of the step alone: at the first step of a round the previous student's EMA params become both
the teacher and the new student (the optimizer restarts), which makes a checkpoint resume in its round. Each round
ends with a checkpoint, kept, whose config records the teacher and the steps its student was distilled for.

Classifier-free guidance is distilled at the fixed scale distill.guidance_scale: the first round's teacher is the
guided teacher (conditional and unconditional evaluations combined); the students predict the guided output from
the condition alone and sample without guidance, one evaluation per step.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp

from jdiff import diffusion, samplers
from jdiff.build import make_model
from jdiff.config import Config, ConfigError, parse_config
from jdiff.schedules import Schedule
from jdiff.train import loop
from jdiff.train.state import TrainState, apply_gradients, fresh_state, make_optimizer
from jdiff.train.unet import UNetTrainer

# The sections a student takes from its teacher: they fix what the params mean.
TEACHER_SECTIONS = ("data", "model", "diffusion", "text", "latent")


@flax.struct.dataclass
class DistillState(TrainState):
  teacher: Any  # the current round's teacher params


# Pure maths of the target, in the variance-preserving scale z = alpha x0 + sigma eps.

def trailing_timesteps(j, n, num_timesteps: int):
  """Timestep j of n with trailing spacing (samplers.timesteps), for traced j and n; j = n is the data, -1."""
  return (jnp.round(num_timesteps - j * num_timesteps / n) - 1).astype(jnp.int32)


def alpha_sigma(schedule: Schedule, t, ndim: int):
  """(alpha, sigma) = (sqrt(abar_t), sqrt(1 - abar_t)) broadcast to rank ndim; t = -1 is the data (1, 0)."""
  abar = jnp.where(t < 0, 1.0, jnp.take(schedule.alphas_cumprod, jnp.maximum(t, 0)))
  abar = abar.reshape(abar.shape + (1,) * (ndim - abar.ndim))
  return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)


def ddim_step(z, x0, alpha, sigma, alpha_next, sigma_next):
  """DDIM's deterministic step from z at (alpha, sigma) to (alpha_next, sigma_next) given the x0 estimate."""
  return alpha_next * x0 + sigma_next * (z - alpha * x0) / sigma


def progressive_target(denoise, z, t, t_mid, t_end, schedule: Schedule):
  """The x0 target of Salimans & Ho's Algorithm 2: the x0 with which one DDIM step from z at t lands where the
  teacher's two DDIM steps t -> t_mid -> t_end land. denoise(z, t) -> the teacher's x0 estimate."""
  a, s = alpha_sigma(schedule, t, z.ndim)
  a_mid, s_mid = alpha_sigma(schedule, t_mid, z.ndim)
  a_end, s_end = alpha_sigma(schedule, t_end, z.ndim)
  z_mid = ddim_step(z, denoise(z, t), a, s, a_mid, s_mid)
  z_end = ddim_step(z_mid, denoise(z_mid, t_mid), a_mid, s_mid, a_end, s_end)
  ratio = s_end / s
  return (z_end - ratio * z) / (a_end - ratio * a)


def x0_weight(schedule: Schedule, t, weighting: str):
  """Per-example weight of the squared x0 error: SNR + 1 (= the v-prediction loss) or max(SNR, 1)."""
  snr = jnp.exp(jnp.take(schedule.log_snr, t))
  return snr + 1.0 if weighting == "snr+1" else jnp.maximum(snr, 1.0)


# The training step.

def _x0_fn(params, cond, schedule, *, config: Config, guidance_scale=None):
  """denoise(z, t) -> x0 of the model with `params` (guided at guidance_scale if given), clipped like sampling."""
  model = make_model(config)
  model_fn = lambda x, t, c: model.apply({"params": params}, x, t, c)
  if guidance_scale is not None:
    model_fn = samplers.guided_model_fn(model_fn, guidance_scale=guidance_scale, uncond=_null_condition(cond, config))

  def denoise(z, t):
    abar = jnp.take(schedule.alphas_cumprod, t).reshape((-1,) + (1,) * (z.ndim - 1))
    pred = model_fn(z, t.astype(jnp.float32), cond)
    x0 = diffusion.to_x0_eps(pred, x_t=z, alpha_bar=abar, prediction=config.diffusion.prediction)[0]
    return jnp.clip(x0, -1.0, 1.0) if config.clip_x0 else x0
  return denoise


def _null_condition(cond, config: Config):
  if config.model.context_dim:
    return jnp.asarray(config.text.tokenizer().encode("")[0])
  return jnp.full(cond.shape, config.model.num_classes, jnp.int32)


def _condition(batch: dict, config: Config):
  if config.model.context_dim:
    return batch["tokens"]
  return batch["label"] if config.model.num_classes else None


def round_of(step, distill) -> jax.Array:
  return jnp.minimum(step // distill.steps_per_round, distill.rounds - 1)


def _start_round(state: DistillState, config: Config) -> DistillState:
  """The previous round's student (its EMA) becomes the teacher and the new student; the optimizer restarts."""
  params = state.ema_params
  return DistillState(step=state.step, params=params, ema_params=params,
                      opt_state=make_optimizer(config.training).init(params), teacher=params)


def distill_loss(params, teacher, batch: dict, rng: jax.Array, round_index, schedule: Schedule, *, config: Config):
  """The weighted x0 error of the student against the two-step target, for one batch of data."""
  dc = config.distill
  x0 = batch["image"]
  k_i, k_noise = jax.random.split(rng)
  n = dc.teacher_steps // 2 ** (round_index + 1)  # the student's steps this round
  i = jax.random.randint(k_i, (x0.shape[0],), 0, n)
  T = config.diffusion.num_timesteps
  t, t_mid, t_end = (trailing_timesteps(2 * i + k, 2 * n, T) for k in range(3))
  z = diffusion.q_sample(schedule, x0, t, jax.random.normal(k_noise, x0.shape, jnp.float32))
  cond = _condition(batch, config)
  plain = lambda: progressive_target(_x0_fn(teacher, cond, schedule, config=config), z, t, t_mid, t_end, schedule)
  if dc.guidance_scale != 1.0 and cond is not None:
    guided = _x0_fn(teacher, cond, schedule, config=config, guidance_scale=dc.guidance_scale)
    target = jax.lax.cond(round_index == 0, lambda: progressive_target(guided, z, t, t_mid, t_end, schedule), plain)
  else:
    target = plain()
  target = jax.lax.stop_gradient(target)
  abar = diffusion.extract(schedule.alphas_cumprod, t, x0.ndim)
  pred = make_model(config).apply({"params": params}, z, t.astype(jnp.float32), cond)
  x0_student = diffusion.to_x0_eps(pred, x_t=z, alpha_bar=abar, prediction=config.diffusion.prediction)[0]
  err = jnp.mean(jnp.square(x0_student - target), axis=tuple(range(1, x0.ndim)))
  return jnp.mean(x0_weight(schedule, t, dc.weighting) * err)


def distill_step(state: DistillState, batch: dict, rng: jax.Array, schedule: Schedule, *, config: Config):
  """(new state, metrics); a round's first step first hands the student over to be the teacher."""
  dc = config.distill
  boundary = (state.step % dc.steps_per_round == 0) & (state.step > 0)
  state = jax.lax.cond(boundary, lambda: _start_round(state, config), lambda: state)
  round_index = round_of(state.step, dc)
  loss, grads = jax.value_and_grad(distill_loss)(state.params, state.teacher, batch, jax.random.fold_in(rng, state.step),
                                                 round_index, schedule, config=config)
  new, metrics = apply_gradients(state, loss, grads, config.training)
  metrics["round"] = round_index
  return DistillState(step=new.step, params=new.params, ema_params=new.ema_params, opt_state=new.opt_state,
                      teacher=state.teacher), metrics


# The trainer.

class DistillTrainer(UNetTrainer):
  """The U-Net trainer's data and samples, with the distillation step and state (teacher params inside)."""

  def __init__(self, config: Config, raw: dict, workdir: str, mesh, start_step: int, *, teacher_params):
    super().__init__(config, raw, workdir, mesh, start_step)
    self.resume_sections = ("model", "diffusion", "distill")
    self.step = functools.partial(distill_step, config=self.config)
    self._teacher_params = teacher_params
    self.init_state = self._init_state

  def _init_state(self, rng: jax.Array) -> DistillState:
    del rng  # the student starts as the teacher
    state = fresh_state(self._teacher_params, self.config.training)
    return DistillState(**{f.name: getattr(state, f.name) for f in dataclasses.fields(state)},
                        teacher=self._teacher_params)

  def abstract_state(self) -> DistillState:
    return jax.eval_shape(self._init_state, jax.random.key(0))

  def describe(self, state) -> str:
    dc = self.config.distill
    return (f"progressive distillation of {dc.teacher} from {dc.teacher_steps} to {dc.steps} steps in "
            f"{dc.rounds} rounds of {dc.steps_per_round}; {super().describe(state)}")

  def write_samples(self, state, step: int, writer) -> None:
    steps = self.config.distill.student_steps(step)
    config = self.config
    self.config = dataclasses.replace(config, sampling=dataclasses.replace(config.sampling, steps=steps))
    try:
      super().write_samples(state, step, writer)
    finally:
      self.config = config


def student_config(raw: dict, teacher_config: Config) -> dict:
  """The run's config as its checkpoints store it: the teacher's model sections, this config's training and
  distillation, a round per checkpoint, and sampling as the student samples (DDIM, its steps, no guidance)."""
  raw = dict(raw)
  dc = parse_config(raw).distill
  for section in TEACHER_SECTIONS:
    raw[section] = _plain(dataclasses.asdict(getattr(teacher_config, section)))
  raw["distill"] = dict(raw["distill"], teacher=os.path.abspath(dc.teacher))
  raw["training"] = dict(raw.get("training", {}), num_steps=dc.rounds * dc.steps_per_round,
                         checkpoint_every=dc.steps_per_round, keep_checkpoints=dc.rounds)
  sampling = _plain(dataclasses.asdict(teacher_config.sampling))
  raw["sampling"] = {**sampling, **raw.get("sampling", {}), "sampler": "ddim", "steps": dc.steps, "eta": 0.0,
                     "guidance_scale": 1.0}
  return raw


def _plain(value):
  """asdict's tuples as lists, the form a checkpoint's JSON config stores."""
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def train(raw: dict, workdir: str) -> loop.TrainResult:
  """Distils the teacher that raw's distill section names, in `workdir` (resuming in its round)."""
  import jdiff  # the inference API reads the teacher, whatever its format
  teacher_dir = parse_config(raw).distill.teacher
  try:
    teacher = jdiff.load(teacher_dir)
  except (OSError, ValueError) as e:
    raise ConfigError(f"config.distill.teacher={teacher_dir!r} cannot be loaded: {e}") from None
  if parse_config(raw).distill.method == "lcm":
    from jdiff.train import lcm
    raw = lcm.student_config(raw, teacher.config)
    factory = functools.partial(lcm.LCMTrainer, teacher_params=teacher.params, teacher_config=teacher.config)
  else:
    raw = student_config(raw, teacher.config)
    factory = functools.partial(DistillTrainer, teacher_params=teacher.params)
  return loop.run(factory, parse_config(raw), raw, workdir)
