"""The FID Inception network in Flax: the 2015-12-05 InceptionV3 graph up to its 2048-d pool features, as
pytorch-fid, torch-fidelity and clean-fid use it, with pytorch-fid's input handling.

Weights are never downloaded. Pass the file pytorch-fid downloads (pt_inception-2015-12-05-6726825d.pth, from
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth) to
`load_params`, which needs torch for a .pth, or an .npz converted from it, which does not:

    python -m jdiff.metrics.inception pt_inception-2015-12-05-6726825d.pth inception.npz   # needs torch, once

The graph is torchvision's Inception3 with pytorch-fid's changes: the average pools of the A, C and first E blocks
leave the padding out of their averages (TensorFlow's pooling), and the last E block max-pools. Every convolution
has no bias and is followed by batch norm (eps 1e-3, its running statistics) and a ReLU. Images go in as uint8,
become [0, 1], are resized bilinearly to 299x299 without antialiasing (torch's F.interpolate, align_corners=False),
and are scaled to [-1, 1]: pytorch-fid's `resize_input` and `normalize_input`. Grey images repeat their channel
three times, as pytorch-fid's loading through PIL's RGB conversion does.

The parameter names follow the .pth state dict ("Mixed_5b.branch1x1.conv.weight" is
params["Mixed_5b"]["branch1x1"]["conv"]["kernel"]), so converting is a renaming and a transposition.
tests/test_inception.py checks the graph against pytorch-fid's on random weights (bench/inception_fixture.py).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import sys
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jdiff.metrics.features import batched, params_hash

INPUT_SIZE = 299
FEATURES = 2048
BN_EPS = 1e-3
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")


class BasicConv(nn.Module):
  """Convolution without bias, batch norm with its running statistics, ReLU."""
  features: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    pad = [(p, p) for p in self.padding]
    x = nn.Conv(self.features, self.kernel, strides=self.stride, padding=pad, use_bias=False, name="conv")(x)
    return nn.relu(FrozenBatchNorm(self.features, name="bn")(x))


class FrozenBatchNorm(nn.Module):
  """Batch norm at inference: (x - mean) / sqrt(var + eps) * scale + bias, with the statistics as parameters."""
  features: int

  @nn.compact
  def __call__(self, x):
    shape = (self.features,)
    scale, bias = self.param("scale", nn.initializers.ones, shape), self.param("bias", nn.initializers.zeros, shape)
    mean, var = self.param("mean", nn.initializers.zeros, shape), self.param("var", nn.initializers.ones, shape)
    multiplier = scale * jax.lax.rsqrt(var + BN_EPS)
    return x * multiplier + (bias - mean * multiplier)


def conv(features: int, kernel, stride: int = 1, padding=0, name: str | None = None) -> BasicConv:
  kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
  padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
  return BasicConv(features, kernel, stride, padding, name=name)


def avg_pool_3x3(x):
  """3x3 average pool, stride 1, padding 1, averaging only the pixels inside the image (count_include_pad=False)."""
  window, pad = (1, 3, 3, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, (1, 1, 1, 1), pad)
  count = jax.lax.reduce_window(jnp.ones(x.shape[1:3], x.dtype)[None, ..., None], 0.0, jax.lax.add, window,
                                (1, 1, 1, 1), pad)
  return total / count


def max_pool(x, stride: int, padding: int = 0):
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=[(padding, padding)] * 2)


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b5 = conv(64, 5, padding=2, name="branch5x5_2")(conv(48, 1, name="branch5x5_1")(x))
    b3 = conv(96, 3, padding=1, name="branch3x3dbl_2")(conv(64, 1, name="branch3x3dbl_1")(x))
    b3 = conv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
    pool = conv(self.pool_features, 1, name="branch_pool")(avg_pool_3x3(x))
    return jnp.concatenate([conv(64, 1, name="branch1x1")(x), b5, b3, pool], axis=-1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = conv(384, 3, stride=2, name="branch3x3")(x)
    dbl = conv(96, 3, padding=1, name="branch3x3dbl_2")(conv(64, 1, name="branch3x3dbl_1")(x))
    dbl = conv(96, 3, stride=2, name="branch3x3dbl_3")(dbl)
    return jnp.concatenate([b3, dbl, max_pool(x, 2)], axis=-1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b7 = conv(c7, 1, name="branch7x7_1")(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    dbl = conv(c7, 1, name="branch7x7dbl_1")(x)
    for i, (kernel, padding, out) in enumerate([((7, 1), (3, 0), c7), ((1, 7), (0, 3), c7), ((7, 1), (3, 0), c7),
                                                ((1, 7), (0, 3), 192)], start=2):
      dbl = conv(out, kernel, padding=padding, name=f"branch7x7dbl_{i}")(dbl)
    pool = conv(192, 1, name="branch_pool")(avg_pool_3x3(x))
    return jnp.concatenate([conv(192, 1, name="branch1x1")(x), b7, dbl, pool], axis=-1)


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = conv(320, 3, stride=2, name="branch3x3_2")(conv(192, 1, name="branch3x3_1")(x))
    b7 = conv(192, 1, name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, 3, stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, max_pool(x, 2)], axis=-1)


class InceptionE(nn.Module):
  """The E block; `max_pool_branch` is pytorch-fid's last block, whose pool branch max-pools."""
  max_pool_branch: bool = False

  @nn.compact
  def __call__(self, x):
    b3 = conv(384, 1, name="branch3x3_1")(x)
    b3 = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    dbl = conv(384, 3, padding=1, name="branch3x3dbl_2")(conv(448, 1, name="branch3x3dbl_1")(x))
    dbl = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(dbl),
                           conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(dbl)], axis=-1)
    pooled = max_pool(x, 1, padding=1) if self.max_pool_branch else avg_pool_3x3(x)
    pool = conv(192, 1, name="branch_pool")(pooled)
    return jnp.concatenate([conv(320, 1, name="branch1x1")(x), b3, dbl, pool], axis=-1)


class InceptionV3(nn.Module):
  """Images in [-1, 1], [B, H, W, 3] (299x299 for FID) -> the 2048-d pool features [B, 2048]."""

  @nn.compact
  def __call__(self, x):
    x = conv(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
    x = conv(32, 3, name="Conv2d_2a_3x3")(x)
    x = max_pool(conv(64, 3, padding=1, name="Conv2d_2b_3x3")(x), 2)
    x = conv(80, 1, name="Conv2d_3b_1x1")(x)
    x = max_pool(conv(192, 3, name="Conv2d_4a_3x3")(x), 2)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(name="Mixed_7b")(x)
    x = InceptionE(max_pool_branch=True, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))


def resize_bilinear(images: jax.Array, size: int) -> jax.Array:
  """Bilinear resize of [B, H, W, C] to size x size without antialiasing, as torch's F.interpolate(mode='bilinear',
  align_corners=False): pixel centres line up, and source positions outside the image take the edge pixel."""
  def along(x, axis):
    n = x.shape[axis]
    position = jnp.maximum((jnp.arange(size, dtype=jnp.float32) + 0.5) * (n / size) - 0.5, 0.0)
    low = jnp.minimum(jnp.floor(position).astype(jnp.int32), n - 1)
    high = jnp.minimum(low + 1, n - 1)
    weight = (position - low).reshape((-1,) + (1,) * (x.ndim - axis - 1))
    return jnp.take(x, low, axis=axis) * (1 - weight) + jnp.take(x, high, axis=axis) * weight
  return along(along(images, 1), 2)


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 images [B, H, W, 1 or 3] -> the network's input [B, 299, 299, 3] in [-1, 1], as pytorch-fid makes it."""
  x = images.astype(jnp.float32) / 255.0
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  return 2.0 * resize_bilinear(x, INPUT_SIZE) - 1.0


@jax.jit
def _network(params, x):
  return InceptionV3().apply({"params": params}, x)


_preprocess = jax.jit(preprocess)  # apart from the network: a new image size recompiles only this


@dataclasses.dataclass(frozen=True)
class InceptionFeatures:
  """The FID Inception network with its weights: call it on uint8 images [N, H, W, 1 or 3] for features [N, 2048]."""
  params: dict
  name: str = "Inception pool3 features"

  @property
  def space(self) -> str:
    return f"inception-2015-12-05-pool3-{params_hash(self.params)}"

  def __call__(self, images: np.ndarray, batch_size: int = 100) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f"the Inception network takes uint8 images [N, H, W, 1 or 3], got {images.dtype} "
                       f"{images.shape}")
    return batched(lambda params, x: _network(params, _preprocess(x)), self.params, images, batch_size)


def missing_weights_message(path: str) -> str:
  return (f"no Inception weights at {path!r}: download pytorch-fid's {WEIGHTS_URL.rsplit('/', 1)[1]} from "
          f"{WEIGHTS_URL} and pass its path (or an .npz made from it by `python -m jdiff.metrics.inception IN.pth "
          "OUT.npz`)")


def load_params(path: str) -> dict:
  """The network's parameters from pytorch-fid's .pth (needs torch) or an .npz of the same state dict."""
  if not os.path.isfile(path):
    raise FileNotFoundError(missing_weights_message(path))
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as data:
      state = {key: data[key] for key in data.files}
  elif path.endswith((".pth", ".pt")):
    state = read_torch_state(path)
  else:
    raise ValueError(f"Inception weights must be pytorch-fid's .pth or an .npz converted from it, got {path!r}")
  return params_from_state(state)


def read_torch_state(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError(f"reading {path!r} needs torch; convert it to .npz where torch is installed with "
                      "`python -m jdiff.metrics.inception IN.pth OUT.npz`") from None
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {key: value.numpy() for key, value in state.items()}


@functools.lru_cache(maxsize=1)
def _param_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  abstract = jax.eval_shape(InceptionV3().init, jax.random.key(0), jnp.zeros((1, 75, 75, 3)))["params"]
  return {path: leaf.shape for path, leaf in traverse_util.flatten_dict(abstract).items()}


def expected_state_shapes() -> dict[str, tuple[int, ...]]:
  """The state-dict names and (torch) shapes of every tensor the network reads."""
  shapes = {}
  for path, shape in _param_shapes().items():
    shapes[state_name(path)] = (shape[3], shape[2], shape[0], shape[1]) if path[-1] == "kernel" else shape
  return shapes


_TORCH_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def state_name(path: Sequence[str]) -> str:
  """The state-dict name of a parameter path: ("Mixed_5b", "branch1x1", "bn", "var") -> ...bn.running_var."""
  return ".".join((*path[:-1], _TORCH_NAMES[path[-1]]))


def params_from_state(state: dict[str, np.ndarray]) -> dict:
  """Flax parameters from a pytorch-fid state dict (numpy arrays); the classifier and BN counters are ignored."""
  expected = expected_state_shapes()
  missing = sorted(set(expected) - set(state))
  if missing:
    raise ValueError(f"not pytorch-fid's Inception weights: {len(missing)} tensors are missing, e.g. {missing[0]}")
  flat = {}
  for path in _param_shapes():
    value = np.asarray(state[state_name(path)], np.float32)
    if value.shape != expected[state_name(path)]:
      raise ValueError(f"{state_name(path)} has shape {value.shape}, expected {expected[state_name(path)]}")
    flat[path] = value.transpose(2, 3, 1, 0) if path[-1] == "kernel" else value
  return traverse_util.unflatten_dict(flat)


def convert(pth: str, npz: str) -> None:
  """Writes pytorch-fid's .pth state dict as an .npz that loads without torch."""
  state = read_torch_state(pth)
  params_from_state(state)  # Refuses a file that is not the FID Inception before writing anything.
  np.savez(npz, **{key: state[key] for key in expected_state_shapes()})


def main(argv: list[str]) -> int:
  if len(argv) != 3 or not argv[1].endswith((".pth", ".pt")) or not argv[2].endswith(".npz"):
    print("usage: python -m jdiff.metrics.inception pt_inception-2015-12-05-6726825d.pth OUT.npz", file=sys.stderr)
    return 2
  if os.path.exists(argv[2]):
    print(f"inception: error: {argv[2]!r} exists; choose another output path", file=sys.stderr)
    return 2
  try:
    convert(argv[1], argv[2])
  except (OSError, ImportError, ValueError) as e:
    print(f"inception: error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {argv[2]}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
