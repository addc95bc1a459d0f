"""Latent consistency distillation (Luo et al., 2023), on pixels or latents, through the one loop.

The student is the teacher's U-Net with a guidance-scale input (UNetConfig.time_cond_proj_dim, zero-initialised,
so the student starts as the teacher) read through the consistency parameterisation
f(z, t) = c_skip(t) z + c_out(t) x0(z, t), which is z itself at t = 0 (samplers.consistency_scalings). Each step
draws a timestep t_n from the skipping grid k - 1, 2k - 1, ..., T - 1 (k = distill.skip_steps), a guidance scale w
in [w_min, w_max], and noises the data to z at t_n; the teacher, guided at w, takes one DDIM step from t_n to
t_{n-k} (0 for the first grid point); the loss is the pseudo-Huber distance between the student's f at (z, t_n)
and the target network's f at the teacher's landing point (t_{n-k}), the target network being the EMA of the
student (training.ema_decay = distill.target_decay) and the model sampled afterwards with sampler 'lcm'.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from flax import traverse_util

from jdiff import build, diffusion, samplers
from jdiff.build import make_model
from jdiff.config import Config, parse_config
from jdiff.models.layers import guidance_embedding
from jdiff.schedules import Schedule
from jdiff.train.distill import TEACHER_SECTIONS, DistillState, DistillTrainer, _null_condition, _plain
from jdiff.train.state import apply_gradients, fresh_state


def solver_timesteps(num_timesteps: int, skip: int) -> jnp.ndarray:
  """The teacher solver's grid k - 1, 2k - 1, ..., T - 1 (as LCMScheduler's original timesteps)."""
  return jnp.arange(1, num_timesteps // skip + 1) * skip - 1


def pseudo_huber(a, b, c: float):
  """sqrt(|a - b|^2 + c^2) - c elementwise: quadratic near 0, linear beyond c."""
  return jnp.sqrt(jnp.square(a - b) + c**2) - c


def consistency_fn(model_fn, z, t, schedule: Schedule, *, prediction: str, timestep_scaling: float):
  """f(z, t) = c_skip z + c_out x0 of a model_fn(z, t) -> its prediction, z in the variance-preserving scale."""
  abar = diffusion.extract(schedule.alphas_cumprod, t, z.ndim)
  x0 = diffusion.to_x0_eps(model_fn(z, t.astype(jnp.float32)), x_t=z, alpha_bar=abar, prediction=prediction)[0]
  c_skip, c_out = (c.reshape((-1,) + (1,) * (z.ndim - 1)) for c in samplers.consistency_scalings(t, timestep_scaling))
  return c_skip * z + c_out * x0


def teacher_ddim_step(model_fn, z, t, t_prev, schedule: Schedule, *, prediction: str):
  """DDIM's step of a (guided) teacher from z at t to t_prev."""
  abar = diffusion.extract(schedule.alphas_cumprod, t, z.ndim)
  abar_prev = diffusion.extract(schedule.alphas_cumprod, t_prev, z.ndim)
  x0, eps = diffusion.to_x0_eps(model_fn(z, t.astype(jnp.float32)), x_t=z, alpha_bar=abar, prediction=prediction)
  return jnp.sqrt(abar_prev) * x0 + jnp.sqrt(1.0 - abar_prev) * eps


def _apply(config: Config, teacher_config: Config, cond, w_emb):
  """(student(params) and teacher(params)) as model_fn(z, t) of the batch's condition."""
  student, teacher = make_model(config), make_model(teacher_config)
  student_fn = lambda params: lambda z, t: student.apply({"params": params}, z, t, cond, timestep_cond=w_emb)
  teacher_fn = lambda params: lambda z, t, c: teacher.apply({"params": params}, z, t, c)
  return student_fn, teacher_fn


def lcm_loss(params, target, teacher, batch: dict, rng: jax.Array, schedule: Schedule, *, config: Config,
             teacher_config: Config):
  dc, prediction = config.distill, config.diffusion.prediction
  x0 = batch["image"]
  b = x0.shape[0]
  k_n, k_noise, k_w = jax.random.split(rng, 3)
  grid = solver_timesteps(config.diffusion.num_timesteps, dc.skip_steps)
  t = grid[jax.random.randint(k_n, (b,), 0, grid.shape[0])]
  t_prev = jnp.maximum(t - dc.skip_steps, 0)
  w = jax.random.uniform(k_w, (b,), minval=dc.w_min, maxval=dc.w_max)
  cond = batch["tokens"] if config.model.context_dim else batch.get("label")
  student_fn, teacher_fn = _apply(config, teacher_config, cond, guidance_embedding(w, config.model.time_cond_proj_dim))
  z = diffusion.q_sample(schedule, x0, t, jax.random.normal(k_noise, x0.shape, jnp.float32))
  f = functools.partial(consistency_fn, schedule=schedule, prediction=prediction,
                        timestep_scaling=dc.timestep_scaling)
  guided = samplers.guided_model_fn(teacher_fn(teacher), guidance_scale=w, uncond=_null_condition(cond, config))
  z_prev = teacher_ddim_step(lambda z, t: guided(z, t, cond), z, t, t_prev, schedule, prediction=prediction)
  target_f = jax.lax.stop_gradient(f(student_fn(target), z_prev, t_prev))
  return jnp.mean(pseudo_huber(f(student_fn(params), z, t), target_f, dc.huber_c))


def lcm_step(state: DistillState, batch: dict, rng: jax.Array, schedule: Schedule, *, config: Config,
             teacher_config: Config):
  """(new state, metrics): the student's update; its EMA (training.ema_decay) is the target network."""
  loss, grads = jax.value_and_grad(lcm_loss)(state.params, state.ema_params, state.teacher, batch,
                                             jax.random.fold_in(rng, state.step), schedule, config=config,
                                             teacher_config=teacher_config)
  new, metrics = apply_gradients(state, loss, grads, config.training)
  return DistillState(step=new.step, params=new.params, ema_params=new.ema_params, opt_state=new.opt_state,
                      teacher=state.teacher), metrics


class LCMTrainer(DistillTrainer):
  """The distillation trainer's data, state and samples, with the consistency distillation step."""

  def __init__(self, config: Config, raw: dict, workdir: str, mesh, start_step: int, *, teacher_params,
               teacher_config: Config):
    super().__init__(config, raw, workdir, mesh, start_step, teacher_params=teacher_params)
    self.step = functools.partial(lcm_step, config=self.config, teacher_config=teacher_config)

  def _init_state(self, rng: jax.Array) -> DistillState:
    """The student: the teacher's params, and the new guidance projection (zero)."""
    fresh = traverse_util.flatten_dict(build.init_params(make_model(self.config), rng))
    teacher = traverse_util.flatten_dict(self._teacher_params)
    params = traverse_util.unflatten_dict({path: teacher.get(path, value) for path, value in fresh.items()})
    state = fresh_state(params, self.config.training)
    return DistillState(step=state.step, params=params, ema_params=params, opt_state=state.opt_state,
                        teacher=self._teacher_params)

  def describe(self, state) -> str:
    dc = self.config.distill
    return (f"consistency distillation of {dc.teacher} (skip {dc.skip_steps}, guidance {dc.w_min}..{dc.w_max}); "
            f"U-Net with {build.param_count(state.params):,} parameters")



def student_config(raw: dict, teacher_config: Config) -> dict:
  """The run's config as its checkpoints store it: the teacher's model sections with the guidance input, a frozen
  text encoder, the target network as the EMA, and sampling with 'lcm' at distill.steps and the teacher's guidance
  scale (an input of the student, not a second evaluation)."""
  raw = dict(raw)
  dc = parse_config(raw).distill
  for section in TEACHER_SECTIONS:
    raw[section] = _plain(dataclasses.asdict(getattr(teacher_config, section)))
  raw["model"]["time_cond_proj_dim"] = dc.guidance_embed_dim
  raw["text"]["trainable"] = False
  raw["distill"] = dict(raw["distill"], teacher=os.path.abspath(dc.teacher))
  raw["training"] = dict(raw.get("training", {}), ema_decay=dc.target_decay, ema_warmup=False)
  sampling = _plain(dataclasses.asdict(teacher_config.sampling))
  raw["sampling"] = {**sampling, **raw.get("sampling", {}), "sampler": "lcm", "steps": dc.steps}
  return raw
