"""Sample quality for digit models: how often a classifier trained on real digits reads a sample as its class.

The classifier sees images exactly as training does: scikit-learn's digits from the `sklearn_digits` train split,
as uint8, resized to the model's image size with the pipeline's resize. Generated samples go in as uint8 too
(`jdiff.images.model_range_to_uint8` maps a sampler's [-1, 1] output). An RBF support-vector machine on pixels in
[0, 1] trains in under a second and scores about 96% on the real test split at sizes 8 to 32; a logistic regression
on standardised pixels reaches only about 89% there, as the test split's writers are mostly unseen in training.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
from sklearn.svm import SVC

from jdiff.data import digits_split, resize_images


@dataclasses.dataclass(frozen=True)
class DigitClassifier:
  """A fitted classifier of uint8 digit images [N, image_size, image_size, 1]."""
  image_size: int
  model: SVC

  def predict(self, images: np.ndarray) -> np.ndarray:
    """Predicted labels [N] of uint8 images [N, image_size, image_size, 1]."""
    images = np.asarray(images)
    expected = (self.image_size, self.image_size, 1)
    if images.dtype != np.uint8 or images.shape[1:] != expected:
      raise ValueError(f"expected uint8 images of shape [N, {', '.join(map(str, expected))}], got "
                       f"{images.dtype} {images.shape}; map [-1, 1] samples with jdiff.images.model_range_to_uint8")
    return self.model.predict(_features(images))


def real_digits(split: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """The real 'train' or 'test' digits as the pipeline serves them: uint8 [N, S, S, 1] resized to S, labels [N]."""
  images, labels = digits_split(split)
  return resize_images(images, image_size), labels


def make_digit_classifier(image_size: int) -> DigitClassifier:
  """Fits the classifier on the real train split at `image_size` (under a second)."""
  images, labels = real_digits("train", image_size)
  model = SVC(C=10.0, gamma="scale").fit(_features(images), labels)
  return DigitClassifier(image_size=image_size, model=model)


def digit_accuracy(images: np.ndarray, labels: np.ndarray, classifier: DigitClassifier) -> float:
  """The fraction of uint8 images [N, S, S, 1] that `classifier` reads as their labels [N]."""
  return float(np.mean(classifier.predict(images) == np.asarray(labels)))


def _features(images: np.ndarray) -> np.ndarray:
  return images.reshape(len(images), -1).astype(np.float32) / 255.0


def sample_accuracy(pipe, classifier: DigitClassifier, *, num: int, seed: int = 0, **options) -> tuple[float, float]:
  """(accuracy, seconds) of `num` class-cycling samples from a `jdiff.Pipeline`; options go to its generate.

  The first call for a new shape compiles; it is run once on the same batch beforehand so the time
  measures sampling alone.
  """
  pipe.generate(num=num, seed=seed, **options)
  start = time.perf_counter()
  samples = pipe.generate(num=num, seed=seed, **options)
  elapsed = time.perf_counter() - start
  return digit_accuracy(samples.images, samples.labels, classifier), elapsed
