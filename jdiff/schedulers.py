"""Diffusers scheduler configs as jdiff schedules and sampler options: `sampler_options_from_diffusers`.

A diffusers pipeline directory ships scheduler/scheduler_config.json: the model's training schedule (beta_schedule,
beta_start, beta_end, num_train_timesteps, trained_betas, rescale_betas_zero_snr, prediction_type) and a scheduler
class with its sampling conventions (timestep_spacing, steps_offset, set_alpha_to_one, use_karras_sigmas,
final_sigmas_type, ...). This module maps both onto jdiff: the Schedule, and keyword arguments of
`samplers.sample` whose `spacing` is a `DiffusersLevels` rule giving that class's noise levels, timesteps,
first-step noise scale and final step. A model sampled with the options of its own config gives diffusers' outputs
(tests/test_schedulers.py runs every class against trajectories that diffusers wrote:
tests/fixtures/make_scheduler_fixtures.py).

    jdiff sampler     diffusers class
    ddim              DDIMScheduler (eta 0)
    ddpm              DDPMScheduler (variance_type fixed_small)
    plms              PNDMScheduler (skip_prk_steps: Stable Diffusion 1's default)
    euler             EulerDiscreteScheduler
    euler_ancestral   EulerAncestralDiscreteScheduler
    heun              HeunDiscreteScheduler
    lms               LMSDiscreteScheduler
    dpmpp_2m          DPMSolverMultistepScheduler (dpmsolver++, solver_order 2, midpoint)
    dpmpp_2m_sde      DPMSolverMultistepScheduler (sde-dpmsolver++, solver_order 2, midpoint)
    unipc             UniPCMultistepScheduler (bh2, solver_order 2 or 1)

Asking for a sampler of another class reads the config as that class's `from_config` does: the fields the class
has take the config's values, the others its defaults (so Stable Diffusion 1's PNDM config, which names no
timestep_spacing, gives Euler "linspace"), and the sampler's name sets DPM-Solver's algorithm_type. Two
deliberate departures: the schedule fields, rescale_betas_zero_snr included, always apply (diffusers' Heun, LMS and
PNDM lack that field and would drop it), and a class that cannot run the model's prediction in diffusers (PNDM
with "sample") still runs in jdiff. With rescale_betas_zero_snr, DDIM, DDPM and PNDM start from pure noise
(sigma infinite), while the Euler-type and multistep classes keep the last abar at 2^-24 (sigma 4096), as
diffusers does. A field whose value jdiff cannot reproduce raises ValueError naming it.

    config = json.load(open("sd-model/scheduler/scheduler_config.json"))
    schedule, options = sampler_options_from_diffusers(config)             # the config's own class
    schedule, options = sampler_options_from_diffusers(config, "dpmpp_2m")  # DPM-Solver++(2M) from that config
    latents = samplers.sample(model_fn, schedule, noise, cond, steps=25, rng=keys, **options)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from jdiff import samplers, schedules
from jdiff.schedules import Schedule

PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}

# Each class's defaults (diffusers 0.42) for the fields read here, past the schedule's own.
_SCHEDULE_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                          trained_betas=None, prediction_type="epsilon")
_KARRAS_DEFAULTS = dict(use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)
_THRESHOLD_DEFAULTS = dict(thresholding=False)
CLASS_DEFAULTS = {
    "DDIMScheduler": dict(clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True, steps_offset=0,
                          timestep_spacing="leading", rescale_betas_zero_snr=False, **_THRESHOLD_DEFAULTS),
    "DDPMScheduler": dict(variance_type="fixed_small", clip_sample=True, clip_sample_range=1.0,
                          timestep_spacing="leading", steps_offset=0, rescale_betas_zero_snr=False,
                          **_THRESHOLD_DEFAULTS),
    "PNDMScheduler": dict(skip_prk_steps=False, set_alpha_to_one=False, timestep_spacing="leading", steps_offset=0),
    "EulerDiscreteScheduler": dict(interpolation_type="linear", sigma_min=None, sigma_max=None,
                                   timestep_spacing="linspace", timestep_type="discrete", steps_offset=0,
                                   rescale_betas_zero_snr=False, final_sigmas_type="zero", **_KARRAS_DEFAULTS),
    "EulerAncestralDiscreteScheduler": dict(timestep_spacing="linspace", steps_offset=0, rescale_betas_zero_snr=False),
    "HeunDiscreteScheduler": dict(beta_start=0.00085, beta_end=0.012, clip_sample=False, clip_sample_range=1.0,
                                  timestep_spacing="linspace", steps_offset=0, **_KARRAS_DEFAULTS),
    "LMSDiscreteScheduler": dict(timestep_spacing="linspace", steps_offset=0, **_KARRAS_DEFAULTS),
    "DPMSolverMultistepScheduler": dict(
        solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint", lower_order_final=True,
        euler_at_final=False, use_lu_lambdas=False, use_flow_sigmas=False, final_sigmas_type="zero",
        lambda_min_clipped=-math.inf, variance_type=None, timestep_spacing="linspace", steps_offset=0,
        rescale_betas_zero_snr=False, use_dynamic_shifting=False, **_KARRAS_DEFAULTS, **_THRESHOLD_DEFAULTS),
    "UniPCMultistepScheduler": dict(
        solver_order=2, predict_x0=True, solver_type="bh2", lower_order_final=True, disable_corrector=[],
        use_flow_sigmas=False, timestep_spacing="linspace", steps_offset=0, final_sigmas_type="zero",
        rescale_betas_zero_snr=False, use_dynamic_shifting=False, sigma_min=None, sigma_max=None,
        **_KARRAS_DEFAULTS, **_THRESHOLD_DEFAULTS),
}
CLASS_OF_SAMPLER = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "plms": "PNDMScheduler",
                    "euler": "EulerDiscreteScheduler", "euler_ancestral": "EulerAncestralDiscreteScheduler",
                    "heun": "HeunDiscreteScheduler", "lms": "LMSDiscreteScheduler",
                    "dpmpp_2m": "DPMSolverMultistepScheduler", "dpmpp_2m_sde": "DPMSolverMultistepScheduler",
                    "unipc": "UniPCMultistepScheduler"}
# How each class lays out its levels (see DiffusersLevels.family).
_FAMILY = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddim", "PNDMScheduler": "ddim",
           "EulerDiscreteScheduler": "k", "EulerAncestralDiscreteScheduler": "k", "HeunDiscreteScheduler": "k",
           "LMSDiscreteScheduler": "k", "DPMSolverMultistepScheduler": "dpm", "UniPCMultistepScheduler": "dpm"}
_ALGORITHMS = {"dpmpp_2m": "dpmsolver++", "dpmpp_2m_sde": "sde-dpmsolver++"}
# Diffusers' Euler-type and multistep classes keep the rescaled schedule's last abar at 2^-24, not 0 (sigma 4096).
_ZERO_SNR_FLOOR = 2.0**-24


@dataclasses.dataclass(frozen=True)
class DiffusersLevels:
  """A diffusers scheduler class's noise levels for any step count: a `spacing` for jdiff's samplers.

  family: 'ddim' (DDIM, DDPM, PNDM: n rounded timesteps; noise and result in the variance-preserving scale),
    'k' (Euler, Euler ancestral, Heun, LMS: k-diffusion's form; float linspace timesteps with sigmas interpolated
    linearly in sigma; init_noise_sigma = sigma_max for linspace and trailing spacing, sqrt(sigma_max^2 + 1) for
    leading; the result in the variance-exploding scale) or 'dpm' (DPM-Solver, UniPC: n + 1 timesteps, the last
    dropped; variance-preserving).
  spacing, steps_offset: timestep_spacing and steps_offset. karras: use_karras_sigmas, over (karras_min,
    karras_max) where given (config sigma_min, sigma_max), else the spacing's own range ('k') or the schedule's
    ('dpm'); round_karras: Karras timesteps rounded to integers for the model (DPM-Solver, UniPC).
  final: where the last step lands: 'zero', 'sigma_min' (the schedule's first level, alphas_cumprod[0]) or
    'last_level' (UniPC's Karras sigma_min).
  stride: each step lands on t - T // steps (DDIM and PNDM), where alphas_cumprod exists, else on `final`.
  first_order_below: the last step is first order in runs of fewer steps than this (DPM-Solver's and UniPC's
    lower_order_final); order 1 makes every step first order.
  """
  family: str
  spacing: str
  steps_offset: int = 0
  karras: bool = False
  karras_min: float | None = None
  karras_max: float | None = None
  round_karras: bool = False
  final: str = "zero"
  stride: bool = False
  first_order_below: int = 0
  order: int = 2

  def timesteps(self, num_timesteps: int, steps: int) -> np.ndarray:
    """The class's descending timesteps (float for the 'k' family's linspace), by diffusers' formulas."""
    t, n = num_timesteps, steps
    if self.family == "dpm" and self.spacing != "trailing":
      ts = {"linspace": np.linspace(0, t - 1, n + 1).round(),
            "leading": (np.arange(n + 1) * (t // (n + 1))).round() + self.steps_offset}[self.spacing]
      return ts[::-1][:-1].astype(np.float64)
    if self.spacing == "linspace" and self.family == "k":
      return np.linspace(0, t - 1, n, dtype=np.float32)[::-1].astype(np.float64)
    if self.spacing == "linspace":
      return np.linspace(0, t - 1, n).round()[::-1]
    if self.spacing == "leading":
      return (np.arange(n) * (t // n)).round()[::-1].astype(np.float64) + self.steps_offset
    return np.round(np.arange(t, 0, -t / n)) - 1.0

  def levels(self, schedule: Schedule, steps: int) -> samplers.Levels:
    all_sigmas = schedule.sigmas
    ts = self.timesteps(schedule.num_timesteps, steps)
    if ts.min() < 0 or ts.max() > schedule.num_timesteps - 1:
      raise ValueError(f"{self.spacing} timesteps with steps_offset={self.steps_offset} and steps={steps} leave "
                       f"the schedule's 0..{schedule.num_timesteps - 1}: {ts.tolist()}")
    n = len(ts)
    if self.family == "k":  # diffusers interpolates sigma itself, linearly, at fractional timesteps
      sigmas = jnp.interp(jnp.asarray(ts, jnp.float32), jnp.arange(schedule.num_timesteps, dtype=jnp.float32),
                          all_sigmas)
    else:
      sigmas = all_sigmas[ts.astype(np.int32)]
    model_ts = jnp.asarray(ts, jnp.float32)
    if self.karras:
      lo, hi = (sigmas[-1], sigmas[0]) if self.family == "k" else (all_sigmas[0], all_sigmas[-1])
      lo = lo if self.karras_min is None else self.karras_min
      hi = hi if self.karras_max is None else self.karras_max
      sigmas = samplers.karras_sigmas(sigma_min=lo, sigma_max=hi, steps=n)
      model_ts = schedules.sigma_to_t(schedule, sigmas)
      model_ts = jnp.round(model_ts) if self.round_karras else model_ts
    final = {"zero": jnp.float32(0.0), "sigma_min": all_sigmas[0], "last_level": sigmas[-1]}[self.final]
    if self.stride:
      landing = ts.astype(np.int32) - schedule.num_timesteps // steps
      targets = jnp.where(landing >= 0, all_sigmas[np.maximum(landing, 0)], final)
    else:
      targets = jnp.concatenate([sigmas[1:], final[None]])
    multistep = (np.arange(n) > 0) & (self.order > 1)
    if n < self.first_order_below:
      multistep[-1] = False
    vp = jnp.sqrt(1.0 + sigmas[0] ** 2)
    if self.family == "k":
      init_scale, final_scale = (sigmas[0] if self.spacing in ("linspace", "trailing") else vp), jnp.float32(1.0)
    else:
      init_scale, final_scale = vp, 1.0 / jnp.sqrt(1.0 + targets[-1] ** 2)
    return samplers.Levels(sigmas=sigmas, ts=model_ts, targets=targets, multistep=jnp.asarray(multistep),
                           init_scale=init_scale, final_scale=final_scale)


def _unsupported(cls: str, field: str, value, fix: str) -> ValueError:
  return ValueError(f"scheduler config {field}={value!r} ({cls}) is not supported by jdiff: {fix}")


def _read(config: Mapping[str, Any], cls: str) -> dict:
  """The config as `cls.from_config(config)` sees it: cls's fields, the config's values where it has them."""
  fields = {**_SCHEDULE_DEFAULTS, **CLASS_DEFAULTS[cls]}
  return {k: config.get(k, default) for k, default in fields.items()}


def diffusers_betas(config: Mapping[str, Any]) -> np.ndarray:
  """The betas of a diffusers scheduler config (trained_betas, or beta_schedule over beta_start..beta_end)."""
  cfg = {**_SCHEDULE_DEFAULTS, **config}
  t = int(cfg["num_train_timesteps"])
  if cfg["trained_betas"] is not None:
    betas = np.asarray(cfg["trained_betas"], np.float64)
    if betas.shape != (t,):
      raise ValueError(f"scheduler config trained_betas holds {betas.size} values; num_train_timesteps={t}")
    return betas
  start, end = float(cfg["beta_start"]), float(cfg["beta_end"])
  if cfg["beta_schedule"] == "linear":
    return schedules.linear_betas(t, start, end)
  if cfg["beta_schedule"] == "scaled_linear":
    return schedules.scaled_linear_betas(t, start, end)
  if cfg["beta_schedule"] == "squaredcos_cap_v2":
    return schedules.cosine_betas(t)
  raise ValueError(f"scheduler config beta_schedule={cfg['beta_schedule']!r} is not supported by jdiff: choose "
                   "linear, scaled_linear or squaredcos_cap_v2, or give trained_betas")


def diffusers_schedule(config: Mapping[str, Any], *, zero_snr_floor: bool = False) -> Schedule:
  """The Schedule of a diffusers scheduler config; rescale_betas_zero_snr makes the last level pure noise, or,
  with zero_snr_floor, abar 2^-24 there as diffusers' Euler-type and multistep classes keep it."""
  betas = diffusers_betas(config)
  if not config.get("rescale_betas_zero_snr", False):
    return schedules.from_betas(betas)
  betas = schedules.rescale_zero_terminal_snr(betas)
  if zero_snr_floor:
    abar = np.cumprod(1.0 - betas[:-1])
    if abar[-1] <= _ZERO_SNR_FLOOR:
      raise ValueError(f"rescale_betas_zero_snr: the schedule's next-to-last abar {abar[-1]:.3g} is below "
                       "diffusers' floor of 2^-24 for the last one")
    betas[-1] = 1.0 - _ZERO_SNR_FLOOR / abar[-1]
  return schedules.from_betas(betas)


def _sampler_of(cls: str, config: Mapping[str, Any]) -> str:
  if cls == "DPMSolverMultistepScheduler" and config.get("algorithm_type") == "sde-dpmsolver++":
    return "dpmpp_2m_sde"
  return {c: s for s, c in CLASS_OF_SAMPLER.items() if s != "dpmpp_2m_sde"}[cls]


def _levels(cls: str, cfg: dict) -> DiffusersLevels:
  """The class's level rule, after checking the fields that shape it."""
  family = _FAMILY[cls]
  spacing = cfg["timestep_spacing"]
  if spacing not in ("leading", "trailing", "linspace"):
    raise _unsupported(cls, "timestep_spacing", spacing, "choose leading, trailing or linspace")
  for field in ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas",
                "use_dynamic_shifting"):
    if cfg.get(field):
      raise _unsupported(cls, field, cfg[field], "jdiff has Karras sigmas (use_karras_sigmas) or timestep spacings")
  rule = dict(family=family, spacing=spacing, steps_offset=int(cfg["steps_offset"]),
              karras=bool(cfg.get("use_karras_sigmas", False)))
  if rule["karras"]:
    if cls == "DPMSolverMultistepScheduler" and cfg["beta_schedule"] == "squaredcos_cap_v2":
      raise _unsupported(cls, "use_karras_sigmas", True, "with squaredcos_cap_v2 diffusers truncates the Karras "
                         "timesteps to repeated integers and loses its place among them; sample with 'unipc' or "
                         "'euler', or set use_karras_sigmas to false")
    rule.update(karras_min=cfg.get("sigma_min"), karras_max=cfg.get("sigma_max"), round_karras=family == "dpm")
  final = cfg.get("final_sigmas_type", "zero")
  if final not in ("zero", "sigma_min"):
    raise _unsupported(cls, "final_sigmas_type", final, "choose zero or sigma_min")
  if final == "sigma_min" and rule["karras"] and cls == "UniPCMultistepScheduler":
    final = "last_level"
  if cls in ("DDIMScheduler", "PNDMScheduler"):
    final, rule["stride"] = ("zero" if cfg["set_alpha_to_one"] else "sigma_min"), True
  rule["final"] = final
  if cls == "DPMSolverMultistepScheduler":
    rule["first_order_below"] = 2**31 if cfg["euler_at_final"] else 15 if cfg["lower_order_final"] else 0
  if cls == "UniPCMultistepScheduler":
    rule["first_order_below"] = 2**31 if cfg["lower_order_final"] else 0
  if "solver_order" in cfg:
    rule["order"] = int(cfg["solver_order"])
  return DiffusersLevels(**rule)


def _check_class_fields(cls: str, cfg: dict) -> None:
  """Raises for the fields, other than the levels', whose values jdiff does not reproduce."""
  if cfg.get("thresholding"):
    raise _unsupported(cls, "thresholding", True, "jdiff clips x0 to [-1, 1] (clip_x0) but has no dynamic "
                       "thresholding; set it to false")
  if cfg.get("clip_sample") and float(cfg["clip_sample_range"]) != 1.0:
    raise _unsupported(cls, "clip_sample_range", cfg["clip_sample_range"], "jdiff clips x0 to [-1, 1]; set it to 1")
  if cls == "DDIMScheduler" and cfg["clip_sample"]:
    raise _unsupported(cls, "clip_sample", True, "DDIM keeps the unclipped noise estimate after clipping x0, jdiff "
                       "rederives it from the clipped x0 as DDPM does; set clip_sample to false (right for latent "
                       "models) or sample with 'ddpm'")
  if cls == "DDPMScheduler" and cfg["variance_type"] != "fixed_small":
    raise _unsupported(cls, "variance_type", cfg["variance_type"], "jdiff's ddpm uses the posterior variance "
                       "(fixed_small)")
  if cls == "PNDMScheduler":
    if not cfg["skip_prk_steps"]:
      raise _unsupported(cls, "skip_prk_steps", False, "jdiff's plms starts with one averaged step as PNDM does "
                         "with skip_prk_steps true (Stable Diffusion's setting), not with Runge-Kutta steps")
    if cfg["timestep_spacing"] != "leading":
      raise _unsupported(cls, "timestep_spacing", cfg["timestep_spacing"], "PNDM steps to t - T // n, which only "
                         "leading timesteps always meet: use leading")
  if cls == "EulerDiscreteScheduler":
    for field, allowed in (("interpolation_type", "linear"), ("timestep_type", "discrete")):
      if cfg[field] != allowed:
        raise _unsupported(cls, field, cfg[field], f"use {allowed}")
  if cls == "DPMSolverMultistepScheduler":
    checks = (("solver_order", cfg["solver_order"] in (1, 2), "jdiff's DPM-Solver++ is of order 2 (or 1)"),
              ("solver_type", cfg["solver_type"] == "midpoint", "jdiff's DPM-Solver++(2M) is the midpoint form"),
              ("lambda_min_clipped", cfg["lambda_min_clipped"] == -math.inf, "leave it at -inf"),
              ("variance_type", cfg["variance_type"] is None, "jdiff's models predict no variance"))
    for field, ok, fix in checks:
      if not ok:
        raise _unsupported(cls, field, cfg[field], fix)
  if cls == "UniPCMultistepScheduler":
    checks = (("solver_order", cfg["solver_order"] in (1, 2), "jdiff's UniPC is of order 2 (or 1)"),
              ("solver_type", cfg["solver_type"] == "bh2", "jdiff's UniPC is bh2"),
              ("predict_x0", cfg["predict_x0"], "jdiff's UniPC works on the data prediction"),
              ("disable_corrector", not cfg["disable_corrector"], "jdiff corrects every step"))
    for field, ok, fix in checks:
      if not ok:
        raise _unsupported(cls, field, cfg[field], fix)


def sampler_options_from_diffusers(scheduler_config: Mapping[str, Any],
                                   sampler: str | None = None) -> tuple[Schedule, dict]:
  """(schedule, options) reproducing a diffusers scheduler: `samplers.sample(model_fn, schedule, noise,
  **options, steps=...)` (or Pipeline.generate with these options) follows what diffusers' pipeline does with this
  scheduler_config.json: the same levels, model timesteps, initial noise scale and final step.

  sampler: None for the config's own class (`_class_name`), or a jdiff sampler name, read with the corresponding
    class (see the module docstring). options: sampler, spacing (a DiffusersLevels), prediction, eta, clip_x0.
  """
  config = dict(scheduler_config)
  cls = config.get("_class_name")
  if sampler is None:
    if cls not in CLASS_DEFAULTS:
      raise ValueError(f"scheduler config _class_name={cls!r} has no jdiff sampler: jdiff follows "
                       f"{', '.join(sorted(CLASS_DEFAULTS))}; pass a sampler ({', '.join(samplers.SAMPLERS)})")
    sampler = _sampler_of(cls, config)
  elif sampler not in CLASS_OF_SAMPLER:
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(samplers.SAMPLERS)}")
  cls = CLASS_OF_SAMPLER[sampler]
  cfg = _read(config, cls)
  if sampler in _ALGORITHMS:
    cfg["algorithm_type"] = _ALGORITHMS[sampler]
  if cfg["prediction_type"] not in PREDICTIONS:
    raise ValueError(f"scheduler config prediction_type={cfg['prediction_type']!r} is not supported by jdiff: "
                     f"choose one of {', '.join(PREDICTIONS)}")
  prediction = PREDICTIONS[cfg["prediction_type"]]
  zero_snr = bool(config.get("rescale_betas_zero_snr", False))
  if zero_snr and prediction == "eps":
    raise ValueError("scheduler config rescale_betas_zero_snr=True with prediction_type='epsilon': at zero SNR the "
                     "noise prediction says nothing about the image; such a model predicts v (v_prediction)")
  _check_class_fields(cls, cfg)
  levels = _levels(cls, cfg)
  schedule = diffusers_schedule({**cfg, "rescale_betas_zero_snr": zero_snr}, zero_snr_floor=levels.family != "ddim")
  clip = bool(cfg.get("clip_sample", False)) if cls in ("DDPMScheduler", "HeunDiscreteScheduler") else False
  options = dict(sampler=sampler, spacing=levels, prediction=prediction,
                 eta=samplers.DEFAULT_ETA.get(sampler, 0.0), clip_x0=clip)
  return schedule, options


@dataclasses.dataclass(frozen=True)
class FlowMatchLevels:
  """diffusers' FlowMatchEulerDiscreteScheduler's levels for a flow model (jdiff/flow.py): a `spacing` for any of
  jdiff's samplers, and the levels of `flow_euler`.

  With num_train_timesteps T, shift a: sigma_max = 1 and sigma_min = shift(1 / T, a) (1 / T with dynamic
  shifting, which the scheduler leaves unshifted at construction); the n levels are linspace(sigma_max,
  sigma_min, n), shifted by a (or by exp(mu): the same formula with a = exp(mu)), and the run ends at 0. A static
  shift therefore reaches the last level twice shifted, as diffusers does. Levels are flow times s; jdiff's samplers
  read sigma = s / (1 - s).
  """
  shift: float = 1.0
  dynamic: bool = False
  num_train_timesteps: int = 1000

  def flow_sigmas(self, steps: int) -> np.ndarray:
    """The scheduler's `sigmas` (flow times s) of a run of `steps` steps, the terminal 0 included, in float32."""
    t = self.num_train_timesteps
    s_min = 1.0 / t if self.dynamic else self.shift / t / (1 + (self.shift - 1) / t)
    s_min = np.float32(s_min)  # the scheduler keeps sigma_min as a float32 tensor's item
    s = np.linspace(1.0 * t, float(s_min) * t, steps) / t
    s = (self.shift * s / (1 + (self.shift - 1) * s)).astype(np.float32)
    return np.append(s, np.float32(0.0))

  def levels(self, schedule: Schedule, steps: int) -> samplers.Levels:
    s = jnp.asarray(self.flow_sigmas(steps))
    with np.errstate(divide="ignore"):
      sigmas = jnp.where(s[:-1] < 1.0, s[:-1] / (1.0 - s[:-1]), jnp.inf)
    targets = jnp.concatenate([sigmas[1:], jnp.zeros(1)])
    return samplers.Levels(sigmas=sigmas, ts=s[:-1] * self.num_train_timesteps, targets=targets,
                           multistep=jnp.arange(steps) > 0, init_scale=1.0 + sigmas[0], final_scale=jnp.float32(1.0))
