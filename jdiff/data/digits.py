"""`sklearn_digits`: the 8x8 handwritten digits that scikit-learn ships, served through TFDS with no network.

scikit-learn's `load_digits` holds 1,797 grey images (the UCI optdigits test set) with levels 0..16, about 180 per
class. Here each image becomes uint8 (8, 8, 1) scaled to 0..255 (round(v * 255 / 16)).

Splits, fixed and balanced: the last 36 images of each class, in scikit-learn's order, form 'test' (360 images);
the other 1,437 form 'train'. scikit-learn keeps the writers' order, so the test images come mostly from writers
that 'train' does not see.
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

TEST_IMAGES_PER_CLASS = 36
NUM_CLASSES = 10
SPLIT_SIZES = {"train": 1437, "test": 360}


def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
  """All 1,797 digits as uint8 images [N, 8, 8, 1] in 0..255 and int64 labels [N], in scikit-learn's order."""
  from sklearn.datasets import load_digits  # Deferred: scikit-learn is slow to import and only the build needs it.
  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
  return images[..., None], digits.target.astype(np.int64)


def test_split_mask(labels: np.ndarray) -> np.ndarray:
  """True for the images of the 'test' split: the last TEST_IMAGES_PER_CLASS of each class."""
  mask = np.zeros(len(labels), dtype=bool)
  for label in range(NUM_CLASSES):
    mask[np.flatnonzero(labels == label)[-TEST_IMAGES_PER_CLASS:]] = True
  return mask


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
  """The uint8 images and labels of one split ('train' or 'test'), exactly as the TFDS builder stores them."""
  if split not in SPLIT_SIZES:
    raise ValueError(f"split must be one of {sorted(SPLIT_SIZES)}, got {split!r}")
  images, labels = digits_uint8()
  in_split = test_split_mask(labels) == (split == "test")
  return images[in_split], labels[in_split]


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """TFDS builder for scikit-learn's 8x8 digits; registered as 'sklearn_digits' when this module is imported."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: 1,437 train / 360 test images, 36 test images per class."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 1)),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: scikit-learn ships the data.
    images, labels = digits_uint8()
    is_test = test_split_mask(labels)
    return {
        "train": self._generate_examples(images, labels, np.flatnonzero(~is_test)),
        "test": self._generate_examples(images, labels, np.flatnonzero(is_test)),
    }

  def _generate_examples(self, images, labels, indices):
    # The key is the index in scikit-learn's order, so it names one image whatever the split.
    for index in indices:
      yield int(index), {"image": images[index], "label": int(labels[index])}
