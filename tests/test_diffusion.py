"""Forward process, posterior, predictions and losses against closed forms and statistics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff import diffusion, schedules

SCHED = schedules.make_schedule("linear", 1000)


def test_q_sample_has_the_closed_form_mean_and_variance():
  n, t = 200_000, 300
  x0 = jnp.full((n, 1), 0.7)
  noise = jax.random.normal(jax.random.key(0), (n, 1))
  xt = diffusion.q_sample(SCHED, x0, jnp.full((n,), t), noise)
  abar = float(SCHED.alphas_cumprod[t])
  se = np.sqrt((1 - abar) / n)
  assert abs(float(xt.mean()) - np.sqrt(abar) * 0.7) < 5 * se
  np.testing.assert_allclose(float(xt.var()), 1 - abar, rtol=0.02)


def test_q_sample_at_t_equals_composing_single_steps():
  """Chaining q(x_s|x_{s-1}) = N(sqrt(alpha_s) x_{s-1}, beta_s) reproduces the closed form's moments."""
  t = 40
  alphas = np.asarray(SCHED.alphas, np.float64)[: t + 1]
  mean_coef, var = 1.0, 0.0
  for a in alphas:
    mean_coef, var = np.sqrt(a) * mean_coef, a * var + (1 - a)
  np.testing.assert_allclose(mean_coef, float(SCHED.sqrt_alphas_cumprod[t]), rtol=1e-5)
  np.testing.assert_allclose(var, 1 - float(SCHED.alphas_cumprod[t]), rtol=1e-5)


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_posterior_matches_brute_force_gaussian_product(t):
  """q(x_{t-1}|x_t,x0) ~ q(x_t|x_{t-1}) q(x_{t-1}|x0), evaluated numerically on a grid."""
  x0, xt = 0.3, -0.4
  # float64 betas: in fp32, 1 - alpha_t loses digits where beta_t ~ 1e-4.
  betas = schedules.linear_betas(1000)
  a_t = 1.0 - betas[t]
  abar_prev = np.prod(1.0 - betas[:t])
  grid = np.linspace(-6, 6, 400_001)
  log_p = (-(xt - np.sqrt(a_t) * grid) ** 2 / (2 * betas[t])
           - (grid - np.sqrt(abar_prev) * x0) ** 2 / (2 * (1 - abar_prev)))
  w = np.exp(log_p - log_p.max())
  w /= w.sum()
  mean_bf = np.sum(w * grid)
  var_bf = np.sum(w * (grid - mean_bf) ** 2)
  mean, var, log_var = diffusion.q_posterior(SCHED, jnp.array([[x0]]), jnp.array([[xt]]), jnp.array([t]))
  np.testing.assert_allclose(float(mean[0, 0]), mean_bf, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(float(var[0, 0]), var_bf, rtol=1e-3)
  np.testing.assert_allclose(float(log_var[0, 0]), np.log(var_bf), rtol=1e-3, atol=1e-3)


def test_posterior_log_variance_is_clipped_at_t0():
  _, var, log_var = diffusion.q_posterior(SCHED, jnp.zeros((1, 1)), jnp.zeros((1, 1)), jnp.array([0]))
  assert float(var[0, 0]) == 0.0
  np.testing.assert_allclose(float(log_var[0, 0]), np.log(float(SCHED.posterior_variance[1])), rtol=1e-5)


@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
def test_every_prediction_round_trips_to_x0_and_eps(prediction):
  k1, k2 = jax.random.split(jax.random.key(1))
  x0 = jax.random.uniform(k1, (16, 4, 4, 1), minval=-1, maxval=1)
  eps = jax.random.normal(k2, x0.shape)
  t = jnp.linspace(0, 999, 16).astype(jnp.int32)
  abar = diffusion.extract(SCHED.alphas_cumprod, t, 4)
  xt = diffusion.q_sample(SCHED, x0, t, eps)
  target = diffusion.training_target(x0=x0, noise=eps, alpha_bar=abar, prediction=prediction)
  x0_hat, eps_hat = diffusion.to_x0_eps(target, x_t=xt, alpha_bar=abar, prediction=prediction)
  # x0 from eps divides by sqrt(abar): its error grows with t, so compare in the x_t scale.
  np.testing.assert_allclose(jnp.sqrt(abar) * x0_hat, jnp.sqrt(abar) * x0, atol=2e-5)
  np.testing.assert_allclose(jnp.sqrt(1 - abar) * eps_hat, jnp.sqrt(1 - abar) * eps, atol=2e-5)


def test_v_is_a_rotation_of_x0_and_eps():
  x0, eps, abar = jnp.array(0.5), jnp.array(-1.2), jnp.array(0.36)
  v = diffusion.v_from_x0_eps(x0=x0, eps=eps, alpha_bar=abar)
  np.testing.assert_allclose(float(v), 0.6 * -1.2 - 0.8 * 0.5, rtol=1e-6)
  xt = 0.6 * x0 + 0.8 * eps
  # x_t and v are an orthonormal rotation of (x0, eps): norms are preserved.
  np.testing.assert_allclose(float(xt**2 + v**2), float(x0**2 + eps**2), rtol=1e-6)


def test_bf16_predictions_are_converted_in_fp32():
  x0, _ = diffusion.to_x0_eps(jnp.ones((2, 3), jnp.bfloat16), x_t=jnp.ones((2, 3)), alpha_bar=jnp.array(0.5),
                              prediction="eps")
  assert x0.dtype == jnp.float32


@pytest.mark.parametrize("prediction", diffusion.PREDICTIONS)
def test_loss_is_zero_for_the_exact_target_and_positive_otherwise(prediction):
  x0 = jnp.ones((4, 2, 2, 1)) * 0.5
  noise = jax.random.normal(jax.random.key(2), x0.shape)
  t = jnp.array([0, 100, 500, 999])
  abar = diffusion.extract(SCHED.alphas_cumprod, t, 4)
  target = diffusion.training_target(x0=x0, noise=noise, alpha_bar=abar, prediction=prediction)
  kw = dict(schedule=SCHED, x0=x0, noise=noise, t=t, prediction=prediction)
  np.testing.assert_allclose(diffusion.diffusion_loss(target, **kw), 0.0, atol=1e-10)
  np.testing.assert_allclose(diffusion.diffusion_loss(target + 0.1, **kw), 0.01, rtol=1e-4)


def test_min_snr_weights():
  snr = jnp.array([0.1, 5.0, 100.0])
  gamma = 5.0
  np.testing.assert_allclose(diffusion.loss_weight(snr, prediction="eps", min_snr_gamma=gamma),
                             [1.0, 1.0, 0.05], rtol=1e-6)
  np.testing.assert_allclose(diffusion.loss_weight(snr, prediction="x0", min_snr_gamma=gamma),
                             [0.1, 5.0, 5.0], rtol=1e-6)
  np.testing.assert_allclose(diffusion.loss_weight(snr, prediction="v", min_snr_gamma=gamma),
                             [0.1 / 1.1, 5 / 6, 5 / 101], rtol=1e-6)
  np.testing.assert_allclose(diffusion.loss_weight(snr, prediction="eps", min_snr_gamma=None), 1.0)


def test_min_snr_weighting_is_the_same_x0_error_in_every_prediction():
  """With min-SNR, a given x0 error costs the same whatever the network predicts."""
  x0 = jnp.zeros((3, 2, 2, 1))
  noise = jax.random.normal(jax.random.key(3), x0.shape)
  t = jnp.array([5, 400, 950])
  abar = diffusion.extract(SCHED.alphas_cumprod, t, 4)
  xt = diffusion.q_sample(SCHED, x0, t, noise)
  x0_wrong = x0 + 0.1
  eps_wrong = diffusion.eps_from_x0(x_t=xt, x0=x0_wrong, alpha_bar=abar)
  preds = {"x0": x0_wrong, "eps": eps_wrong,
           "v": diffusion.v_from_x0_eps(x0=x0_wrong, eps=eps_wrong, alpha_bar=abar)}
  losses = [diffusion.diffusion_loss(preds[p], schedule=SCHED, x0=x0, noise=noise, t=t, prediction=p,
                                     min_snr_gamma=5.0) for p in ("eps", "x0", "v")]
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-3)
  np.testing.assert_allclose(losses[2], losses[1], rtol=1e-3)


def test_zero_terminal_snr_loss_at_pure_noise():
  """At abar 0, v's target is -x0 and x0's is x0; min-SNR weighs that timestep 0 rather than 0/0."""
  zero = schedules.make_schedule("linear", 1000, zero_terminal_snr=True)
  x0, noise = jnp.full((2, 3), 0.5), jnp.ones((2, 3))
  t = jnp.array([999, 999])
  x_t = diffusion.q_sample(zero, x0, t, noise)
  np.testing.assert_array_equal(x_t, noise)
  for prediction, target in (("v", -x0), ("x0", x0)):
    for gamma, weight in ((0.0, 1.0), (5.0, 0.0)):
      loss = diffusion.diffusion_loss(jnp.zeros_like(x0), schedule=zero, x0=x0, noise=noise, t=t,
                                      prediction=prediction, min_snr_gamma=gamma)
      np.testing.assert_allclose(loss, weight * jnp.mean(target**2, axis=1), rtol=1e-6)
