"""Image transforms of the input pipelines and the evaluation: resize and flip (the uint8 <-> [-1, 1] maps are in
jdiff.images).

Training images are uint8 throughout the pipeline and become float32 in [-1, 1] only as a batch is handed out, so a
resized image is rounded back to uint8 exactly as a saved sample would be.
"""
from __future__ import annotations

import numpy as np

from jdiff.data.tf_import import tensorflow

RESIZE_CHUNK = 4096  # Images resized at once, to bound the float32 copy TF makes.


def resize_uint8_tf(images, image_size: int):
  """Bilinear, antialiased resize of uint8 images ([H,W,C] or [N,H,W,C]) to image_size x image_size, as uint8."""
  tf = tensorflow()
  resized = tf.image.resize(images, (image_size, image_size), method="bilinear", antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def resize_images(images: np.ndarray, image_size: int) -> np.ndarray:
  """`resize_uint8_tf` over a numpy uint8 array [N,H,W,C]; returns `images` itself when the size already matches."""
  if images.shape[1:3] == (image_size, image_size):
    return images
  chunks = [resize_uint8_tf(images[i:i + RESIZE_CHUNK], image_size).numpy()
            for i in range(0, len(images), RESIZE_CHUNK)]
  return np.concatenate(chunks)


def random_horizontal_flip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Mirrors each image of [N,H,W,C] left-right with probability 1/2."""
  flip = rng.random(len(images)) < 0.5
  return np.where(flip[:, None, None, None], images[:, :, ::-1], images)
