"""Diffusers scheduler configs mapped onto jdiff's samplers, checked against what diffusers' schedulers did.

tests/fixtures/make_scheduler_fixtures.py ran each case (a scheduler_config.json, a scheduler class, a step
count) in diffusers with an exact Gaussian denoiser as the model; jdiff runs the same model through
sampler_options_from_diffusers's schedule and options, from the same latents and step noise.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import samplers, schedulers

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "schedulers")
with open(os.path.join(FIXTURES, "cases.json")) as _f:
  SPEC = json.load(_f)
DATA = np.load(os.path.join(FIXTURES, "outputs.npz"))
CASES = {case["name"]: case for case in SPEC["cases"]}
SD1, SD2 = CASES["sd1_own"]["config"], CASES["sd2_own"]["config"]


def _gaussian_model(prediction):
  """The fixtures' model in JAX: the exact denoiser of x0 ~ N(mean, cov) over the channels of each pixel, in the
  variance-preserving scale, at log sigma interpolated linearly between timesteps; cond is the log sigma table."""
  lam, u = (jnp.asarray(a, jnp.float32) for a in np.linalg.eigh(DATA["cov"]))
  mean = jnp.asarray(DATA["mean"], jnp.float32)

  def model_fn(x_t, t, log_sigmas):
    low = jnp.minimum(jnp.floor(t), log_sigmas.shape[0] - 2).astype(jnp.int32)
    w = t - low
    log_sigma = jnp.where(w == 0, log_sigmas[low], log_sigmas[low] + w * (log_sigmas[low + 1] - log_sigmas[low]))
    abar = (1.0 / (1.0 + jnp.exp(2.0 * log_sigma)))[:, None, None, None]
    gain = jnp.sqrt(abar) * lam / (abar * lam + 1.0 - abar)
    x0 = mean + ((x_t - jnp.sqrt(abar) * mean) @ u * gain) @ u.T
    eps = (x_t - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)
    return {"eps": eps, "x0": x0, "v": jnp.sqrt(abar) * eps - jnp.sqrt(1.0 - abar) * x0}[prediction]
  return model_fn


MODELS = {p: _gaussian_model(p) for p in ("eps", "v", "x0")}
# One program per sampler, prediction, clipping and step count, whatever the levels: they are an argument.
run_levels = jax.jit(samplers.sample_levels, static_argnums=0,
                     static_argnames=("sampler", "prediction", "clip_x0", "eta"))


def case_inputs(name):
  """(schedule, options, model log sigma table, rng keys) of a case."""
  case = CASES[name]
  schedule, options = schedulers.sampler_options_from_diffusers(case["config"], case["sampler"])
  abar = DATA["alphas_cumprod"][int(DATA[f"{name}/table"])]
  with np.errstate(divide="ignore"):
    log_sigmas = jnp.asarray(0.5 * (np.log1p(-abar) - np.log(abar)), jnp.float32)
  return schedule, options, log_sigmas, samplers.keys_from_seeds(np.array(SPEC["seeds"]))


def run_case(name):
  """(jdiff's final latents, diffusers', the levels' timesteps, the timesteps diffusers called the model at)."""
  schedule, options, log_sigmas, keys = case_inputs(name)
  levels = options["spacing"].levels(schedule, CASES[name]["steps"])
  out = run_levels(MODELS[options["prediction"]], schedule, levels, DATA["latents"], log_sigmas,
                   rng=keys if options["eta"] else None, **{k: v for k, v in options.items() if k != "spacing"})
  called = DATA[f"{name}/called"]
  called = called[np.append(True, np.diff(called) != 0)]  # Heun and PNDM call the model twice at some levels
  return np.asarray(out), DATA[f"{name}/final"], np.asarray(levels.ts), called


def test_fixture_noise_is_jdiffs():
  keys = samplers.keys_from_seeds(np.array(SPEC["seeds"]))
  noise = samplers._step_noise(keys, tuple(SPEC["shape"]))
  # The same draws up to the last bit, which XLA's optimisation level (-O0 in the test suite) may change.
  np.testing.assert_allclose(samplers.noise_from_seeds(np.array(SPEC["seeds"]), SPEC["shape"][1:]),
                             DATA["latents"], rtol=1e-6, atol=1e-6)
  for i in (0, len(DATA["step_noise"]) - 1):
    np.testing.assert_allclose(noise(i), DATA["step_noise"][i], rtol=1e-6, atol=1e-6)


# Largest |jdiff - diffusers| allowed. Diffusers computes its schedule in float32 (Stable Diffusion's smallest sigma
# is 1.3e-5 off), jdiff in float64; the rest is float32 rounding.
TOLERANCE = 2e-5
LOOSER = {
    # Diffusers' Euler step from sigma 4096 (its zero-SNR floor) adds a multiple of 4096 and takes it away again.
    "zero_snr_euler": 1e-4,
    # Both libraries turn an eps prediction into x0 at abar 2.4e-9 (squaredcos_cap_v2's last step): in float32
    # that division keeps 3 digits.
    "cosine_dpmpp_2m": 2e-3,
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_diffusers(name):
  out, want, ts, called = run_case(name)
  np.testing.assert_allclose(ts, called, atol=2e-3, rtol=0)
  err = float(np.max(np.abs(out - want)))
  print(f"{name}: max |jdiff - diffusers| {err:.2e}")
  assert err < LOOSER.get(name, TOLERANCE), err


@pytest.mark.parametrize("name", ["sd1_own", "sd2_own"])
def test_sample_with_the_options_runs_the_same_levels(name):
  """samplers.sample(**options) (what a pipeline calls) is the levels' run."""
  schedule, options, log_sigmas, keys = case_inputs(name)
  out = samplers.sample(MODELS[options["prediction"]], schedule, DATA["latents"], log_sigmas,
                        steps=CASES[name]["steps"], rng=keys, **options)
  np.testing.assert_allclose(out, run_case(name)[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("changes, sampler, message", [
    ({"_class_name": "KDPM2DiscreteScheduler"}, None, r"_class_name='KDPM2DiscreteScheduler' has no jdiff sampler"),
    ({}, "dpm_fast", r"unknown sampler 'dpm_fast'"),
    ({"beta_schedule": "sigmoid"}, "ddim", r"beta_schedule='sigmoid'"),
    ({"trained_betas": [0.1, 0.2]}, "ddim", r"trained_betas holds 2 values; num_train_timesteps=1000"),
    ({"prediction_type": "flow_prediction"}, "euler", r"prediction_type='flow_prediction'"),
    ({"rescale_betas_zero_snr": True}, "ddim", r"rescale_betas_zero_snr=True with prediction_type='epsilon'"),
    ({"timestep_spacing": "uniform"}, "euler", r"timestep_spacing='uniform' \(EulerDiscreteScheduler\)"),
    ({"thresholding": True}, "ddim", r"thresholding=True \(DDIMScheduler\).*dynamic thresholding"),
    ({"clip_sample": True}, "ddim", r"clip_sample=True \(DDIMScheduler\).*sample with 'ddpm'"),
    ({"clip_sample": True, "clip_sample_range": 2.0}, "ddpm", r"clip_sample_range=2.0"),
    ({"variance_type": "fixed_large"}, "ddpm", r"variance_type='fixed_large'"),
    ({"skip_prk_steps": False}, "plms", r"skip_prk_steps=False.*Runge-Kutta"),
    ({"timestep_spacing": "trailing"}, "plms", r"timestep_spacing='trailing' \(PNDMScheduler\).*use leading"),
    ({"timestep_type": "continuous"}, "euler", r"timestep_type='continuous'"),
    ({"use_exponential_sigmas": True}, "euler", r"use_exponential_sigmas=True.*Karras"),
    ({"solver_order": 3}, "dpmpp_2m", r"solver_order=3 \(DPMSolverMultistepScheduler\)"),
    ({"solver_type": "heun"}, "dpmpp_2m", r"solver_type='heun'"),
    ({"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True}, "dpmpp_2m", r"truncates the Karras"),
    ({"disable_corrector": [0]}, "unipc", r"disable_corrector=\[0\]"),
])
def test_what_jdiff_cannot_reproduce_is_named(changes, sampler, message):
  with pytest.raises(ValueError, match=message):
    schedulers.sampler_options_from_diffusers({**SD1, **changes}, sampler)


def test_config_reading_follows_from_config():
  """Fields a class lacks take its defaults, fields it has the config's; the schedule fields always apply."""
  _, euler = schedulers.sampler_options_from_diffusers(SD1, "euler")  # SD1 names no timestep_spacing
  assert (euler["spacing"].spacing, euler["spacing"].steps_offset) == ("linspace", 1)
  _, plms = schedulers.sampler_options_from_diffusers(SD1)
  assert (plms["sampler"], plms["spacing"].spacing, plms["spacing"].final) == ("plms", "leading", "sigma_min")
  _, sde = schedulers.sampler_options_from_diffusers({**SD1, "_class_name": "DPMSolverMultistepScheduler",
                                                       "algorithm_type": "sde-dpmsolver++"})
  assert (sde["sampler"], sde["eta"]) == ("dpmpp_2m_sde", 1.0)
  named, _ = schedulers.sampler_options_from_diffusers({**SD1, "trained_betas": list(
      schedulers.diffusers_betas(SD1))}, "heun")
  np.testing.assert_array_equal(named.sigmas, schedulers.sampler_options_from_diffusers(SD1, "heun")[0].sigmas)
  zero, options = schedulers.sampler_options_from_diffusers({**SD2, "rescale_betas_zero_snr": True}, "heun")
  assert float(zero.alphas_cumprod[-1]) == np.float32(2.0**-24) and options["prediction"] == "v"
