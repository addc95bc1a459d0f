"""The training input pipeline: `DataConfig` -> an endless, deterministic, resumable iterator of numpy batches.

Each batch is {"image": float32 [B, S, S, C] in [-1, 1], "label": int32 [B]} with B = batch_size // process_count,
plus "caption": str [B] when asked for captions (the dataset's 'caption' feature, or else the label's class name
put into `caption_template`):
every process reads only its own shard of the split (`tfds.even_splits`), so the processes' batches together
form the global batch and are disjoint within a step.

Two ways to serve a split, chosen by its decoded size:
- In memory (splits up to IN_MEMORY_LIMIT_BYTES, e.g. sklearn_digits, mnist, cifar10): the shard is decoded and
  resized once, then each epoch is a permutation drawn from (seed, process, epoch) and cut into batches, dropping
  the remainder. Batch k is computed directly, so `start_step=k` costs nothing, and the hot path is numpy only.
- Streamed (larger splits): tf.data decodes, resizes and shuffles through a `shuffle_buffer`-sized buffer seeded
  from `seed`. It is deterministic too, but `start_step=k` reads (and discards) the first k batches.
Random flips are drawn per step from (seed, process, step) in both.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from jdiff.config import DataConfig
from jdiff.data.images import random_horizontal_flip, resize_images, resize_uint8_tf
from jdiff.images import uint8_to_model_range
from jdiff.data.sources import DatasetUnavailableError, get_builder, prepare
from jdiff.data.tf_import import tensorflow

IN_MEMORY_LIMIT_BYTES = 2 * 1024**3
_SHUFFLE, _FLIP = 0, 1  # Keep the random streams of (seed, process) apart.

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What building a model needs to know of the data, after resizing."""
  image_shape: tuple[int, int, int]  # (image_size, image_size, channels)
  num_classes: int

  @property
  def channels(self) -> int:
    return self.image_shape[-1]


def dataset_info(config: DataConfig) -> DatasetInfo:
  """Image shape and class count of `config`'s dataset, from the TFDS builder alone: no data is read or built."""
  image, label = _image_and_label_features(get_builder(config.name, config.data_dir))
  return DatasetInfo(image_shape=(config.image_size, config.image_size, image.shape[-1]),
                     num_classes=label.num_classes)


def _image_and_label_features(builder) -> tuple[tfds.features.Image, tfds.features.ClassLabel]:
  features = builder.info.features
  image, label = (features[key] if key in features else None for key in ("image", "label"))
  if not (isinstance(image, tfds.features.Image) and image.np_dtype == np.uint8
          and isinstance(label, tfds.features.ClassLabel)):
    raise DatasetUnavailableError(
        f"Dataset {builder.name!r} cannot be trained on here: jdiff needs a uint8 'image' feature and a "
        f"ClassLabel 'label' feature, and it has {features!r}.")
  return image, label


def local_batch_size(batch_size: int, process_count: int) -> int:
  """The per-process share of a global batch; the global batch must split evenly."""
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f"batch_size ({batch_size}) must be a positive multiple of the process count "
                     f"({process_count}): each process yields batch_size // process_count examples")
  return batch_size // process_count


def make_train_iterator(config: DataConfig, batch_size: int, seed: int, *, process_index: int = 0,
                        process_count: int = 1, start_step: int = 0, captions: bool = False) -> Iterator[Batch]:
  """Endless batches of this process's shard of `config.split`, the first one being step `start_step`.

  Args:
    config: the dataset and its preprocessing.
    batch_size: the global batch size; this process yields batch_size // process_count examples a step.
    seed: a non-negative int; the same seed (and process layout) gives the same batches in every run.
    process_index, process_count: this process and how many there are (jax.process_index(), jax.process_count()).
    start_step: the step to resume at: the iterator yields what an uninterrupted one yields from its
      start_step-th batch on.
    captions: also yield "caption", str [B] (for text-to-image training).

  Raises:
    DatasetUnavailableError: the dataset is unknown, or not prepared and not downloadable here.
    ValueError: bad batch size, process layout, seed, start step or split.
  """
  local_batch = local_batch_size(batch_size, process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index ({process_index}) must lie in [0, process_count={process_count})")
  if seed < 0 or start_step < 0:
    raise ValueError(f"seed ({seed}) and start_step ({start_step}) must be non-negative")
  builder = get_builder(config.name, config.data_dir)
  _image_and_label_features(builder)
  prepare(builder)
  _check_split(builder, config.split)
  shard = tfds.even_splits(config.split, process_count)[process_index] if process_count > 1 else config.split
  stream = (seed, process_index)
  template = config.caption_template if captions else None
  if not _fits_in_memory(builder, config):
    return _streamed_batches(builder, shard, config, local_batch, stream, start_step, template)
  images, labels, texts = _load_split(builder, shard, config.image_size, template)
  if len(images) < local_batch:
    raise ValueError(f"The per-process batch ({local_batch}) is larger than this process's shard of the split "
                     f"({len(images)} examples): use a smaller batch_size or fewer processes")
  return _in_memory_batches(images, labels, local_batch, config.random_flip, stream, start_step, texts)


def class_captions(builder, template: str) -> np.ndarray:
  """The caption of each class, indexed by label: `template` with "{label}" replaced by the class name."""
  return np.array([template.replace("{label}", name) for name in builder.info.features["label"].names], object)


def _decode_captions(raw: np.ndarray) -> np.ndarray:
  return np.array([text.decode() if isinstance(text, bytes) else text for text in raw], object)


def _check_split(builder, split: str) -> None:
  try:
    builder.info.splits[split]
  except (KeyError, ValueError) as error:
    raise ValueError(f"DataConfig.split {split!r} does not name a split of {builder.name!r}, whose splits are "
                     f"{sorted(builder.info.splits)} (slices such as 'train[:90%]' work too)") from error


def _fits_in_memory(builder, config: DataConfig) -> bool:
  height, width, channels = builder.info.features["image"].shape
  if height is None or width is None:
    return False
  pixels = max(height * width, config.image_size**2)
  return builder.info.splits[config.split].num_examples * pixels * channels <= IN_MEMORY_LIMIT_BYTES


def load_split(config: DataConfig) -> tuple[np.ndarray, np.ndarray]:
  """All of `config.split` in memory, in the dataset's order: uint8 images [N, S, S, C] resized to image_size, and
  int32 labels [N]; for evaluation on a held-out split (e.g. a VAE's reconstruction PSNR on 'test')."""
  builder = get_builder(config.name, config.data_dir)
  _image_and_label_features(builder)
  prepare(builder)
  _check_split(builder, config.split)
  return _load_split(builder, config.split, config.image_size)[:2]


def _load_split(builder, split, image_size: int,
                template: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """A whole prepared split in memory: uint8 images [N, S, S, C] resized to image_size, int32 labels [N], and
  with a caption `template`, captions str [N]: the dataset's own, or else the class captions (otherwise None)."""
  arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
  labels = arrays["label"].astype(np.int32)
  texts = None
  if template is not None:
    texts = _decode_captions(arrays["caption"]) if "caption" in arrays else class_captions(builder, template)[labels]
  return resize_images(arrays["image"], image_size), labels, texts


def _rng(stream: tuple[int, int], purpose: int, counter: int) -> np.random.Generator:
  return np.random.default_rng([*stream, purpose, counter])


def _in_memory_batches(images, labels, local_batch, random_flip, stream, start_step, texts=None) -> Iterator[Batch]:
  steps_per_epoch = len(images) // local_batch
  first_epoch, first_position = divmod(start_step, steps_per_epoch)
  for epoch in itertools.count(first_epoch):
    order = _rng(stream, _SHUFFLE, epoch).permutation(len(images))
    for position in range(first_position if epoch == first_epoch else 0, steps_per_epoch):
      index = order[position * local_batch:(position + 1) * local_batch]
      yield _finish(images[index], labels[index], random_flip, stream, epoch * steps_per_epoch + position,
                    None if texts is None else texts[index])


def _streamed_batches(builder, split, config: DataConfig, local_batch, stream, start_step,
                      template: str | None = None) -> Iterator[Batch]:
  tf = tensorflow()
  own_captions = "caption" in builder.info.features
  table = None if template is None or own_captions else tf.constant(class_captions(builder, template).astype(str))

  def resized(example):
    image = example["image"]
    if image.shape[:2] != (config.image_size, config.image_size):
      image = resize_uint8_tf(image, config.image_size)
    label = tf.cast(example["label"], tf.int32)
    if template is None:
      return image, label
    return image, label, example["caption"] if own_captions else tf.gather(table, label)

  shuffle_seed = int(_rng(stream, _SHUFFLE, 0).integers(2**31))
  data = builder.as_dataset(split=split, shuffle_files=False)
  data = data.map(resized, num_parallel_calls=tf.data.AUTOTUNE)
  data = data.shuffle(config.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=True).repeat()
  data = data.batch(local_batch, drop_remainder=True).skip(start_step).prefetch(tf.data.AUTOTUNE)
  for step, (images, labels, *texts) in enumerate(tfds.as_numpy(data), start=start_step):
    yield _finish(images, labels, config.random_flip, stream, step, _decode_captions(texts[0]) if texts else None)


def _finish(images: np.ndarray, labels: np.ndarray, random_flip: bool, stream, step: int,
            texts: np.ndarray | None = None) -> Batch:
  if random_flip:
    images = random_horizontal_flip(images, _rng(stream, _FLIP, step))
  batch = {"image": uint8_to_model_range(images), "label": labels}
  if texts is not None:
    batch["caption"] = texts
  return batch
