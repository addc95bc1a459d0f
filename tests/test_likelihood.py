"""Likelihood in bits per dimension on data whose likelihood is known, with exact denoisers in place of a network."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import multivariate_normal, norm

from jdiff import schedules
from jdiff.metrics import likelihood
from tests import exact_denoisers

GRID = np.arange(256) / 127.5 - 1.0


def test_discretized_gaussian_bins_hold_all_the_mass_and_match_the_cdf():
  mean, scale = 0.3, 0.05
  log_p = likelihood.discretized_gaussian_log_likelihood(jnp.asarray(GRID), mean=mean, log_scale=math.log(scale))
  assert float(jnp.sum(jnp.exp(log_p))) == pytest.approx(1.0, abs=1e-5)
  inner = slice(1, 255)
  expected = norm.cdf((GRID[inner] + 1 / 255 - mean) / scale) - norm.cdf((GRID[inner] - 1 / 255 - mean) / scale)
  near = expected > 1e-6
  np.testing.assert_allclose(np.exp(log_p[inner])[near], expected[near], rtol=1e-4)


def gaussian_case(schedule):
  rng = np.random.default_rng(0)
  a = 0.15 * rng.standard_normal((6, 6))
  cov = a @ a.T + np.diag(rng.uniform(0.02, 0.1, 6))
  mean = rng.uniform(-0.3, 0.3, 6)
  model_fn = exact_denoisers.as_model_fn(lambda x, s, c: exact_denoisers.gaussian_x0(x, s, mean=mean, cov=cov),
                                         schedule, "v")
  x0 = rng.multivariate_normal(mean, cov, 32)
  # The model's density at the smallest noise level is the data's Gaussian widened by that noise.
  known = multivariate_normal(mean, cov + float(schedule.sigmas[0]) ** 2 * np.eye(6)).logpdf(x0)
  return schedule, model_fn, x0, known


@pytest.fixture(scope="module")
def gaussian():
  return gaussian_case(schedules.make_schedule("cosine", 1000))


def test_ode_likelihood_with_the_exact_trace_is_the_gaussian_density(gaussian):
  schedule, model_fn, x0, known = gaussian
  log_p = likelihood.ode_log_likelihood(model_fn, schedule, jnp.asarray(x0, jnp.float32), prediction="v",
                                        steps=100, exact_trace=True)
  error = np.abs(np.asarray(log_p) - known) / 6
  print(f"ODE, exact trace: max |error| {error.max():.1e} nats per dimension")
  assert error.max() < 2e-4


def test_ode_likelihood_of_a_zero_terminal_snr_schedule_ends_at_its_largest_finite_sigma():
  schedule, model_fn, x0, known = gaussian_case(schedules.make_schedule("cosine", 1000, zero_terminal_snr=True))
  assert not np.isfinite(schedule.sigmas[-1])
  log_p = likelihood.ode_log_likelihood(model_fn, schedule, jnp.asarray(x0, jnp.float32), prediction="v",
                                        steps=100, exact_trace=True)
  error = np.abs(np.asarray(log_p) - known) / 6
  print(f"ODE, zero terminal SNR, exact trace: max |error| {error.max():.1e} nats per dimension")
  assert error.max() < 3e-4  # 1.7e-4 measured, the same with 200 steps: not the solver's step size


def test_ode_likelihood_with_hutchinsons_estimator_is_unbiased(gaussian):
  schedule, model_fn, x0, known = gaussian
  probes = 8  # each copy of the batch draws its own probes
  log_p = likelihood.ode_log_likelihood(model_fn, schedule, jnp.asarray(np.tile(x0, (probes, 1)), jnp.float32),
                                        prediction="v", steps=100, rng=jax.random.key(0))
  error = np.asarray(log_p).reshape(probes, -1) - known
  spread = error.std(axis=0, ddof=1).mean()  # the estimator's own std per example
  standard_error = error.std(ddof=1) / math.sqrt(error.size)
  print(f"ODE, Hutchinson: mean error {error.mean():+.3f} ± {standard_error:.3f} nats, std per probe {spread:.2f}")
  assert abs(error.mean()) < 3 * standard_error
  assert 0.3 < spread < 1.5


def log_sigma_schedule(sigma_min: float = 1e-3, sigma_max: float = 100.0, steps: int = 1000):
  """Noise levels evenly spaced in log sigma: every step is small, down to well below the 8-bit bin width."""
  sigmas = np.exp(np.linspace(math.log(sigma_min), math.log(sigma_max), steps))
  alpha_bar = 1.0 / (1.0 + sigmas**2)
  return schedules.from_betas(1.0 - alpha_bar / np.append(1.0, alpha_bar[:-1]))


@pytest.mark.parametrize("variance, timesteps, gap_limit", [
    ("large", None, 0.1),
    pytest.param("large", 100, 0.2, marks=pytest.mark.slow),
    pytest.param("small", None, 0.15, marks=pytest.mark.slow)])
def test_variational_bound_reaches_the_likelihood_of_8_bit_data(variance, timesteps, gap_limit):
  """Each dimension is an independent discretised Gaussian on the 8-bit grid, whose probabilities are known; the
  exact denoiser is the posterior mean over the grid."""
  rng = np.random.default_rng(1)
  mean, std = rng.uniform(-0.3, 0.3, 4), rng.uniform(0.05, 0.3, 4)
  upper = np.where(GRID == 1.0, np.inf, (GRID + 1 / 255 - mean[:, None]) / std[:, None])
  lower = np.where(GRID == -1.0, -np.inf, (GRID - 1 / 255 - mean[:, None]) / std[:, None])
  probs = norm.cdf(upper) - norm.cdf(lower)  # [4, 256]
  log_probs = np.log(np.maximum(probs, 1e-300))

  def x0_fn(x, sigma, cond):
    logits = log_probs[None] - (x[..., None] - GRID) ** 2 / (2 * sigma[..., None] ** 2)
    return jnp.sum(jax.nn.softmax(logits, axis=-1) * GRID, axis=-1)

  schedule = log_sigma_schedule()
  levels = np.stack([rng.choice(256, 256, p=p / p.sum()) for p in probs], axis=1)
  nll = -log_probs[np.arange(4), levels].sum(axis=1)
  model_fn = exact_denoisers.as_model_fn(x0_fn, schedule, "eps")
  bound = likelihood.vlb_nats(model_fn, schedule, jnp.asarray(GRID[levels], jnp.float32), rng=jax.random.key(2),
                              prediction="eps", variance=variance, timesteps=timesteps)
  gap = likelihood.to_bits_per_dim(np.asarray(bound) - nll, 4)
  standard_error = gap.std(ddof=1) / math.sqrt(len(gap))
  print(f"VLB ({variance}, {timesteps or 'all'} steps): {gap.mean():+.3f} ± {standard_error:.3f} bits/dim above "
        f"the NLL of {likelihood.to_bits_per_dim(nll, 4).mean():.3f}")
  assert -3 * standard_error < gap.mean() < gap_limit
