"""Optimal denoisers E[x0 | x_t] for data distributions where it is closed form, as model functions.

Written in the variance-exploding scale x = x0 + sigma * eps (see jdiff/samplers.py); `as_model_fn` turns one
into a model_fn(x_t, t, cond) returning eps, x0 or v, so samplers can be tested with no training.
"""
import jax
import jax.numpy as jnp
import numpy as np

from jdiff import diffusion, schedules


def gaussian_x0(x, sigma, *, mean, cov):
  """E[x0 | x] for x0 ~ N(mean, cov): mean + cov (cov + sigma^2 I)^-1 (x - mean); x [B, D], sigma [B, 1]."""
  lam, u = np.linalg.eigh(np.asarray(cov, np.float64))
  shrink = lam / (lam + sigma**2)  # [B, D] in the eigenbasis
  return mean + ((x - mean) @ u * shrink) @ u.T


def gaussian_ode_solution(x, *, sigma_from, sigma_to, mean, cov):
  """The probability-flow ODE's exact flow for Gaussian data: each eigencomponent scales by sqrt(lam + sigma^2)."""
  lam, u = np.linalg.eigh(np.asarray(cov, np.float64))
  scale = np.sqrt((lam + sigma_to**2) / (lam + sigma_from**2))
  return mean + ((x - mean) @ u * scale) @ u.T


def point_mass_x0(x, sigma, *, point):
  return jnp.broadcast_to(point, x.shape)


def mixture_x0(x, sigma, *, means, variances, weights):
  """E[x0 | x] for a mixture of isotropic Gaussians N(means[k], variances[k] I); weights [K] or [B, K]."""
  var = variances + sigma**2  # [B, K]
  sq = jnp.sum((x[:, None, :] - means[None]) ** 2, axis=-1)
  logits = jnp.log(jnp.maximum(weights, 1e-30)) - 0.5 * x.shape[-1] * jnp.log(var) - 0.5 * sq / var
  post = jax.nn.softmax(logits, axis=-1)
  per_component = means[None] + (variances / var)[..., None] * (x[:, None, :] - means[None])
  return jnp.einsum("bk,bkd->bd", post, per_component)


def class_mixture_x0(x, sigma, labels, *, means, variances, weights):
  """Class-conditional denoiser: label k < K is component k alone; label K (the null class) the whole mixture."""
  onehot = jax.nn.one_hot(labels, means.shape[0] + 1)
  class_weights = jnp.where(onehot[:, -1:] > 0, weights, onehot[:, :-1])
  return mixture_x0(x, sigma, means=means, variances=variances, weights=class_weights)


def as_model_fn(x0_fn, schedule, prediction):
  """model_fn(x_t, t, cond) in the given prediction from x0_fn(x, sigma [B, 1], cond) in the VE scale."""
  def model_fn(x_t, t, cond):
    flat = x_t.reshape(x_t.shape[0], -1)
    sigma = schedules.t_to_sigma(schedule, t)[:, None]
    alpha_bar = 1.0 / (1.0 + sigma**2)
    x0 = x0_fn(flat / jnp.sqrt(alpha_bar), sigma, cond)
    eps = diffusion.eps_from_x0(x_t=flat, x0=x0, alpha_bar=alpha_bar)
    out = {"x0": x0, "eps": eps, "v": diffusion.v_from_x0_eps(x0=x0, eps=eps, alpha_bar=alpha_bar)}
    return out[prediction].reshape(x_t.shape)
  return model_fn


def gaussian_vp_model_fn(schedule, prediction, *, mean, cov):
  """model_fn for x0 ~ N(mean, cov) written in the variance-preserving scale, so that it holds where abar is 0 too
  (zero terminal SNR: there x0's estimate is the mean and the noise's is x_t itself); x_t [B, D]."""
  lam, u = (jnp.asarray(a, jnp.float32) for a in np.linalg.eigh(np.asarray(cov, np.float64)))
  mean = jnp.asarray(mean, jnp.float32)

  def model_fn(x_t, t, cond):
    abar = (1.0 / (1.0 + schedules.t_to_sigma(schedule, t) ** 2))[:, None]
    gain = jnp.sqrt(abar) * lam / (abar * lam + 1.0 - abar)
    x0 = mean + ((x_t - jnp.sqrt(abar) * mean) @ u * gain) @ u.T
    eps = (x_t - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)
    return {"x0": x0, "eps": eps, "v": jnp.sqrt(abar) * eps - jnp.sqrt(1.0 - abar) * x0}[prediction]
  return model_fn


def gaussian_velocity(x_s, s, *, mean, var):
  """Flow matching's optimal velocity E[eps - x0 | x_s] for x0 ~ N(mean, diag var) and x_s = (1 - s) x0 + s eps:
  -mean + (s - (1 - s) var) / ((1 - s)^2 var + s^2) (x_s - (1 - s) mean), finite at s = 1 (x_s - mean there)."""
  gain = (s - (1.0 - s) * var) / ((1.0 - s) ** 2 * var + s**2)
  return -mean + gain * (x_s - (1.0 - s) * mean)


def gaussian_flow_model_fn(*, mean, var, num_timesteps: int = 1000):
  """model_fn(x_s, t, cond) of an exact flow model for x0 ~ N(mean, diag var) over the last axis; t = s T."""
  mean, var = jnp.asarray(mean, jnp.float32), jnp.asarray(var, jnp.float32)

  def model_fn(x_s, t, cond):
    s = (t / num_timesteps).reshape((-1,) + (1,) * (x_s.ndim - 1))
    return gaussian_velocity(x_s, s, mean=mean, var=var)
  return model_fn
