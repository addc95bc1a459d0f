"""Flow matching: the forward process, densities and shifts, diffusers' FlowMatchEuler parity (fixtures written by
tests/fixtures/make_flow_fixtures.py), exact Gaussian flow models on every sampler, and the config's checks."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import exact_denoisers as ed
from jdiff import flow, samplers, schedulers
from jdiff.config import ConfigError, parse_config

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "flow")
MEAN = np.array([0.4, -0.3, 0.1])
VAR = np.array([0.5, 0.05, 1.2])
SCHEDULE = flow.flow_schedule(1000)


@pytest.fixture(scope="module")
def fixtures():
  with open(os.path.join(FIXTURES, "cases.json")) as f:
    cases = json.load(f)
  return cases, dict(np.load(os.path.join(FIXTURES, "outputs.npz")))


def _rule(case, mus) -> schedulers.FlowMatchLevels:
  config = case["config"]
  if config.get("use_dynamic_shifting"):
    return schedulers.FlowMatchLevels(shift=float(np.exp(mus[case["seq_len"]])), dynamic=True)
  return schedulers.FlowMatchLevels(shift=config.get("shift", 1.0))


def test_levels_shift_and_forward_process_match_diffusers(fixtures):
  cases, arrays = fixtures
  mus = dict(zip(cases["seq_lens"], arrays["mu"]))
  for seq_len, mu in mus.items():
    assert flow.resolution_mu(seq_len) == pytest.approx(mu, abs=1e-12)
  for case in cases["cases"]:
    s = _rule(case, mus).flow_sigmas(case["steps"])
    np.testing.assert_allclose(s, arrays[f"{case['name']}/sigmas"], atol=1e-6, err_msg=case["name"])
    np.testing.assert_allclose(s[:-1] * 1000, arrays[f"{case['name']}/timesteps"], atol=1e-3)
  s = arrays["scale_noise/sigmas"].reshape(-1, 1, 1, 1)
  np.testing.assert_allclose(flow.interpolate(arrays["scale_noise/x0"], arrays["noise"], s),
                             arrays["scale_noise/out"], atol=1e-6)


def test_flow_euler_steps_match_diffusers(fixtures):
  """Every step of every case, each taken by jdiff from jdiff's own previous step through the compiled loop: a run
  of one level from s to s_next whose noise is x_s (init_scale 1 + sigma) and whose result is x_s_next."""
  cases, arrays = fixtures
  mus = dict(zip(cases["seq_lens"], arrays["mu"]))
  model = ed.gaussian_flow_model_fn(mean=np.array(cases["mean"]), var=np.array(cases["var"]))

  @jax.jit
  def step(x_s, sigma, sigma_next):
    levels = samplers.Levels(sigmas=sigma[None], ts=jnp.zeros(1), targets=sigma_next[None],
                             multistep=jnp.zeros(1, bool), init_scale=1.0 + sigma,
                             final_scale=1.0 / (1.0 + sigma_next))
    return samplers.sample_levels(model, SCHEDULE, levels, x_s, sampler="flow_euler", prediction="flow",
                                  clip_x0=False)

  for case in cases["cases"]:
    s = _rule(case, mus).flow_sigmas(case["steps"]).astype(np.float64)
    sigmas = np.where(s < 1, s / np.maximum(1 - s, 1e-30), np.inf).astype(np.float32)
    x = jnp.asarray(arrays["noise"])
    for i, expected in enumerate(arrays[f"{case['name']}/trajectory"]):
      x = step(x, sigmas[i], sigmas[i + 1])
      np.testing.assert_allclose(x, expected, atol=1e-5, err_msg=f"{case['name']} step {i}")
    if case["name"] == "sd3_shift_3_10":  # and once through `sample` with the rule's levels
      whole = samplers.sample(model, SCHEDULE, jnp.asarray(arrays["noise"]), sampler="flow_euler",
                              steps=case["steps"], prediction="flow", spacing=_rule(case, mus), clip_x0=False)
      np.testing.assert_allclose(whole, expected, atol=1e-5, err_msg=case["name"])


def test_shift_formula_and_resolution_shift():
  s = np.linspace(0.0, 1.0, 11)
  np.testing.assert_allclose(flow.shift(flow.shift(s, 3.0), 1 / 3.0), s, atol=1e-12)
  np.testing.assert_allclose(flow.shift(s, 3.0), np.exp(np.log(3)) / (3 + 1 / np.maximum(s, 1e-300) - 1), atol=1e-12)
  assert np.all(flow.shift(s[1:-1], 3.0) > s[1:-1]) and np.all(flow.shift(s[1:-1], 0.5) < s[1:-1])
  # Flux's defaults: mu 0.5 at 256 tokens (a 256^2 image's 32^2 latents in 2x2 patches), 1.15 at 4096.
  assert flow.resolution_shift(32) == pytest.approx(np.exp(0.5))
  assert flow.resolution_shift(128) == pytest.approx(np.exp(1.15))


def test_training_densities():
  n = 20_000
  draws = jax.jit(lambda key: [flow.draw_s(key, (n,), density="uniform"),
                               flow.draw_s(key, (n,), density="logit_normal", logit_mean=0.5, logit_std=0.8),
                               flow.draw_s(key, (n,), density="mode", mode_scale=1.29)])
  u, s, m = (np.asarray(d, np.float64) for d in draws(jax.random.key(0)))
  u = np.sort(u)
  assert np.max(np.abs(u - (np.arange(n) + 0.5) / n)) < 0.01  # Kolmogorov-Smirnov distance to U(0, 1)
  logit = np.log(s / (1 - s))
  assert abs(logit.mean() - 0.5) < 0.02 and abs(logit.std() - 0.8) < 0.02
  # Kolmogorov-Smirnov distance of the logits to N(0.5, 0.8^2).
  normal_cdf = np.array([0.5 * (1 + math.erf((x - 0.5) / (0.8 * math.sqrt(2)))) for x in np.sort(logit)])
  assert np.max(np.abs(normal_cdf - (np.arange(n) + 0.5) / n)) < 0.015
  # The mode density is a decreasing map f of u ~ U(0, 1): P(s <= f(u0)) = 1 - u0.
  for u0 in (0.1, 0.3, 0.5, 0.8):
    f = 1 - u0 - 1.29 * (np.cos(np.pi * u0 / 2) ** 2 - 1 + u0)
    assert np.mean(m <= f) == pytest.approx(1 - u0, abs=0.01)
  assert m.min() >= 0 and m.max() <= 1


def test_flow_denoiser_is_the_gaussian_posterior_mean():
  """x0 = x_s - s v with x_s = x / (1 + sigma) is E[x0 | x] on jdiff's sigma scale, at finite and infinite sigma."""
  model = ed.gaussian_flow_model_fn(mean=MEAN, var=VAR)
  denoise = jax.jit(samplers._denoiser(model, None, prediction="flow", clip_x0=False, num_timesteps=1000))
  x = np.asarray(jax.random.normal(jax.random.key(1), (8, 3))) * 3
  for sigma in (0.05, 1.0, 30.0):
    x0, d = denoise(jnp.asarray(x), jnp.float32(sigma), jnp.float32(0))
    expected = ed.gaussian_x0(x, np.full((8, 1), sigma), mean=MEAN, cov=np.diag(VAR))
    np.testing.assert_allclose(x0, expected, atol=2e-5)
    np.testing.assert_allclose(d, (x - expected) / sigma, atol=2e-5)
  x0, d = denoise(jnp.asarray(x), jnp.float32(np.inf), jnp.float32(0))
  np.testing.assert_allclose(x0, np.broadcast_to(MEAN, x.shape), atol=1e-6)
  np.testing.assert_allclose(d, x, atol=1e-6)  # pure noise: x is x_s = eps itself


# Convergence order on the exact Gaussian flow model, from pure noise over FlowMatchEuler's levels: the slope of
# log error against log steps, fitted over 10..80 steps (measured: flow_euler -1.01 and heun -1.94 at shifts 1 and 3,
# dpmpp_2m -1.93 at shift 1; at shift 3 its levels crowd near s = 1 and 80 steps are short of the asymptote).
STEPS = (10, 20, 40, 80)
ORDERS = {("flow_euler", 1.0): 1, ("flow_euler", 3.0): 1, ("heun", 1.0): 2, ("heun", 3.0): 2, ("dpmpp_2m", 1.0): 2}
FAST = (("flow_euler", 1.0), ("dpmpp_2m", 1.0))


@pytest.mark.parametrize("sampler,shift", [c if c in FAST else pytest.param(*c, marks=pytest.mark.slow)
                                           for c in ORDERS])
def test_convergence_order(sampler, shift):
  model = ed.gaussian_flow_model_fn(mean=MEAN, var=VAR)
  rule = schedulers.FlowMatchLevels(shift=shift)
  noise = jax.random.normal(jax.random.key(6), (64, 3))
  outs = jax.jit(lambda z: [samplers.sample(model, SCHEDULE, z, sampler=sampler, steps=n, prediction="flow",
                                            spacing=rule, clip_x0=False) for n in STEPS])(noise)
  errors = []
  for n, out in zip(STEPS, outs):
    s_min = float(rule.flow_sigmas(n)[-2])
    sigma = s_min / (1 - s_min)
    # The ODE from pure noise z: x = mean + sqrt(var + sigma^2) z; the last step lands on E[x0 | x] at s_min.
    x = MEAN + np.sqrt(VAR + sigma**2) * np.asarray(noise, np.float64)
    exact = MEAN + VAR / (VAR + sigma**2) * (x - MEAN)
    errors.append(np.sqrt(np.mean((np.asarray(out, np.float64) - exact) ** 2)))
  slope = np.polyfit(np.log(STEPS), np.log(errors), 1)[0]
  print(f"{sampler} shift {shift}: errors {np.round(errors, 7)}, slope {slope:.3f}")
  assert -ORDERS[sampler, shift] - 0.15 < slope < -ORDERS[sampler, shift] + 0.15, (errors, slope)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ddim", "unipc", "lms", "plms", "euler_ancestral"])
def test_every_sampler_samples_the_gaussian(sampler):
  """Any sampler on a flow model, here over the flow schedule's own trailing timesteps: 100 steps reach the data's
  mean and variance to within the sampling error of 4,000 draws."""
  model = ed.gaussian_flow_model_fn(mean=MEAN, var=VAR)
  noise = jax.random.normal(jax.random.key(2), (4000, 3))
  out = np.asarray(samplers.sample(model, SCHEDULE, noise, sampler=sampler, steps=100, prediction="flow",
                                   spacing="trailing", clip_x0=False, rng=jax.random.key(3)))
  np.testing.assert_allclose(out.mean(0), MEAN, atol=0.06)
  np.testing.assert_allclose(out.var(0), VAR, rtol=0.12)


def test_flow_schedule_levels():
  sched = flow.flow_schedule(1000, 3.0)
  s = np.asarray(sched.sigmas[:-1] / (1 + sched.sigmas[:-1]))
  np.testing.assert_allclose(s, flow.shift(np.arange(1, 1000) / 1000, 3.0), rtol=1e-5)
  assert np.isinf(sched.sigmas[-1]) and float(sched.alphas_cumprod[-1]) == 0.0


def _raw(**diffusion):
  from jdiff.configs import tiny
  raw = tiny.get_config()
  raw.diffusion = dict(num_timesteps=1000, prediction="flow", **diffusion)
  return raw


@pytest.mark.parametrize("fields,message", [
    (dict(flow_density="normal"), "flow_density='normal' is not allowed: must be one of uniform, logit_normal, mode"),
    (dict(flow_shift=0.0), "flow_shift=0.0 is not allowed"),
    (dict(flow_shift=3.0, flow_resolution_shift=True), "flow_shift=3.0 is not allowed: must be 1.0 with "
                                                        "flow_resolution_shift=True"),
    (dict(flow_mode_scale=2.0), "flow_mode_scale=2.0 is not allowed"),
    (dict(min_snr_gamma=5.0), "min_snr_gamma=5.0 is not allowed: must be 0 with prediction 'flow'"),
    (dict(flow_shfit=3.0), "unknown config field config.diffusion.flow_shfit (did you mean "
                           "diffusion.flow_shift?)"),
])
def test_bad_flow_config_is_named(fields, message):
  with pytest.raises(ConfigError) as err:
    parse_config(_raw(**fields))
  assert message in str(err.value)


def test_flow_config_shift_and_spacing():
  config = parse_config(_raw(flow_resolution_shift=True))
  assert config.diffusion.flow_shift_for(16) == pytest.approx(np.exp(flow.resolution_mu(64)))
  raw = _raw()
  raw.diffusion.prediction = "v"
  raw.sampling.spacing = "flow"
  with pytest.raises(ConfigError, match="spacing='flow' is for flow models"):
    parse_config(raw)


@pytest.mark.slow
def test_flow_model_trains_and_samples_with_any_sampler(tmp_path, capsys):
  """The tiny config as a flow model, 10 steps through the one loop; its config's defaults (flow_euler over the
  'flow' levels) drive sampling, flow_euler lands where DDIM does, and sample.py runs it with another sampler."""
  import jdiff
  from jdiff.cli import sample as sample_cli
  from jdiff.configs import tiny
  from jdiff.train import train_and_evaluate
  raw = _raw(flow_shift=2.0)
  raw.training.num_steps = 10
  raw.sampling.sampler, raw.sampling.spacing = "flow_euler", "flow"
  workdir = str(tmp_path / "run")
  train_and_evaluate(raw, workdir)
  pipe = jdiff.load(workdir)
  assert pipe.config.diffusion.prediction == "flow" and float(pipe.schedule.sigmas[-1]) == np.inf
  default = pipe.generate(num=4, label=3, steps=4)
  euler = pipe.generate(num=4, label=3, steps=4, sampler="flow_euler", spacing="flow")
  ddim = pipe.generate(num=4, label=3, steps=4, sampler="ddim", spacing="flow")
  np.testing.assert_array_equal(default.images, euler.images)
  assert np.max(np.abs(euler.images.astype(int) - ddim.images.astype(int))) <= 1
  out = tmp_path / "heun.png"
  with pytest.raises(SystemExit) as exit_:
    sample_cli.run(["sample.py", "--workdir", workdir, "--num", "4", "--steps", "3", "--sampler", "heun", "--out",
                    str(out)])
  assert (exit_.value.code or 0) == 0, capsys.readouterr().err
  assert out.exists()
