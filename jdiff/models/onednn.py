"""jdiff's 3x3 convolutions through oneDNN on the CPU: an XLA FFI library built on first use.

XLA:CPU's convolution kernels trail oneDNN's (the library PyTorch calls) on x86 CPUs, its weight gradient
most of all (docs/performance.md). `conv` computes an NHWC/HWIO convolution with oneDNN's forward,
input-gradient and weight-gradient primitives when the computation runs on the CPU in fp32 and the library is
there, and with XLA's own convolution otherwise (GPUs, TPUs, bf16). Both give the same values to fp32 rounding.

The library is `onednn_conv.cc` beside this file, compiled once per source, jaxlib and oneDNN into
~/.cache/jdiff (or $JDIFF_CACHE_DIR) in about 5 s. It needs g++ and oneDNN's headers and library: jdiff's
dependencies bring oneDNN on Linux x86_64 (Intel's onednn-cpu-gomp wheels); `apt-get install libdnnl-dev` works
too. Without them jdiff says once why, and uses XLA's convolution. JDIFF_ONEDNN=0 turns the oneDNN path off.
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import logging
import os
import platform
import site
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

_SOURCE = Path(__file__).with_name("onednn_conv.cc")
_ONEDNN_WHEELS = sys.platform == "linux" and platform.machine() == "x86_64"  # where pyproject.toml installs oneDNN
_TARGETS = {"jdiff_onednn_conv_forward": "JdiffConvForward", "jdiff_onednn_conv_input_grad": "JdiffConvInputGrad",
            "jdiff_onednn_conv_weight_grad": "JdiffConvWeightGrad"}


def _library_dir(root: Path) -> Path | None:
  return next((root / lib for lib in ("lib", "lib/x86_64-linux-gnu", "lib64") if (root / lib / "libdnnl.so").exists()),
              None)


def _onednn_root() -> Path | None:
  """The prefix holding oneDNN's headers and library: this Python's (pip wheels) or the system's (apt)."""
  for root in (Path(sys.prefix), Path(site.USER_BASE or sys.prefix), Path("/usr/local"), Path("/usr")):
    if (root / "include/oneapi/dnnl/dnnl.hpp").exists() and _library_dir(root):
      return root
  return None


def _build(root: Path) -> Path:
  """Compiles the FFI library into the cache unless this source, jaxlib and oneDNN already have one there."""
  import jaxlib
  libdir = _library_dir(root)
  onednn = (libdir / "libdnnl.so").resolve()  # the versioned file, e.g. libdnnl.so.3.2
  stamp = hashlib.sha256(_SOURCE.read_bytes() + f"{jaxlib.__version__} {onednn}".encode()).hexdigest()
  cache = Path(os.environ.get("JDIFF_CACHE_DIR", Path.home() / ".cache" / "jdiff"))
  target = cache / f"onednn_conv-{stamp[:16]}.so"
  if target.exists():
    return target
  cache.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cache) as tmp:
    built = Path(tmp) / target.name
    command = ["g++", "-O2", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w", f"-I{jax.ffi.include_dir()}",
               f"-I{root / 'include'}", str(_SOURCE), f"-L{libdir}", "-ldnnl", f"-Wl,-rpath,{libdir}",
               "-o", str(built)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
      raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[:2000]}")  # the first error tells most
    built.replace(target)  # atomic: concurrent builders each publish a whole library
  return target


@functools.cache
def available() -> bool:
  """Whether the oneDNN library is built and registered with XLA:CPU (built on the first call)."""
  return os.environ.get("JDIFF_ONEDNN", "1") != "0" and _load_and_register()


def _load_and_register() -> bool:
  root = _onednn_root()
  if root is None:
    # jdiff depends on oneDNN's wheels on Linux x86_64 only; elsewhere XLA's kernels are the expected path.
    log = logging.warning if _ONEDNN_WHEELS else logging.info
    log("jdiff: oneDNN not found (no include/oneapi/dnnl/dnnl.hpp and libdnnl.so under %s, %s, /usr/local or "
        "/usr); convolutions use XLA's kernels, slower on the CPU. Fix: pip install onednn-cpu-gomp "
        "onednn-devel-cpu-gomp (or apt-get install libdnnl-dev).", sys.prefix, site.USER_BASE)
    return False
  try:
    library = ctypes.cdll.LoadLibrary(str(_build(root)))
  except (OSError, RuntimeError) as error:
    logging.warning("jdiff: could not build the oneDNN convolution library (%s); convolutions use XLA's kernels. "
                    "It needs g++ on the PATH.", error)
    return False
  for name, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
  return True


def _threads_per_device() -> int:
  """Each CPU device's share of this process's cores, as train.py splits the CPU (parallel.cpu_devices)."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
  return max(1, cores // len(jax.local_devices(backend="cpu")))


def _call(target: str, out_shape, a, b, stride: int, padding: tuple[int, int]):
  out = jax.ShapeDtypeStruct(out_shape, jnp.float32)
  return jax.ffi.ffi_call(target, out, vmap_method="sequential")(
      a, b, stride=np.int64(stride), pad_lo=np.int64(padding[0]), pad_hi=np.int64(padding[1]),
      threads=np.int64(_threads_per_device()))


def _output_shape(x_shape, kernel_shape, stride: int, padding: tuple[int, int]):
  n, h, w, _ = x_shape
  kh, kw, _, o = kernel_shape
  size = lambda length, k: (length + sum(padding) - k) // stride + 1
  return (n, size(h, kh), size(w, kw), o)


# Each call is data parallel over the batch axis: every device convolves its share of the batch with the whole
# kernel, and the weight gradient sums the devices' shares. custom_partitioning tells XLA's partitioner so;
# without it a custom call's operands would be gathered onto every device.

def _batch_spec(sharding) -> object:
  spec = getattr(sharding, "spec", None)
  return spec[0] if spec else None


def _batch_sharded(mesh, batch_axes, rank: int = 4) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(batch_axes, *([None] * (rank - 1))))


def _replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def _all_but_batch(rule: str, keep=("n",)) -> tuple[str, ...]:
  """The rule's factors other than `keep`, in order of first appearance (the order Shardy requires)."""
  return tuple(dict.fromkeys(f for f in rule.replace(",", " ").replace("->", " ").split() if f not in keep))


def _batch_parallel(target: str, out_shape_fn, sharding_rule: str):
  """The custom-partitioned FFI call of a forward or input-gradient convolution: batch in, batch out."""
  @functools.partial(custom_partitioning, static_argnums=(2, 3, 4))
  def call(a, kernel, stride, padding, out_spatial):
    return _call(target, out_shape_fn(a.shape, kernel.shape, out_spatial), a, kernel, stride, padding)

  def partition(stride, padding, out_spatial, mesh, arg_shapes, result_shape):
    axes = _batch_spec(arg_shapes[0].sharding)
    lower = lambda a, kernel: _call(target, out_shape_fn(a.shape, kernel.shape, out_spatial), a, kernel, stride,
                                    padding)
    return mesh, lower, _batch_sharded(mesh, axes), (_batch_sharded(mesh, axes), _replicated(mesh))

  def infer(stride, padding, out_spatial, mesh, arg_shapes, result_shape):
    return _batch_sharded(mesh, _batch_spec(arg_shapes[0].sharding))

  call.def_partition(partition, infer_sharding_from_operands=infer, sharding_rule=sharding_rule,
                     need_replication_factors=_all_but_batch(sharding_rule))
  return call


_forward = _batch_parallel("jdiff_onednn_conv_forward",
                           lambda x, k, spatial: (x[0], *spatial, k[3]), "n h w c, kh kw c o -> n p q o")
_input_grad = _batch_parallel("jdiff_onednn_conv_input_grad",
                              lambda dy, k, spatial: (dy[0], *spatial, k[2]), "n p q o, kh kw c o -> n h w c")


@functools.partial(custom_partitioning, static_argnums=(2, 3, 4))
def _weight_grad(x, dy, stride, padding, kernel_shape):
  return _call("jdiff_onednn_conv_weight_grad", kernel_shape, x, dy, stride, padding)


def _weight_grad_partition(stride, padding, kernel_shape, mesh, arg_shapes, result_shape):
  axes = _batch_spec(arg_shapes[0].sharding)

  def lower(x, dy):
    partial = _call("jdiff_onednn_conv_weight_grad", kernel_shape, x, dy, stride, padding)
    return jax.lax.psum(partial, axes) if axes else partial
  return mesh, lower, _replicated(mesh), (_batch_sharded(mesh, axes), _batch_sharded(mesh, axes))


_weight_grad.def_partition(
    _weight_grad_partition, infer_sharding_from_operands=lambda *args: _replicated(args[-3]),
    sharding_rule="n h w c, n p q o -> kh kw c o", reduction_factors=("n",),
    need_replication_factors=_all_but_batch("n h w c, n p q o -> kh kw c o"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _onednn_conv(x, kernel, stride, padding):
  spatial = _output_shape(x.shape, kernel.shape, stride, padding)[1:3]
  return _forward(x, kernel, stride, padding, spatial)


def _onednn_conv_fwd(x, kernel, stride, padding):
  return _onednn_conv(x, kernel, stride, padding), (x, kernel)


def _onednn_conv_bwd(stride, padding, residuals, dy):
  x, kernel = residuals
  return (_input_grad(dy, kernel, stride, padding, x.shape[1:3]),
          _weight_grad(x, dy, stride, padding, kernel.shape))


_onednn_conv.defvjp(_onednn_conv_fwd, _onednn_conv_bwd)


def xla_conv(x, kernel, stride: int, padding: tuple[int, int]):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), (padding, padding),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


_xla_only = contextvars.ContextVar("jdiff_onednn_xla_only", default=False)


@contextlib.contextmanager
def xla_only():
  """Traces convolutions with XLA's kernels inside the block (e.g. for XLA's FLOP count, which skips custom calls)."""
  token = _xla_only.set(True)
  try:
    yield
  finally:
    _xla_only.reset(token)


def conv(x: jax.Array, kernel: jax.Array, stride: int = 1, padding: tuple[int, int] = (1, 1)) -> jax.Array:
  """NHWC x HWIO convolution (no bias), one stride and (low, high) padding for both spatial axes: oneDNN's on the
  CPU in fp32 where available, else XLA's."""
  use_xla = _xla_only.get() or x.dtype != jnp.float32 or kernel.dtype != jnp.float32 or x.ndim != 4
  if use_xla or not available():
    return xla_conv(x, kernel, stride, padding)
  return jax.lax.platform_dependent(x, kernel, cpu=lambda x, k: _onednn_conv(x, k, stride, padding),
                                    default=lambda x, k: xla_conv(x, k, stride, padding))
