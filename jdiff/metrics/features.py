"""Image features for the Fréchet and kernel distances on jdiff's own datasets: a small classifier trained on the
dataset itself, and the batched feature extraction that the Inception network shares.

The FID Inception network was trained on ImageNet photographs; on 16x16 digits or shapes its features say little,
and its weights are not always at hand. For those datasets jdiff trains a small convolutional network to predict
every class label the dataset has (digits: the digit; shapes: the colour-shape pair, shape, colour, size and
position) and uses its penultimate layer, 64 numbers before the last ReLU, as the features. The distance on them is
"the Fréchet distance on <dataset> features", never FID: its numbers are comparable only with the same network.

The network trains once per (dataset, image size) in about a minute on a CPU, from a fixed seed, and is cached in
the TFDS data dir under jdiff_features/. Its weights' hash names its feature space, so statistics computed with
another network (another machine's training, another version) are refused rather than compared.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import traverse_util

from jdiff import sharding
from jdiff.config import DataConfig

VERSION = 1  # of the architecture and training recipe: a change trains a new network
FEATURES = 64
TRAIN_STEPS = 1500
BATCH_SIZE = 128
LEARNING_RATE = 2e-3


class FeatureNet(nn.Module):
  """A 3x3 convolution, then two stages of a strided and a plain 3x3 convolution (ReLU after each), the global mean,
  a 64-wide layer and one linear head per label. Returns (features [B, 64], [logits [B, classes] per head])."""
  heads: tuple[int, ...]
  width: int = 16

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(self.width, (3, 3))(x))
    for channels in (2 * self.width, 4 * self.width):
      x = nn.relu(nn.Conv(channels, (3, 3), strides=2)(x))
      x = nn.relu(nn.Conv(channels, (3, 3))(x))
    features = nn.Dense(FEATURES)(jnp.mean(x, axis=(1, 2)))
    hidden = nn.relu(features)
    return features, [nn.Dense(classes, name=f"head_{i}")(hidden) for i, classes in enumerate(self.heads)]


@dataclasses.dataclass(frozen=True)
class FeatureNetwork:
  """A trained feature network for uint8 images of one shape; call it on images [N, H, W, C] for features [N, 64]."""
  params: dict
  heads: tuple[str, ...]
  classes: tuple[int, ...]
  image_shape: tuple[int, int, int]
  dataset: str
  accuracy: dict  # held-out accuracy of each head
  shift: np.ndarray | None = None  # the training images' feature mean and std, which the features are standardised
  scale: np.ndarray | None = None  # by: each then has mean 0 and std 1 on them

  @property
  def space(self) -> str:
    """Names the feature space: the dataset, the image shape and the hash of the weights."""
    weights = params_hash({"params": self.params, "shift": self.shift, "scale": self.scale})
    return f"{self.dataset}-features-v{VERSION}-{'x'.join(map(str, self.image_shape))}-{weights}"

  @property
  def name(self) -> str:
    return f"{self.dataset} features"

  def __call__(self, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:] != self.image_shape:
      raise ValueError(f"the {self.name} take uint8 images [N, {', '.join(map(str, self.image_shape))}], got "
                       f"{images.dtype} {images.shape}")
    return (self.raw_features(images, batch_size) - self.shift) / self.scale

  def raw_features(self, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    return batched(_jitted(self.classes, "features"), self.params, images, batch_size)


@functools.lru_cache(maxsize=None)
def _jitted(classes: tuple[int, ...], output: str) -> Callable:
  """The network's features or its heads' logits (concatenated) of uint8 images, compiled once per output."""
  def apply(params, images):
    features, logits = FeatureNet(classes).apply({"params": params}, images.astype(jnp.float32) / 127.5 - 1.0)
    return features if output == "features" else jnp.concatenate(logits, axis=1)
  return jax.jit(apply)


def batched(apply: Callable, params, images: np.ndarray, batch_size: int) -> np.ndarray:
  """apply(params, batch) over images in batches split over this process's devices; float32 [N, ...] on the host.

  Each batch is padded to a multiple of the device count (the last one to the full batch size), so one program
  serves them all."""
  devices = jax.local_devices()
  size = -(-min(batch_size, len(images)) // len(devices)) * len(devices)
  split = sharding.over_devices(devices, jax.sharding.PartitionSpec("batch"))
  params = jax.device_put(params, sharding.over_devices(devices))
  outputs = []
  for start in range(0, len(images), size):
    chunk = images[start:start + size]
    padded = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), axis=0)])
    outputs.append(np.asarray(apply(params, jax.device_put(padded, split)), np.float32)[:len(chunk)])
  return np.concatenate(outputs)


def params_hash(params) -> str:
  digest = hashlib.sha256()
  for path, leaf in sorted(traverse_util.flatten_dict(jax.device_get(params), sep="/").items()):
    digest.update(path.encode())
    digest.update(np.ascontiguousarray(leaf, np.float32).tobytes())
  return digest.hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class Split:
  """A dataset split in memory: uint8 images [N, S, S, C], every ClassLabel feature by name (int32 [N]), and the
  captions (str [N]): the dataset's own, or else data.caption_template filled with each label's name."""
  images: np.ndarray
  labels: dict[str, np.ndarray]
  captions: np.ndarray


def read_split(data: DataConfig, split: str) -> Split:
  """`split` of data's dataset with its images resized to data.image_size."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from jdiff.data import resize_images, sources  # pylint: disable=import-outside-toplevel
  builder = sources.get_builder(data.name, data.data_dir)
  sources.prepare(builder)
  names = [name for name, feature in builder.info.features.items() if isinstance(feature, tfds.features.ClassLabel)]
  arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
  if "caption" in arrays:
    captions = np.array([c.decode() if isinstance(c, bytes) else c for c in arrays["caption"]], object)
  else:
    label_names = builder.info.features["label"].names
    captions = np.array([data.caption_template.replace("{label}", label_names[i]) for i in arrays["label"]], object)
  return Split(images=resize_images(arrays["image"], data.image_size),
               labels={name: arrays[name].astype(np.int32) for name in names}, captions=captions)


def cache_path(data: DataConfig) -> str:
  """Where the network for `data`'s dataset and image size is kept: the TFDS data dir's jdiff_features/."""
  from jdiff.data import sources  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(sources.get_builder(data.name, data.data_dir).data_dir))
  return os.path.join(root, "jdiff_features", f"{data.name}_{data.image_size}px_v{VERSION}.npz")


def dataset_features(data: DataConfig, *, steps: int = TRAIN_STEPS, cache: bool = True) -> FeatureNetwork:
  """The feature network of `data`'s dataset at data.image_size: loaded from the cache, or trained on the 'train'
  split (and its held-out accuracy measured on 'test') and cached."""
  path = cache_path(data)
  if cache and os.path.isfile(path):
    return load_network(path)
  train = read_split(data, "train")
  images, labels = train.images, train.labels
  logging.info("training the %s feature network on %d images (once; cached in %s)", data.name, len(images), path)
  heads = tuple(sorted(labels))
  classes = tuple(int(labels[h].max()) + 1 for h in heads)
  params = train_network(images, [labels[h] for h in heads], classes, steps=steps)
  test = read_split(data, "test")
  network = FeatureNetwork(params=params, heads=heads, classes=classes, image_shape=images.shape[1:],
                           dataset=data.name, accuracy={})
  accuracy = head_accuracy(network, test.images, test.labels)
  raw = network.raw_features(images)
  network = dataclasses.replace(network, accuracy=accuracy, shift=raw.mean(axis=0),
                                scale=np.maximum(raw.std(axis=0), 1e-6))
  logging.info("%s feature network: held-out accuracy %s", data.name,
               ", ".join(f"{h} {a:.3f}" for h, a in accuracy.items()))
  if cache:
    save_network(network, path)
  return network


def head_accuracy(network: FeatureNetwork, images: np.ndarray, labels: dict[str, np.ndarray]) -> dict[str, float]:
  """The share of images each head classifies right."""
  logits = batched(_jitted(network.classes, "logits"), network.params, images, 500)
  bounds = np.cumsum((0,) + network.classes)
  return {head: float(np.mean(np.argmax(logits[:, lo:hi], axis=1) == labels[head]))
          for head, lo, hi in zip(network.heads, bounds[:-1], bounds[1:])}


def train_network(images: np.ndarray, labels: list[np.ndarray], classes: tuple[int, ...], *, steps: int,
                  seed: int = 0) -> dict:
  """Adam with a cosine decay on the summed cross-entropies of the heads; images shifted by up to a pixel."""
  model = FeatureNet(classes)
  rng = np.random.default_rng(seed)
  params = model.init(jax.random.key(seed), jnp.zeros((1,) + images.shape[1:]))["params"]
  optimizer = optax.adam(optax.cosine_decay_schedule(LEARNING_RATE, steps))
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, x, ys):
    def loss_fn(p):
      _, logits = model.apply({"params": p}, x.astype(jnp.float32) / 127.5 - 1.0)
      return sum(optax.softmax_cross_entropy_with_integer_labels(out, y).mean() for out, y in zip(logits, ys))
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  size = images.shape[1]
  for _ in range(steps):
    index = rng.choice(len(images), min(BATCH_SIZE, len(images)), replace=False)
    dy, dx = rng.integers(0, 3, 2)
    batch = padded[index, dy:dy + size, dx:dx + size]
    params, opt_state = step(params, opt_state, batch, [y[index] for y in labels])
  return jax.device_get(params)


def save_network(network: FeatureNetwork, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  meta = {"heads": network.heads, "classes": network.classes, "image_shape": network.image_shape,
          "dataset": network.dataset, "accuracy": network.accuracy, "version": VERSION}
  flat = traverse_util.flatten_dict(network.params, sep="/")
  partial = f"{path}.partial.npz"
  np.savez(partial, meta=json.dumps(meta), shift=network.shift, scale=network.scale,
           **{f"params/{k}": v for k, v in flat.items()})
  os.replace(partial, path)  # Readers never see half a file.


def load_network(path: str) -> FeatureNetwork:
  with np.load(path, allow_pickle=False) as data:
    meta = json.loads(str(data["meta"]))
    flat = {k[len("params/"):]: data[k] for k in data.files if k.startswith("params/")}
    shift, scale = data["shift"], data["scale"]
  return FeatureNetwork(params=traverse_util.unflatten_dict(flat, sep="/"), heads=tuple(meta["heads"]),
                        classes=tuple(meta["classes"]), image_shape=tuple(meta["image_shape"]),
                        dataset=meta["dataset"], accuracy=meta["accuracy"], shift=shift, scale=scale)
