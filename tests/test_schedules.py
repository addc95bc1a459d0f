"""Closed forms of the noise schedules."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import schedules
from jdiff.config import DiffusionConfig


def test_linear_schedule_matches_ddpm():
  s = schedules.make_schedule("linear", 1000)
  betas = np.asarray(s.betas, np.float64)
  np.testing.assert_allclose(betas[[0, -1]], [1e-4, 0.02], rtol=1e-6)
  np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, rtol=1e-3)
  # DDPM's linear schedule leaves abar_T ~ 4.04e-5 (signal almost fully destroyed).
  np.testing.assert_allclose(float(s.alphas_cumprod[-1]), 4.0358e-5, rtol=1e-3)


def test_scaled_linear_schedule_matches_stable_diffusion():
  s = schedules.make_schedule("scaled_linear", 1000)
  root = np.sqrt(np.asarray(s.betas, np.float64))
  np.testing.assert_allclose(root[[0, -1]], [math.sqrt(0.00085), math.sqrt(0.012)], rtol=1e-5)
  np.testing.assert_allclose(np.diff(root), np.diff(root)[0], rtol=1e-3)
  # Stable Diffusion's largest sigma is ~14.61.
  np.testing.assert_allclose(float(s.sigmas[-1]), 14.6146, rtol=1e-3)


def test_cosine_schedule_follows_its_closed_form():
  T, s_off = 1000, 0.008
  s = schedules.make_schedule("cosine", T)
  f = lambda u: math.cos((u + s_off) / (1 + s_off) * math.pi / 2) ** 2
  t = np.array([0, 10, 250, 500, 750, 900])
  expected = np.array([f((i + 1) / T) / f(0) for i in t])
  np.testing.assert_allclose(np.asarray(s.alphas_cumprod)[t], expected, rtol=1e-4)
  assert float(jnp.max(s.betas)) <= 0.999 + 1e-6


@pytest.mark.parametrize("name", schedules.SCHEDULE_NAMES)
def test_derived_arrays_are_consistent(name):
  s = schedules.make_schedule(name, 200)
  abar = np.asarray(s.alphas_cumprod, np.float64)
  np.testing.assert_allclose(abar, np.cumprod(1 - np.asarray(s.betas, np.float64)), rtol=1e-4)
  assert np.all(np.diff(abar) < 0)
  # 1 - abar loses digits in fp32 where abar ~ 1, hence the looser tolerance on small sigmas.
  np.testing.assert_allclose(np.asarray(s.sigmas) ** 2, (1 - abar) / abar, rtol=1e-3)
  np.testing.assert_allclose(np.asarray(s.log_snr), -2 * np.log(np.asarray(s.sigmas)), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(s.alphas_cumprod_prev)[1:], abar[:-1], rtol=1e-6)
  assert all(leaf.dtype == jnp.float32 and leaf.shape == (200,) for leaf in jax.tree_util.tree_leaves(s))


def test_schedule_is_a_pytree_that_passes_through_jit():
  s = schedules.make_schedule("linear", 100)
  total = jax.jit(lambda sch: jnp.sum(sch.betas))(s)
  np.testing.assert_allclose(float(total), float(np.sum(np.asarray(s.betas))), rtol=1e-6)


def test_sigma_and_t_interpolation_are_inverse():
  s = schedules.make_schedule("scaled_linear", 1000)
  t = jnp.array([0.0, 3.5, 250.25, 998.0])
  np.testing.assert_allclose(schedules.sigma_to_t(s, schedules.t_to_sigma(s, t)), t, atol=1e-2)
  np.testing.assert_allclose(schedules.t_to_sigma(s, jnp.arange(1000.0)), s.sigmas, rtol=1e-5)


def test_bad_schedule_requests_are_rejected():
  with pytest.raises(ValueError, match="unknown schedule 'quadratic'.*linear, cosine, scaled_linear"):
    schedules.make_schedule("quadratic")
  with pytest.raises(ValueError, match="num_timesteps"):
    schedules.make_schedule("linear", 1)


@pytest.mark.parametrize("name", schedules.SCHEDULE_NAMES)
def test_zero_terminal_snr_rescaling(name):
  """Lin et al. (2024): sqrt(abar) shifted and scaled to end at 0 and keep its first value; sigma ends infinite."""
  plain, zero = schedules.make_schedule(name, 1000), schedules.make_schedule(name, 1000, zero_terminal_snr=True)
  root = np.sqrt(np.cumprod(1.0 - np.asarray(plain.betas, np.float64)))
  want = (root - root[-1]) * root[0] / (root[0] - root[-1])
  np.testing.assert_allclose(np.asarray(zero.sqrt_alphas_cumprod), want, rtol=1e-4, atol=1e-7)
  assert float(zero.alphas_cumprod[-1]) == 0.0 and float(zero.betas[-1]) == 1.0
  assert float(zero.sigmas[-1]) == np.inf and float(zero.log_snr[-1]) == -np.inf
  finite = [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(zero)]
  assert all(np.all(np.isfinite(a[:-1])) for a in finite)
  assert np.all(np.diff(np.asarray(zero.alphas_cumprod)) < 0)
  np.testing.assert_allclose(schedules.t_to_sigma(zero, jnp.array([998.0, 999.0])), [zero.sigmas[998], np.inf], rtol=1e-6)
  np.testing.assert_allclose(schedules.sigma_to_t(zero, jnp.array([jnp.inf, zero.sigmas[998]])), [999, 998])
  with pytest.raises(ValueError, match="the last in"):
    schedules.from_betas(np.array([0.1, 1.0, 0.2]))
  from_config = DiffusionConfig(schedule=name, prediction="v", zero_terminal_snr=True).make_schedule()
  np.testing.assert_array_equal(from_config.sigmas, zero.sigmas)
