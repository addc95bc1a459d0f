"""Input data: TFDS image datasets as deterministic, resumable numpy batch iterators, plus offline datasets.

Importing this package registers the offline TFDS builders `sklearn_digits` and `shapes`. TensorFlow is imported
(with the GPUs hidden from it) only when data is built or read, so configs and `dataset_info` stay light.
"""
from jdiff.data.images import model_range_to_uint8, resize_images, uint8_to_model_range
from jdiff.data.sources import DatasetUnavailableError
from jdiff.data.digits import SklearnDigits, digits_split
from jdiff.data.shapes import Shapes, shapes_examples, shapes_split
from jdiff.data.pipeline import (DataConfig, DatasetInfo, dataset_info, load_split, local_batch_size,
                                 make_train_iterator)

__all__ = [
    "DataConfig",
    "DatasetInfo",
    "DatasetUnavailableError",
    "Shapes",
    "SklearnDigits",
    "dataset_info",
    "digits_split",
    "load_split",
    "local_batch_size",
    "make_train_iterator",
    "model_range_to_uint8",
    "resize_images",
    "shapes_examples",
    "shapes_split",
    "uint8_to_model_range",
]
