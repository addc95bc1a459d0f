"""Samplers checked against exact denoisers (tests/exact_denoisers.py): no training needed.

Each configuration is compiled once; several checks share one compiled program to keep the suite fast.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import diffusion, samplers, schedules
from tests import exact_denoisers as ed

SCHEDULE = schedules.make_schedule("linear", 1000)
PARAMS = diffusion.PREDICTIONS

# Data: a Gaussian in D = 3 (eigenvalues 0.34, 0.48, 1.40, nonzero mean) times a point mass in 3 more dimensions;
# the product's exact denoiser acts on each block separately, so one run tests both.
_rng = np.random.default_rng(0)
_a = _rng.normal(size=(3, 3))
COV = _a @ _a.T / 3 + 0.3 * np.eye(3)
MEAN = _rng.normal(size=3) * 0.5
POINT = np.array([0.3, -0.7, 0.5])


def _gaussian(x, sigma, cond):
  return ed.gaussian_x0(x, sigma, mean=MEAN, cov=COV)


def _gaussian_and_point(x, sigma, cond):
  return jnp.concatenate([_gaussian(x[:, :3], sigma, cond), ed.point_mass_x0(x[:, 3:], sigma, point=POINT)], -1)


GAUSSIAN = {p: ed.as_model_fn(_gaussian, SCHEDULE, p) for p in PARAMS}
PRODUCT = {p: ed.as_model_fn(_gaussian_and_point, SCHEDULE, p) for p in PARAMS}
N = 4096  # samples for the statistics tests


def rms(a, b):
  return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


# Errors and step selection.

def test_unknown_names_and_bad_steps_raise():
  noise = jnp.zeros((2, 3))
  with pytest.raises(ValueError, match="dpmpp_2m_sde") as err:
    samplers.sample(GAUSSIAN["eps"], SCHEDULE, noise, sampler="dpm_fast")
  assert all(name in str(err.value) for name in samplers.SAMPLERS)
  for steps in (0, 1001):
    with pytest.raises(ValueError, match="steps must be in"):
      samplers.sample(GAUSSIAN["eps"], SCHEDULE, noise, steps=steps)
  with pytest.raises(ValueError, match="spacing"):
    samplers.sample(GAUSSIAN["eps"], SCHEDULE, noise, spacing="quadratic")
  with pytest.raises(ValueError, match="rng"):
    samplers.sample(GAUSSIAN["eps"], SCHEDULE, noise, sampler="ddpm")


def test_timestep_spacings_match_diffusers():
  steps = functools.partial(samplers.timesteps, num_timesteps=1000, steps=10)
  np.testing.assert_array_equal(steps(spacing="leading"), np.arange(900, -1, -100))
  np.testing.assert_array_equal(steps(spacing="trailing"), np.arange(999, 0, -100))
  np.testing.assert_array_equal(steps(spacing="linspace"), np.round(np.linspace(999, 0, 10)))
  for spacing in ("leading", "trailing", "linspace"):
    np.testing.assert_array_equal(samplers.timesteps(num_timesteps=50, steps=50, spacing=spacing),
                                  np.arange(49, -1, -1))
  sigmas, ts = samplers.noise_levels(SCHEDULE, steps=12, spacing="karras")
  np.testing.assert_allclose([sigmas[0], sigmas[-1]], [SCHEDULE.sigmas[-1], SCHEDULE.sigmas[0]], rtol=1e-5)
  np.testing.assert_allclose([ts[0], ts[-1]], [999, 0], atol=1e-2)
  assert np.all(np.diff(np.asarray(sigmas)) < 0)


def test_ddpm_is_the_respaced_posterior():
  """DDPM steps follow q(x_s | x_t, x0_hat) under the betas respaced to the chosen timesteps (with all T
  timesteps those are the schedule's own betas)."""
  sched = schedules.make_schedule("linear", 10, beta_start=0.01, beta_end=0.3)
  model = ed.as_model_fn(_gaussian, sched, "eps")
  noise = jax.random.normal(jax.random.key(0), (4, 3))
  keys = jax.random.split(jax.random.key(1), 4)
  ts = samplers.timesteps(num_timesteps=10, steps=4, spacing="trailing")
  abar = np.asarray(sched.alphas_cumprod, np.float64)[ts[::-1]]
  respaced = schedules.from_betas(1.0 - abar / np.append(1.0, abar[:-1]))  # index k is timestep ts[::-1][k]

  @jax.jit
  def reference(x):
    for i, t in enumerate(ts):
      pred = model(x, jnp.full((4,), t, jnp.float32), None)
      x0, _ = diffusion.to_x0_eps(pred, x_t=x, alpha_bar=sched.alphas_cumprod[t], prediction="eps")
      if i == len(ts) - 1:
        return x0
      mean, var, _ = diffusion.q_posterior(respaced, x0, x, jnp.full((4,), len(ts) - 1 - i))
      x = mean + jnp.sqrt(var) * jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, i), (3,)))(keys)

  out = samplers.sample(model, sched, noise, sampler="ddpm", steps=4, rng=keys, clip_x0=False)
  np.testing.assert_allclose(out, reference(noise), atol=2e-5)


# Every sampler: predictions agree, statistics match, point masses are exact.

@functools.cache
def run_sampler(sampler):
  """N samples of the Gaussian-times-point-mass data in each prediction, 200 steps."""
  run = jax.jit(lambda noise, key: {p: samplers.sample(PRODUCT[p], SCHEDULE, noise, sampler=sampler, steps=200,
                                                       prediction=p, rng=key, clip_x0=False) for p in PARAMS})
  return jax.device_get(run(jax.random.normal(jax.random.key(0), (N, 6)), jax.random.key(2)))


# The samplers of any diffusion model: 'lcm' samples consistency models, at most 50 steps (tests/test_distill.py).
DIFFUSION_SAMPLERS = [s for s in samplers.SAMPLERS if s != "lcm"]


@pytest.mark.parametrize("sampler", DIFFUSION_SAMPLERS)
def test_sampler_on_exact_denoisers(sampler):
  out = run_sampler(sampler)
  # PLMS extrapolates the model's own outputs, and v's (unlike eps's) are not exact for a point mass.
  for p in [p for p in PARAMS if not (sampler == "plms" and p == "v")]:
    np.testing.assert_allclose(out[p], out["eps"], atol=5e-4, err_msg=f"{p} vs eps")
    np.testing.assert_allclose(out[p][:, 3:], np.broadcast_to(POINT, (N, 3)), atol=1e-5, err_msg=f"point mass, {p}")
  # Tolerances: 5 standard errors of the sample mean and covariance.
  x = out["eps"][:, :3].astype(np.float64)
  var = np.diag(COV)
  assert np.all(np.abs(x.mean(0) - MEAN) < 5 * np.sqrt(var / N)), x.mean(0)
  cov_se = np.sqrt((np.outer(var, var) + COV**2) / N)
  assert np.all(np.abs(np.cov(x.T) - COV) < 5 * cov_se), np.cov(x.T) - COV


def test_ddim_is_euler_and_dpmpp_2m_sde_at_eta_0_is_dpmpp_2m():
  np.testing.assert_array_equal(run_sampler("ddim")["eps"], run_sampler("euler")["eps"])
  noise = jax.random.normal(jax.random.key(3), (16, 3))
  kw = dict(steps=15, clip_x0=False)
  sde = samplers.sample(GAUSSIAN["eps"], SCHEDULE, noise, sampler="dpmpp_2m_sde", eta=0.0, **kw)
  np.testing.assert_allclose(sde, samplers.sample(GAUSSIAN["eps"], SCHEDULE, noise, sampler="dpmpp_2m", **kw),
                             atol=1e-5)


MIXTURE = dict(means=jnp.array([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]]), variances=jnp.array([0.1, 0.2, 0.1]),
               weights=jnp.array([0.5, 0.3, 0.2]))
MIXTURE_MODEL = ed.as_model_fn(lambda x, sigma, c: ed.mixture_x0(x, sigma, **MIXTURE), SCHEDULE, "v")


@pytest.mark.parametrize("sampler", ["ddpm", "euler", "dpmpp_2m_sde", "unipc"])
def test_mixture_weights(sampler):
  n = 4096
  noise = jax.random.normal(jax.random.key(4), (n, 2))
  x = samplers.sample(MIXTURE_MODEL, SCHEDULE, noise, sampler=sampler, steps=100, prediction="v",
                      rng=jax.random.key(5), clip_x0=False)
  nearest = np.argmin(np.sum((np.asarray(x)[:, None] - np.asarray(MIXTURE["means"])) ** 2, -1), -1)
  freq = np.bincount(nearest, minlength=3) / n
  w = np.asarray(MIXTURE["weights"])
  assert np.all(np.abs(freq - w) < 5 * np.sqrt(w * (1 - w) / n)), freq


# Convergence order on the probability-flow ODE, against its closed-form solution for Gaussian data. Stable
# Diffusion's schedule (sigma 0.029 to 14.6) is in the asymptotic regime from 10 steps. On the linear schedule
# (sigma 0.01 to 157) the multistep samplers get there only from 20: their 10-to-20 ratios were 2.8 (dpmpp_2m),
# 4.8 (unipc) and 5.2 (lms). Timestep spacings suit only DDIM here: linspace steps in log sigma are very uneven.

CONVERGENCE_SCHEDULE = schedules.make_schedule("scaled_linear", 1000)
CONVERGENCE_MODEL = ed.as_model_fn(_gaussian, CONVERGENCE_SCHEDULE, "eps")
STEPS = (10, 20, 40, 80)
ORDERS = {  # sampler, spacing: bounds on the error ratio per doubling of the step count
    ("euler", "karras"): (1.6, 2.6), ("ddim", "linspace"): (1.6, 2.6), ("heun", "karras"): (3.0, 5.5),
    ("dpmpp_2m", "karras"): (3.0, 5.5),
    ("unipc", "karras"): (6.0, 11.0),  # UniC adds an order to UniP-2
    ("lms", "karras"): (7.0, 20.0),  # fourth order, after its lower-order start
    ("plms", "linspace"): (2.5, 6.0),  # Adams-Bashforth weights for equal steps, on unequal steps in sigma
}


@pytest.mark.parametrize("sampler,spacing", list(ORDERS))
def test_convergence_order(sampler, spacing):
  noise = jax.random.normal(jax.random.key(6), (64, 3))
  outs = jax.jit(lambda z: [samplers.sample(CONVERGENCE_MODEL, CONVERGENCE_SCHEDULE, z, sampler=sampler, steps=n,
                                            spacing=spacing, clip_x0=False) for n in STEPS])(noise)
  errors = []
  for n, out in zip(STEPS, outs):
    sigmas, _ = samplers.noise_levels(CONVERGENCE_SCHEDULE, steps=n, spacing=spacing)
    s_max, s_min = float(sigmas[0]), float(sigmas[-1])
    ode = functools.partial(ed.gaussian_ode_solution, np.asarray(noise, np.float64) * np.sqrt(1 + s_max**2),
                            sigma_from=s_max, mean=MEAN, cov=COV)
    if sampler in ("lms", "plms"):  # Their last step integrates to sigma 0: compare with the ODE's solution there.
      errors.append(rms(out, ode(sigma_to=0.0)))
    else:  # The others' last step is the denoised estimate at s_min: compare after that same step.
      errors.append(rms(out, ed.gaussian_x0(ode(sigma_to=s_min), np.full((len(noise), 1), s_min), mean=MEAN, cov=COV)))
  ratios = np.array(errors[:-1]) / np.array(errors[1:])
  lo, hi = ORDERS[sampler, spacing]
  print(f"{sampler} {spacing}: errors {np.round(errors, 6)}, ratios {np.round(ratios, 2)}")
  assert np.all((ratios > lo) & (ratios < hi)), (errors, ratios)


def test_lower_order_final_takes_the_last_step_at_first_order():
  """With lower_order_final, DPM-Solver++(2M) is itself up to the second-to-last level and then takes one DDIM step
  (its first-order form) before the final step to sigma 0."""
  noise = jax.random.normal(jax.random.key(7), (16, 3))
  kw = dict(steps=6, spacing="karras", clip_x0=False)
  lower = samplers.sample(GAUSSIAN["eps"], SCHEDULE, noise, sampler="dpmpp_2m", lower_order_final=True, **kw)
  levels = samplers.sampling_levels(SCHEDULE, steps=6, spacing="karras")
  steps = samplers._steps(SCHEDULE, levels)
  denoise = samplers._denoiser(GAUSSIAN["eps"], None, prediction="eps", clip_x0=False)
  quiet = dict(eta=jnp.float32(0), noise=lambda i: 0.0)
  x = samplers.dpmpp_2m(denoise, noise * levels.init_scale, jax.tree.map(lambda a: a[:-2], steps), **quiet)
  x = samplers.ancestral(denoise, x, jax.tree.map(lambda a: a[-2:], steps), **quiet)
  np.testing.assert_allclose(lower, x, rtol=1e-5, atol=1e-6)
  plain = samplers.sample(GAUSSIAN["eps"], SCHEDULE, noise, sampler="dpmpp_2m", **kw)
  assert rms(plain, lower) > 1e-4  # the second-order step is not the same step


# Guidance.

CLASSES = dict(means=jnp.array([[-1.0, 0.0], [1.0, 0.0]]), variances=jnp.array([0.5, 0.5]),
               weights=jnp.array([0.5, 0.5]))
NULL = 2
CLASS_MODEL = ed.as_model_fn(lambda x, sigma, c: ed.class_mixture_x0(x, sigma, c, **CLASSES), SCHEDULE, "eps")
TRACES = []


@jax.jit
def guided_samples(noise, labels, uncond, scale):
  TRACES.append(1)
  model = samplers.guided_model_fn(CLASS_MODEL, guidance_scale=scale, uncond=uncond)
  return samplers.sample(model, SCHEDULE, noise, labels, sampler="dpmpp_2m", steps=25, clip_x0=False)


def test_guidance_moves_mass_toward_the_class_without_recompiling():
  n = 2048
  noise = jax.random.normal(jax.random.key(8), (n, 2))
  class0 = jnp.zeros(n, jnp.int32)
  frac = {s: float(jnp.mean(guided_samples(noise, class0, jnp.int32(NULL), s)[:, 0] < 0)) for s in (0.0, 1.0, 3.0)}
  se = 5 * np.sqrt(0.25 / n)
  assert abs(frac[0.0] - 0.5) < se and frac[0.0] + se < frac[1.0] < frac[3.0] - se, frac
  # Negative conditioning: the null condition guided away from class 1.
  away = float(jnp.mean(guided_samples(noise, jnp.full(n, NULL, jnp.int32), jnp.int32(1), 3.0)[:, 0] < 0))
  assert away > 0.5 + se, away
  assert len(TRACES) == 1 and guided_samples._cache_size() == 1


def test_guided_model_fn_batches_halves_and_rescales():
  batches = []

  def model(x, t, c):
    batches.append(x.shape[0])
    return (x * (1.0 + c[:, None]) + t[:, None]).astype(jnp.bfloat16)

  x = jax.random.normal(jax.random.key(9), (4, 6))
  t = jnp.arange(4.0)
  labels = jnp.array([1.0, 2.0, 3.0, 4.0])
  cond_pred = model(x, t, labels).astype(jnp.float32)
  one = samplers.guided_model_fn(model, guidance_scale=1.0, uncond=0.0)(x, t, labels)
  assert batches == [4, 8] and one.dtype == jnp.float32
  np.testing.assert_allclose(one, cond_pred, rtol=1e-6)
  guided = samplers.guided_model_fn(model, guidance_scale=5.0, uncond=0.0, guidance_rescale=1.0)(x, t, labels)
  np.testing.assert_allclose(jnp.std(guided, axis=1), jnp.std(cond_pred, axis=1), rtol=1e-5)
  half = samplers.guided_model_fn(model, guidance_scale=5.0, uncond=0.0, guidance_rescale=0.5)(x, t, labels)
  plain = samplers.guided_model_fn(model, guidance_scale=5.0, uncond=0.0)(x, t, labels)
  np.testing.assert_allclose(half, (guided + plain) / 2, rtol=1e-5, atol=1e-5)


# Seeds, interpolation, inversion, jit and dtypes.

def test_seeds_are_deterministic_and_independent_of_the_batch():
  seeds = jnp.array([3, 4, 5])
  kw = dict(sampler="ddpm", steps=20, clip_x0=False)
  noise = samplers.noise_from_seeds(seeds, (3,))
  np.testing.assert_array_equal(noise[1:2], samplers.noise_from_seeds(seeds[1:2], (3,)))
  batch = samplers.sample(GAUSSIAN["eps"], SCHEDULE, noise, rng=samplers.keys_from_seeds(seeds), **kw)
  again = samplers.sample(GAUSSIAN["eps"], SCHEDULE, noise, rng=samplers.keys_from_seeds(seeds), **kw)
  alone = samplers.sample(GAUSSIAN["eps"], SCHEDULE, noise[1:2], rng=samplers.keys_from_seeds(seeds[1:2]), **kw)
  np.testing.assert_array_equal(batch, again)
  np.testing.assert_allclose(batch[1:2], alone, atol=1e-5)
  assert rms(batch[0], batch[2]) > 0.1


def test_slerp():
  a, b = jnp.array([2.0, 0.0, 0.0]), jnp.array([0.0, 2.0, 0.0])
  np.testing.assert_allclose(samplers.slerp(a, b, 0.0), a, atol=1e-6)
  np.testing.assert_allclose(samplers.slerp(a, b, 1.0), b, atol=1e-6)
  np.testing.assert_allclose(samplers.slerp(a, b, 0.5), [np.sqrt(2), np.sqrt(2), 0.0], atol=1e-6)
  np.testing.assert_allclose(samplers.slerp(a, a, 0.3), a, atol=1e-6)


def test_interpolation_is_smooth_and_hits_the_endpoints():
  model = ed.as_model_fn(lambda x, sigma, c: ed.gaussian_x0(x, sigma, mean=c, cov=COV), SCHEDULE, "eps")
  za, zb = jax.random.normal(jax.random.key(10), (2, 3))
  ca, cb = jnp.array([-1.0, 0.0, 1.0]), jnp.array([1.0, 1.0, -1.0])
  kw = dict(sampler="ddim", steps=20, clip_x0=False)
  frames = samplers.interpolate(model, SCHEDULE, za, zb, ca, cb, num_frames=9, **kw)
  assert frames.shape == (9, 3)
  np.testing.assert_allclose(frames[0], samplers.sample(model, SCHEDULE, za[None], ca[None], **kw)[0], atol=1e-5)
  np.testing.assert_allclose(frames[-1], samplers.sample(model, SCHEDULE, zb[None], cb[None], **kw)[0], atol=1e-5)
  moves = np.linalg.norm(np.diff(np.asarray(frames), axis=0), axis=1)
  assert moves.max() < 1.5 * moves.mean(), moves


def test_ddim_inversion_reconstructs():
  x0 = jnp.asarray(MEAN + _rng.normal(size=(256, 3)) @ np.linalg.cholesky(COV).T, jnp.float32)
  kw = dict(prediction="v", clip_x0=False)

  @jax.jit
  def errors(x0):
    def err(n, refine=0):
      noise = samplers.ddim_invert(GAUSSIAN["v"], SCHEDULE, x0, steps=n, refine=refine, **kw)
      decoded = samplers.sample(GAUSSIAN["v"], SCHEDULE, noise, sampler="ddim", steps=n, **kw)
      return jnp.sqrt(jnp.mean((decoded - x0) ** 2))
    return [err(10), err(50), err(200), err(50, refine=3)]

  e10, e50, e200, refined = map(float, errors(x0))
  print(f"DDIM inversion RMS error: 10 steps {e10:.4f}, 50 {e50:.4f}, 200 {e200:.5f}; 50 refined {refined:.2e}")
  assert e10 > e50 > e200 and e10 < 0.4 and e200 < 0.03 and refined < 1e-3


def test_sample_under_user_jit_with_traced_eta_bf16_model_and_image_shapes():
  model = ed.as_model_fn(lambda x, sigma, c: ed.gaussian_x0(x, sigma, mean=0.0, cov=np.eye(4)), SCHEDULE, "eps")
  bf16_model = lambda x, t, c: model(x, t, c).astype(jnp.bfloat16)
  noise = jax.random.normal(jax.random.key(11), (2, 2, 2, 1))
  run = jax.jit(lambda z, eta, key: samplers.sample(bf16_model, SCHEDULE, z, sampler="ddim", steps=10, eta=eta,
                                                    rng=key, clip_x0=False))
  deterministic = run(noise, 0.0, jax.random.key(0))
  stochastic = run(noise, 1.0, jax.random.key(0))
  assert run._cache_size() == 1 and deterministic.dtype == jnp.float32 and deterministic.shape == noise.shape
  reference = samplers.sample(model, SCHEDULE, noise, sampler="ddim", steps=10, clip_x0=False)
  np.testing.assert_allclose(deterministic, reference, atol=3e-2)
  assert rms(stochastic, deterministic) > 0.1
  clipped = samplers.sample(model, SCHEDULE, 3.0 * noise, sampler="ddim", steps=10)
  assert float(jnp.max(jnp.abs(clipped))) <= 1.0


def test_ancestral_first_step_from_pure_noise_stays_finite():
  """Cosine's first trailing level (sigma ~2e4) makes sigma_up == sigma_next: the root must not go NaN."""
  sched = schedules.make_schedule("cosine", 1000)
  noise = samplers.noise_from_seeds(jnp.arange(4), (4, 4, 1))
  zeros = lambda x, t, c: jnp.zeros_like(x)
  for sampler in ("ddpm", "euler_ancestral", "dpmpp_2m_sde"):
    out = samplers.sample(zeros, sched, noise, sampler=sampler, steps=5, prediction="eps",
                          rng=samplers.keys_from_seeds(jnp.arange(4)), spacing="trailing")
    assert bool(jnp.all(jnp.isfinite(out))), sampler


# Zero terminal SNR: the first level is sigma = inf, pure noise.

def _last_abar(abar_last):
  """Stable Diffusion's schedule rescaled to zero terminal SNR, then with its last abar set to abar_last."""
  betas = schedules.rescale_zero_terminal_snr(schedules.scaled_linear_betas(1000))
  if abar_last:
    betas[-1] = 1.0 - abar_last / np.prod(1.0 - betas[:-1])
  return schedules.from_betas(betas)


ZERO_SNR = _last_abar(0.0)
ZERO_SNR_MODEL = ed.gaussian_vp_model_fn(ZERO_SNR, "v", mean=MEAN, cov=COV)
# Largest RMS error after 40 trailing steps from pure noise, against the probability-flow ODE's exact map (x0 for
# LMS and PLMS, the denoised estimate at the last level for the others): 2-3x what was measured.
ZERO_SNR_ERRORS = {"ddim": 0.05, "heun": 4e-3, "dpmpp_2m": 5e-3, "unipc": 4e-3, "lms": 1.5e-3,
                   "plms": 0.08}  # PLMS extrapolates v, first order (as diffusers' PNDM)


@pytest.mark.parametrize("sampler", [s for s in DIFFUSION_SAMPLERS if s != "euler"])  # euler is ddim
def test_zero_terminal_snr_starts_from_pure_noise(sampler):
  """From sigma = inf every sampler runs finite, and where the limit exists, as from a huge sigma (1e6)."""
  z = jax.random.normal(jax.random.key(12), (64, 3))
  run = jax.jit(lambda schedule: samplers.sample(ZERO_SNR_MODEL, schedule, z, sampler=sampler, steps=40,
                                                 prediction="v", rng=jax.random.key(13), clip_x0=False))
  out = np.asarray(run(ZERO_SNR), np.float64)
  assert float(ZERO_SNR.sigmas[-1]) == np.inf and np.all(np.isfinite(out))
  if sampler in ZERO_SNR_ERRORS:
    lam, u = np.linalg.eigh(COV)
    s_min = float(samplers.noise_levels(ZERO_SNR, steps=40, spacing="trailing")[0][-1])
    gain = np.sqrt(lam) if sampler in ("lms", "plms") else lam / np.sqrt(lam + s_min**2)
    exact = MEAN + (np.asarray(z, np.float64) @ u * gain) @ u.T
    assert rms(out, exact) < ZERO_SNR_ERRORS[sampler], rms(out, exact)
  if sampler not in ("heun", "plms"):  # whose first steps from a finite sigma average both ends: no limit
    np.testing.assert_allclose(out, run(_last_abar(1e-12)), atol=1e-4)
