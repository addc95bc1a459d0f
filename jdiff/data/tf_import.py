"""TensorFlow, imported on first use and with the GPUs hidden from it.

TF only feeds data here; the GPUs belong to JAX. Importing TF costs seconds and hundreds of MB, so code that needs
no data (a config, `dataset_info`, sampling) never pays for it.
"""
import functools
import os

# TF only decodes, resizes and batches here; without its oneDNN rewrites those ops give the same numbers on every
# CPU (TF documents that the rewrites change round-off), and TF prints no notice about them.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


@functools.cache
def tensorflow():
  """The `tensorflow` module, made to see no GPU before anything in this process first uses it."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    pass  # TF set up its devices before this call; the code that did so chose them.
  return tf
