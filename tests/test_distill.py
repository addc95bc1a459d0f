"""Distillation: progressive distillation's target against closed forms and jdiff's own DDIM sampler, and a round
of training on the tiny model."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import samplers, schedulers, schedules
from jdiff.train import distill
from tests.exact_denoisers import gaussian_vp_model_fn

SCHEDULE = schedules.make_schedule("cosine", 1000)
MEAN, COV = np.array([0.3, -0.2]), np.array([[0.5, 0.1], [0.1, 0.2]])


def _x0_of(model_fn):
  """denoise(z, t) -> x0 of an x0-predicting model_fn, as the target takes it."""
  return lambda z, t: model_fn(z, t.astype(jnp.float32), None)


def test_trailing_timesteps_match_the_samplers():
  for n in (1, 2, 8, 64, 128):
    expected = samplers.timesteps(num_timesteps=1000, steps=n, spacing="trailing")
    np.testing.assert_array_equal(distill.trailing_timesteps(jnp.arange(n), n, 1000), expected)
    assert int(distill.trailing_timesteps(n, n, 1000)) == -1  # the data


def test_target_of_a_point_mass_is_the_point():
  point = jnp.array([0.4, -0.7])
  z = jax.random.normal(jax.random.key(0), (5, 2))
  t, t_mid, t_end = jnp.full(5, 999), jnp.full(5, 874), jnp.array([749, 749, 0, -1, -1])
  target = distill.progressive_target(lambda z, t: jnp.broadcast_to(point, z.shape), z, t, t_mid, t_end, SCHEDULE)
  np.testing.assert_allclose(target, jnp.broadcast_to(point, (5, 2)), atol=1e-5)


def test_student_sampling_on_the_target_is_the_teacher_at_twice_the_steps():
  """A student whose x0 is the target at every one of its n DDIM steps (jdiff's sampler) lands exactly where the
  teacher's 2n DDIM steps land."""
  n = 4
  teacher = gaussian_vp_model_fn(SCHEDULE, "x0", mean=MEAN, cov=COV)

  def student(z, t, cond):
    i = jnp.round((1000 - 1 - t) * n / 1000).astype(jnp.int32)
    t_mid, t_end = (distill.trailing_timesteps(2 * i + k, 2 * n, 1000) for k in (1, 2))
    return distill.progressive_target(_x0_of(teacher), z, t.astype(jnp.int32), t_mid, t_end, SCHEDULE)

  noise = jax.random.normal(jax.random.key(1), (6, 2))
  options = dict(sampler="ddim", prediction="x0", clip_x0=False, spacing="trailing")
  ours = samplers.sample(student, SCHEDULE, noise, steps=n, **options)
  np.testing.assert_allclose(ours, samplers.sample(teacher, SCHEDULE, noise, steps=2 * n, **options), atol=2e-5)
  # And it is not what the teacher's own n steps give.
  assert float(jnp.max(jnp.abs(ours - samplers.sample(teacher, SCHEDULE, noise, steps=n, **options)))) > 1e-3


def test_weightings():
  t = jnp.array([0, 500, 999])
  snr = jnp.exp(SCHEDULE.log_snr[t])
  np.testing.assert_allclose(distill.x0_weight(SCHEDULE, t, "snr+1"), snr + 1, rtol=1e-6)
  np.testing.assert_allclose(distill.x0_weight(SCHEDULE, t, "truncated_snr"), jnp.maximum(snr, 1), rtol=1e-6)


def test_student_steps_of_each_round():
  from jdiff.config import DistillConfig
  dc = DistillConfig(teacher="t", teacher_steps=64, steps=4, steps_per_round=10)
  assert dc.rounds == 4
  assert [dc.student_steps(s) for s in (0, 1, 10, 11, 20, 30, 31, 40)] == [32, 32, 32, 16, 16, 8, 4, 4]


# The 'lcm' sampler against diffusers' LCMScheduler (tests/fixtures/make_lcm_fixtures.py).

LCM_FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "lcm")
PREDICTIONS = {"v_prediction": "v", "epsilon": "eps", "sample": "x0"}


def _stand_in_model(x_t, t, cond):
  """make_lcm_fixtures.py's model_output, on NHWC arrays."""
  channel = jnp.arange(x_t.shape[-1], dtype=jnp.float32)
  return 0.6 * x_t + 0.3 * jnp.sin(t.reshape(-1, 1, 1, 1) / 150.0 + channel)


@pytest.mark.parametrize("case", ["cosine_v", "linear_eps_clip"])
def test_lcm_sampler_matches_diffusers_lcm_scheduler(case):
  with open(os.path.join(LCM_FIXTURES, "cases.json")) as f:
    meta = json.load(f)
  config = meta["cases"][case]
  refs = np.load(os.path.join(LCM_FIXTURES, "references.npz"))
  schedule = schedulers.diffusers_schedule(dict(config, num_train_timesteps=meta["num_train_timesteps"]))
  spacing = samplers.LCMSpacing(original_steps=config["original_inference_steps"],
                                timestep_scaling=config["timestep_scaling"])
  denoise = samplers._denoiser(_stand_in_model, None, prediction=PREDICTIONS[config["prediction_type"]],
                               clip_x0=config["clip_sample"])
  for steps in meta["steps"]:
    ref = {key: refs[f"{case}/{steps}/{key}"] for key in ("timesteps", "sample", "noises", "final")}
    levels = spacing.levels(schedule, steps)
    np.testing.assert_array_equal(levels.ts, ref["timesteps"])
    np.testing.assert_array_equal(samplers.lcm_timesteps(num_timesteps=1000, steps=steps,
                                                         original_steps=spacing.original_steps), ref["timesteps"])
    x = jnp.asarray(ref["sample"]) * levels.init_scale
    out = samplers.lcm(denoise, x, samplers._steps(schedule, levels), noise=lambda i: jnp.asarray(ref["noises"])[i],
                       consistency=spacing) * levels.final_scale
    np.testing.assert_allclose(out, ref["final"], atol=1e-5, rtol=1e-5)


def test_consistency_scalings_boundary_condition():
  c_skip, c_out = samplers.consistency_scalings(jnp.array([0.0, 1.0, 999.0]), 10.0)
  np.testing.assert_allclose(c_skip, [1.0, 0.25 / 100.25, 0.25 / (9990.0**2 + 0.25)], rtol=1e-6)
  np.testing.assert_allclose(c_out, [0.0, 10.0 / np.sqrt(100.25), 9990.0 / np.sqrt(9990.0**2 + 0.25)], rtol=1e-6)
