"""The data layer: the offline `sklearn_digits` builder, the train iterator, offline failures, the classifier."""
import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jdiff.config import DataConfig
from jdiff.data import DatasetUnavailableError, dataset_info, digits_split, make_train_iterator, pipeline, sources
from jdiff.images import model_range_to_uint8, uint8_to_model_range
from jdiff.metrics import digits as evaluation


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  sources.prepare(sources.get_builder("sklearn_digits", path))
  return path


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def image_keys(images):
  return [image.tobytes() for image in images]


@pytest.mark.parametrize("split, size", [("train", 1437), ("test", 360)])
def test_builder_split_matches_scikit_learn_digits(data_dir, split, size):
  arrays = tfds.as_numpy(tfds.builder("sklearn_digits", data_dir=data_dir).as_dataset(split=split, batch_size=-1))
  images, labels = arrays["image"], arrays["label"]
  assert images.shape == (size, 8, 8, 1) and images.dtype == np.uint8
  assert images.min() == 0 and images.max() == 255
  assert set(labels.tolist()) == set(range(10))
  expected_images, expected_labels = digits_split(split)
  # TFDS stores the examples in its own (fixed) order.
  assert sorted(zip(image_keys(images), labels)) == sorted(zip(image_keys(expected_images), expected_labels))


def test_test_split_is_balanced():
  _, labels = digits_split("test")
  assert np.bincount(labels).tolist() == [36] * 10


def test_dataset_info_needs_no_data(tmp_path):
  assert dataset_info(DataConfig(image_size=16, data_dir=str(tmp_path))) == pipeline.DatasetInfo((16, 16, 1), 10)
  mnist = dataset_info(DataConfig(name="mnist", image_size=32, data_dir=str(tmp_path)))
  assert mnist.image_shape == (32, 32, 1) and mnist.channels == 1 and mnist.num_classes == 10


@pytest.mark.parametrize("image_size", [8, 16, 32])
def test_batches_have_model_shapes_and_range(data_dir, image_size):
  batch = next(make_train_iterator(DataConfig(image_size=image_size, data_dir=data_dir), 32, seed=0))
  assert batch["image"].shape == (32, image_size, image_size, 1) and batch["image"].dtype == np.float32
  assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0
  assert batch["label"].shape == (32,) and batch["label"].dtype == np.int32
  assert 0 <= batch["label"].min() and batch["label"].max() < 10


def test_same_seed_same_batches_other_seed_other_batches(data_dir):
  config = DataConfig(data_dir=data_dir)
  first, again, other = (take(make_train_iterator(config, 64, seed), 3) for seed in (0, 0, 1))
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  same_place = lambda a, b: np.mean(np.all(a == b, axis=(1, 2, 3)))  # share of rows holding the same image
  assert same_place(first[0]["image"], other[0]["image"]) < 0.05  # by chance about 1 in 144


def test_epochs_cover_the_split_in_new_orders(data_dir):
  batches = take(make_train_iterator(DataConfig(image_size=8, data_dir=data_dir), 479, seed=0), 6)
  epochs = [np.concatenate([b["image"] for b in batches[i:i + 3]]) for i in (0, 3)]
  assert all(len(set(image_keys(epoch))) == 1437 for epoch in epochs)
  assert np.mean(np.all(epochs[0] == epochs[1], axis=(1, 2, 3))) < 0.05  # a new permutation, not the old one


@pytest.mark.parametrize("start_step", [1, 30])  # 30 lies in the second epoch (22 steps of 64 each).
def test_start_step_resumes_where_an_uninterrupted_run_is(data_dir, start_step):
  config = DataConfig(data_dir=data_dir, random_flip=True)
  skipped = take(make_train_iterator(config, 64, seed=3), start_step + 2)[start_step:]
  resumed = take(make_train_iterator(config, 64, seed=3, start_step=start_step), 2)
  for a, b in zip(skipped, resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_random_flip_mirrors_some_images(data_dir):
  plain, flipped = (next(make_train_iterator(DataConfig(data_dir=data_dir, random_flip=flip), 64, seed=0))["image"]
                    for flip in (False, True))
  same = [np.array_equal(p, f) for p, f in zip(plain, flipped)]
  mirrored = [np.array_equal(p[:, ::-1], f) for p, f in zip(plain, flipped)]
  assert all(s or m for s, m in zip(same, mirrored)) and 0 < sum(mirrored) < 64


def test_processes_get_disjoint_local_batches(data_dir):
  config = DataConfig(data_dir=data_dir)
  iterators = [make_train_iterator(config, 64, seed=0, process_index=i, process_count=4) for i in range(4)]
  for _ in range(3):
    images = [next(iterator)["image"] for iterator in iterators]
    assert all(local.shape == (16, 16, 16, 1) for local in images)
    assert len(set(image_keys(np.concatenate(images)))) == 64


def test_streamed_path_is_deterministic_and_resumable(data_dir, monkeypatch):
  monkeypatch.setattr(pipeline, "IN_MEMORY_LIMIT_BYTES", 0)
  config = DataConfig(data_dir=data_dir, random_flip=True, shuffle_buffer=300)
  batches = take(make_train_iterator(config, 32, seed=0), 4)
  again = take(make_train_iterator(config, 32, seed=0, start_step=2), 2)
  assert batches[0]["image"].shape == (32, 16, 16, 1) and batches[0]["label"].dtype == np.int32
  for a, b in zip(batches[2:], again):
    np.testing.assert_array_equal(a["image"], b["image"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_size=30, process_count=4), "multiple of the process count"),
    (dict(batch_size=32, process_index=4, process_count=4), "process_index"),
    (dict(batch_size=2048), "larger than this process's shard"),
])
def test_bad_batch_layouts_are_refused(data_dir, kwargs, message):
  with pytest.raises(ValueError, match=message):
    make_train_iterator(DataConfig(data_dir=data_dir), seed=0, **kwargs)


def test_unknown_split_is_refused(data_dir):
  with pytest.raises(ValueError, match="validation"):
    make_train_iterator(DataConfig(split="validation", data_dir=data_dir), 32, seed=0)


@pytest.mark.parametrize("field, value", [
    ("name", ""), ("split", 3), ("image_size", 0), ("image_size", True), ("random_flip", 1), ("data_dir", ""),
    ("shuffle_buffer", -1)])
def test_config_validation_names_the_field(field, value):
  with pytest.raises(ValueError, match=f"^{field}={value!r} is not allowed: must be"):
    DataConfig(**{field: value})


def test_unknown_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(DatasetUnavailableError, match="Unknown dataset 'no_such_dataset'"):
    make_train_iterator(DataConfig(name="no_such_dataset", data_dir=str(tmp_path)), 32, seed=0)


def assert_says_how_to_fix(error, data_dir):
  message = str(error)
  assert "'mnist'" in message and data_dir in message
  assert f"tfds build mnist --data_dir {data_dir}" in message
  assert f"--config.data.data_dir={data_dir}" in message and "sklearn_digits" in message


def test_unprepared_dataset_without_network_fails_fast_with_the_fix(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "internet_reachable", lambda: False)
  with pytest.raises(DatasetUnavailableError) as error:
    make_train_iterator(DataConfig(name="mnist", data_dir=str(tmp_path)), 32, seed=0)
  assert_says_how_to_fix(error.value, str(tmp_path))


def test_offline_check_probes_once_with_a_bounded_timeout_and_never_downloads(tmp_path, monkeypatch):
  probes = []

  def unreachable(address, timeout):
    probes.append((address, timeout))
    raise OSError("network is unreachable")

  monkeypatch.setattr(socket, "create_connection", unreachable)
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", lambda *a, **k: pytest.fail("downloaded"))
  with pytest.raises(DatasetUnavailableError) as error:
    make_train_iterator(DataConfig(name="mnist", data_dir=str(tmp_path)), 32, seed=0)
  assert probes == [(sources.PROBE_HOST, sources.PROBE_TIMEOUT_S)] and sources.PROBE_TIMEOUT_S <= 5
  assert_says_how_to_fix(error.value, str(tmp_path))


def test_uint8_and_model_range_round_trip():
  images = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  np.testing.assert_array_equal(model_range_to_uint8(uint8_to_model_range(images)), images)
  assert model_range_to_uint8(np.array([-3.0, 3.0])).tolist() == [0, 255]


def test_classifier_reads_real_test_digits():
  classifier = evaluation.make_digit_classifier(16)
  images, labels = evaluation.real_digits("test", 16)
  assert evaluation.digit_accuracy(images, labels, classifier) >= 0.9
  with pytest.raises(ValueError, match="model_range_to_uint8"):
    classifier.predict(uint8_to_model_range(images))


def test_classifier_sees_what_training_sees(data_dir):
  images, _ = evaluation.real_digits("train", 16)
  served = make_train_iterator(DataConfig(image_size=16, data_dir=data_dir), 1437, seed=0)
  assert sorted(image_keys(model_range_to_uint8(next(served)["image"]))) == sorted(image_keys(images))
