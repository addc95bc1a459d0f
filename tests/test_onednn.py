"""oneDNN convolutions on the CPU (jdiff/models/onednn.py) against XLA's: values, gradients, sharding, fallback."""
import logging
import os
import platform
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jdiff.models import onednn
from jdiff.models.layers import Conv3x3

EXPECTED = sys.platform == "linux" and platform.machine() == "x86_64" and os.environ.get("JDIFF_ONEDNN") != "0"


def probed_loss(conv_fn, stride, padding, probe):
  """A random linear read-out of sin(conv): every output entry reaches both gradients with its own weight."""
  return lambda x, k: jnp.sum(jnp.sin(conv_fn(x, k, stride, padding)) * probe)


def values_and_grads(conv_fn, x, kernel, stride, padding, probe):
  loss = probed_loss(conv_fn, stride, padding, probe)
  return conv_fn(x, kernel, stride, padding), jax.grad(loss, argnums=(0, 1))(x, kernel)


def random_problem(x_shape, kernel_shape, stride, padding, seed=0):
  kx, kk, kp = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, x_shape)
  kernel = jax.random.normal(kk, kernel_shape) / np.sqrt(np.prod(kernel_shape[:3]))
  out_shape = jax.eval_shape(lambda: onednn.xla_conv(x, kernel, stride, padding)).shape
  return x, kernel, jax.random.normal(kp, out_shape)


def test_library_builds_where_jdiff_installs_onednn():
  if not EXPECTED:
    pytest.skip("jdiff installs oneDNN on Linux x86_64 only (or JDIFF_ONEDNN=0)")
  assert onednn.available()


needs_onednn = pytest.mark.skipif(not EXPECTED, reason="oneDNN is installed on Linux x86_64 only")


@needs_onednn
@pytest.mark.parametrize("x_shape,kernel_shape,stride,padding", [
    ((2, 9, 7, 5), (3, 3, 5, 6), 1, (1, 1)),         # odd, non-square, few channels
    ((3, 11, 10, 16), (3, 3, 16, 8), 2, (1, 1)),     # Downsample's stride 2 on odd sizes
    ((2, 8, 8, 64), (3, 3, 64, 128), 1, (1, 1)),     # a U-Net level's widening conv
    ((1, 6, 6, 4), (3, 3, 4, 4), 1, (0, 2)),         # asymmetric padding
])
def test_onednn_conv_matches_xla_values_and_gradients(x_shape, kernel_shape, stride, padding):
  x, kernel, probe = random_problem(x_shape, kernel_shape, stride, padding)
  run = jax.jit(values_and_grads, static_argnums=(0, 3, 4))
  y, (gx, gk) = run(onednn.conv, x, kernel, stride, padding, probe)
  ref_y, (ref_gx, ref_gk) = run(onednn.xla_conv, x, kernel, stride, padding, probe)
  assert "jdiff_onednn_conv" in run.lower(onednn.conv, x, kernel, stride, padding, probe).as_text()
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx, ref_gx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gk, ref_gk, rtol=1e-5, atol=1e-4)


@needs_onednn
@pytest.mark.parametrize("kernel_spec", [P(), P(None, None, None, "fsdp")])
def test_sharded_onednn_conv_stays_batch_parallel(kernel_spec):
  """Over 8 devices (data 4 x fsdp 2, the batch over both): the same values and gradients as one device, the
  activations never gathered, and the devices' kernel gradients all-reduced."""
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
  batch, replicated = NamedSharding(mesh, P(("data", "fsdp"))), NamedSharding(mesh, P())
  x, kernel, probe = random_problem((16, 8, 8, 8), (3, 3, 8, 16), 1, (1, 1))
  fn = jax.jit(values_and_grads, static_argnums=(0, 3, 4),
               in_shardings=(batch, NamedSharding(mesh, kernel_spec), batch),
               out_shardings=(batch, (batch, replicated)))
  y, (gx, gk) = fn(onednn.conv, x, kernel, 1, (1, 1), probe)
  ref_y, (ref_gx, ref_gk) = jax.jit(values_and_grads, static_argnums=(0, 3, 4))(
      onednn.xla_conv, x, kernel, 1, (1, 1), probe)
  np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx, ref_gx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gk, ref_gk, rtol=1e-5, atol=1e-4)
  hlo = fn.lower(onednn.conv, x, kernel, 1, (1, 1), probe).compile().as_text()
  assert hlo.count("custom_call_target=\"jdiff_onednn_conv") == 3
  gathered = [line for line in hlo.splitlines() if "all-gather(" in line]
  assert all("f32[3,3," in line for line in gathered), gathered  # at most the FSDP kernel, never activations
  assert any("all-reduce(" in line and "f32[3,3,8,16]" in line for line in hlo.splitlines())  # the kernel gradient
  assert "conditional" not in hlo  # the platform switch leaves only the CPU branch


def test_conv3x3_has_nn_conv_parameters_and_values():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 6))
  ours, flax_conv = Conv3x3(10, strides=2), nn.Conv(10, (3, 3), strides=2, padding=((1, 1), (1, 1)),
                                                    kernel_init=nn.initializers.xavier_uniform())
  params = ours.init(jax.random.key(1), x)
  flax_params = flax_conv.init(jax.random.key(1), x)
  jax.tree.map(np.testing.assert_array_equal, params, flax_params)  # same names, shapes and initial values
  params = jax.tree.map(lambda p: p + 0.1, params)  # a nonzero bias too
  np.testing.assert_allclose(jax.jit(ours.apply)(params, x), flax_conv.apply(params, x), rtol=1e-5, atol=1e-5)


def test_conv3x3_bfloat16_uses_xla_and_returns_bfloat16():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  module = Conv3x3(4, dtype=jnp.bfloat16)
  params = module.init(jax.random.key(1), x)
  lowered = jax.jit(module.apply).lower(params, x).as_text()
  assert "jdiff_onednn" not in lowered and "convolution" in lowered
  assert module.apply(params, x).dtype == jnp.bfloat16


def test_xla_only_traces_xla_convolutions():
  x, kernel, _ = random_problem((2, 6, 6, 4), (3, 3, 4, 4), 1, (1, 1))
  with onednn.xla_only():
    lowered = jax.jit(onednn.conv, static_argnums=(2, 3)).lower(x, kernel, 1, (1, 1)).as_text()
  assert "jdiff_onednn" not in lowered and "convolution" in lowered


def test_missing_onednn_falls_back_with_the_fix(monkeypatch, caplog):
  monkeypatch.setattr(onednn, "_onednn_root", lambda: None)
  monkeypatch.setattr(onednn, "_ONEDNN_WHEELS", True)
  with caplog.at_level(logging.WARNING):
    assert not onednn._load_and_register()
  assert "oneDNN not found" in caplog.text and "pip install onednn-cpu-gomp" in caplog.text


def test_failed_build_falls_back_with_the_compiler_error(monkeypatch, caplog, tmp_path):
  (tmp_path / "include/oneapi/dnnl").mkdir(parents=True)
  (tmp_path / "include/oneapi/dnnl/dnnl.hpp").write_text("#error not a real oneDNN\n")
  (tmp_path / "lib").mkdir()
  (tmp_path / "lib/libdnnl.so").write_bytes(b"")
  monkeypatch.setattr(onednn, "_onednn_root", lambda: tmp_path)
  monkeypatch.setenv("JDIFF_CACHE_DIR", str(tmp_path / "cache"))
  with caplog.at_level(logging.WARNING):
    assert not onednn._load_and_register()
  assert "could not build" in caplog.text and "not a real oneDNN" in caplog.text
  assert not list((tmp_path / "cache").glob("*.so"))  # nothing half-built is left to load later
