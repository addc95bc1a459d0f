"""The speed-motivated GroupNorm against flax.linen.GroupNorm: same parameters, outputs and gradients."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdiff.models.layers import GroupNorm


def random_params(x, seed):
  k_scale, k_bias = jax.random.split(jax.random.key(seed))
  c = x.shape[-1]
  return {"params": {"scale": 1 + 0.3 * jax.random.normal(k_scale, (c,)),
                     "bias": 0.2 * jax.random.normal(k_bias, (c,))}}


def values_and_gradients(module, params, x, probe):
  """The output and the gradients of a random linear read-out of silu(output), so every output entry matters."""
  loss = lambda params, x: jnp.sum(nn.silu(module.apply(params, x)) * probe)
  return module.apply(params, x), jax.grad(loss, argnums=(0, 1))(params, x)


@pytest.mark.parametrize("shape,groups", [((3, 8, 8, 32), 8), ((2, 10, 12), 1)])
def test_group_norm_matches_flax_values_and_gradients(shape, groups):
  x = 1.5 + 2.0 * jax.random.normal(jax.random.key(1), shape)
  ours, flax_gn = GroupNorm(num_groups=groups), nn.GroupNorm(num_groups=groups)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(
      jnp.shape, flax_gn.init(jax.random.key(0), x))
  params = random_params(x, seed=2)
  probe = jax.random.normal(jax.random.key(3), shape)
  (y, (g_params, g_x)), (f_y, (f_params, f_x)) = (
      jax.jit(values_and_gradients, static_argnums=0)(m, params, x, probe) for m in (ours, flax_gn))
  np.testing.assert_allclose(y, f_y, atol=2e-5)
  np.testing.assert_allclose(g_x, f_x, atol=2e-5)
  for name in ("scale", "bias"):
    np.testing.assert_allclose(g_params["params"][name], f_params["params"][name], rtol=1e-5, atol=1e-4)


def test_group_norm_normalises_each_group_in_float32():
  x = jax.random.normal(jax.random.key(4), (2, 4, 4, 8), jnp.bfloat16) * 3 + 1
  module = GroupNorm(num_groups=2)
  y = jax.jit(module.apply)(module.init(jax.random.key(0), x), x)
  assert y.dtype == jnp.float32
  groups = np.asarray(y).reshape(2, 16, 2, 4).transpose(0, 2, 1, 3).reshape(2, 2, -1)
  np.testing.assert_allclose(groups.mean(-1), 0, atol=1e-5)
  np.testing.assert_allclose(groups.var(-1), 1, atol=1e-4)
