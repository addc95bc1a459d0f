"""Distillation: progressive distillation's target against closed forms and jdiff's own DDIM sampler, and a round
of training on the tiny model."""
import json
import os
import shutil
import subprocess
import sys

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


def test_a_distillation_config_without_its_teacher_says_so_before_its_sections_disagree():
  from jdiff.config import ConfigError, parse_config
  from jdiff.configs import distill_digits, lcm_shapes
  for module in (distill_digits, lcm_shapes):  # their model and data sections are the teacher's, absent here
    with pytest.raises(ConfigError, match=r"^config\.distill\.teacher is not set: pass --config\.distill\.teacher="):
      parse_config(module.get_config())


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


# Two cases in the fast tier, the other step counts in the slow one (each step count compiles its loop).
LCM_CASES = [("cosine_v", 4), ("linear_eps_clip", 2)] + [
    pytest.param(case, steps, marks=pytest.mark.slow)
    for case, steps in [("cosine_v", 1), ("cosine_v", 2), ("cosine_v", 8), ("linear_eps_clip", 1),
                        ("linear_eps_clip", 4), ("linear_eps_clip", 8)]]


@pytest.mark.parametrize("case,steps", LCM_CASES)
def test_lcm_sampler_matches_diffusers_lcm_scheduler(case, steps):
  """Same timesteps, and the same samples from the same initial sample, model outputs and injected noise."""
  with open(os.path.join(LCM_FIXTURES, "cases.json")) as f:
    meta = json.load(f)
  config = meta["cases"][case]
  refs = np.load(os.path.join(LCM_FIXTURES, "references.npz"))
  schedule = schedulers.diffusers_schedule(dict(config, num_train_timesteps=meta["num_train_timesteps"]))
  spacing = samplers.LCMSpacing(original_steps=config["original_inference_steps"],
                                timestep_scaling=config["timestep_scaling"])
  denoise = samplers._denoiser(_stand_in_model, None, prediction=PREDICTIONS[config["prediction_type"]],
                               clip_x0=config["clip_sample"])
  ref = {key: refs[f"{case}/{steps}/{key}"] for key in ("timesteps", "sample", "noises", "final")}
  levels = spacing.levels(schedule, steps)
  np.testing.assert_array_equal(levels.ts, ref["timesteps"])
  x = jnp.asarray(ref["sample"]) * levels.init_scale
  out = samplers.lcm(denoise, x, samplers._steps(schedule, levels), noise=lambda i: jnp.asarray(ref["noises"])[i],
                     consistency=spacing) * levels.final_scale
  np.testing.assert_allclose(out, ref["final"], atol=1e-5, rtol=1e-5)


def test_lcm_timesteps_match_diffusers_for_every_step_count():
  with open(os.path.join(LCM_FIXTURES, "cases.json")) as f:
    meta = json.load(f)
  refs = np.load(os.path.join(LCM_FIXTURES, "references.npz"))
  for case, config in meta["cases"].items():
    for steps in meta["steps"]:
      np.testing.assert_array_equal(
          samplers.lcm_timesteps(num_timesteps=1000, steps=steps, original_steps=config["original_inference_steps"]),
          refs[f"{case}/{steps}/timesteps"])


def test_consistency_scalings_boundary_condition():
  c_skip, c_out = samplers.consistency_scalings(jnp.array([0.0, 1.0, 999.0]), 10.0)
  np.testing.assert_allclose(c_skip, [1.0, 0.25 / 100.25, 0.25 / (9990.0**2 + 0.25)], rtol=1e-6)
  np.testing.assert_allclose(c_out, [0.0, 10.0 / np.sqrt(100.25), 9990.0 / np.sqrt(9990.0**2 + 0.25)], rtol=1e-6)


# Training (slow tier): a tiny progressive distillation, two rounds of one step, on the tiny trained model.

def _distill_config(teacher: str, **distill):
  from jdiff.configs import distill_digits
  raw = distill_digits.get_config()
  raw.distill.update(teacher=teacher, **distill)
  raw.training.update(batch_size=8, log_every=1)
  raw.sampling.update(num_samples=4)
  return raw


@pytest.mark.slow
def test_tiny_progressive_rounds_hand_over_and_record_their_steps(tiny_workdir, tmp_path):
  import jdiff
  from jdiff import checkpoint
  from jdiff.train import train_and_evaluate
  raw = _distill_config(tiny_workdir, teacher_steps=4, steps=1, steps_per_round=1, guidance_scale=2.0)
  workdir = str(tmp_path / "distill")
  result = train_and_evaluate(raw, workdir)
  assert int(result.state.step) == 2
  assert sorted(checkpoint.make_manager(workdir, create=False).all_steps()) == [1, 2]
  first, last = jdiff.load(workdir, step=1), jdiff.load(workdir)
  assert (first.config.sampling.steps, last.config.sampling.steps) == (2, 1)  # 4 -> 2, then 2 -> 1
  assert (last.config.sampling.sampler, last.config.sampling.guidance_scale) == ("ddim", 1.0)
  assert last.config.distill.teacher == os.path.abspath(tiny_workdir)
  assert last.config.model == jdiff.load(tiny_workdir).config.model
  # Round 2's teacher is round 1's student (its EMA params), and training moved the student on from it.
  for a, b in zip(jax.tree_util.tree_leaves(result.state.teacher), jax.tree_util.tree_leaves(first.params)):
    np.testing.assert_array_equal(a, b)
  moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(result.state.params),
                                                          jax.tree_util.tree_leaves(first.params))]
  assert max(moved) > 0


# Real processes and LCM training: the slow tier.

def _run(program, *args):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return subprocess.run([sys.executable, os.path.join(root, program), *map(str, args)], capture_output=True,
                        text=True, cwd=root, timeout=600)


@pytest.mark.slow
def test_distillation_cli_resumes_in_its_round_and_sample_uses_the_distilled_steps(tiny_workdir, tmp_path):
  """Three rounds of two steps from the command line; with the last round's checkpoint removed, the same command
  resumes at the start of round 3 and ends at the same params; sample.py samples 1 step of DDIM by default."""
  import jdiff
  workdir = tmp_path / "distill"
  command = ["train.py", "--config", "configs/distill_digits.py", "--workdir", workdir,
             f"--config.distill.teacher={tiny_workdir}", "--config.distill.teacher_steps=8",
             "--config.distill.steps_per_round=2", "--config.training.batch_size=8", "--config.sampling.num_samples=4"]
  trained = _run(*command)
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert sorted(os.listdir(workdir / "checkpoints"), key=int) == ["2", "4", "6"]
  first = jdiff.load(str(workdir)).params
  shutil.rmtree(workdir / "checkpoints" / "6")
  resumed = _run(*command)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resuming from checkpoint at step 4" in resumed.stderr
  for a, b in zip(jax.tree_util.tree_leaves(first), jax.tree_util.tree_leaves(jdiff.load(str(workdir)).params)):
    np.testing.assert_array_equal(a, b)
  sampled = _run("sample.py", "--workdir", workdir, "--num", 4, "--out", tmp_path / "grid.png")
  assert sampled.returncode == 0, sampled.stderr[-3000:]
  missing = _run("train.py", "--config", "configs/distill_digits.py", "--workdir", tmp_path / "other")
  assert missing.returncode != 0 and "config.distill.teacher is not set" in missing.stderr
  assert not os.path.exists(tmp_path / "other" / "checkpoints")


@pytest.mark.slow
def test_lcm_distillation_of_the_tiny_text_model(text_workdir, tmp_path):
  """Consistency distillation runs on a text model; the student takes the guidance scale as an input (no second
  evaluation) and samples with 'lcm' at 1 and 4 steps; at step 0 it is the teacher (the new projection is zero)."""
  import jdiff
  from jdiff.configs import lcm_shapes
  from jdiff.train import lcm, train_and_evaluate
  raw = lcm_shapes.get_config()
  raw.distill.update(teacher=text_workdir, guidance_embed_dim=8)
  raw.training.update(batch_size=8, num_steps=2, checkpoint_every=2, log_every=1)
  raw.sampling.update(num_samples=4)
  workdir = str(tmp_path / "lcm")
  result = train_and_evaluate(raw, workdir)
  student, teacher = jdiff.load(workdir), jdiff.load(text_workdir)
  assert (student.config.sampling.sampler, student.config.sampling.steps) == ("lcm", 4)
  assert student.config.model.time_cond_proj_dim == 8 and not student.config.text.trainable
  assert student.config.sampling.guidance_scale == teacher.config.sampling.guidance_scale
  for steps in (1, 4):
    images = student.generate("a red circle", num=2, steps=steps).images
    assert images.shape == (2, *teacher.image_shape)
  assert float(jnp.max(jnp.abs(result.state.params["unet"]["time_embed"]["cond_proj"]["kernel"]))) > 0
  # The consistency function is the identity at t = 0 whatever the model says: c_skip 1, c_out 0.
  z = jax.random.normal(jax.random.key(0), (2, *teacher.noise_shape))
  f = lcm.consistency_fn(lambda z, t: 5.0 * z + 1.0, z, jnp.zeros(2, jnp.int32), student.schedule,
                         prediction="v", timestep_scaling=10.0)
  np.testing.assert_allclose(f, z, atol=1e-6)
