"""Input data: TFDS image datasets as deterministic, resumable numpy batch iterators, plus offline datasets.

Importing this package registers the offline TFDS builders `sklearn_digits` and `shapes`. TensorFlow is imported
(with the GPUs hidden from it) only when data is built or read, so configs and `dataset_info` stay light.
"""
from jdiff.data import tf_import  # noqa: F401  (first: it sets TensorFlow's environment before TF loads)
from jdiff.data.images import resize_images
from jdiff.data.sources import DatasetUnavailableError
from jdiff.data.digits import SklearnDigits, digits_split
from jdiff.data.shapes import Shapes, shapes_examples, shapes_split
from jdiff.data.pipeline import DatasetInfo, dataset_info, load_split, local_batch_size, make_train_iterator

__all__ = [
    "DatasetInfo",
    "DatasetUnavailableError",
    "Shapes",
    "SklearnDigits",
    "dataset_info",
    "digits_split",
    "load_split",
    "local_batch_size",
    "make_train_iterator",
    "resize_images",
    "shapes_examples",
    "shapes_split",
]
