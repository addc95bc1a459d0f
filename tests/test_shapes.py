"""The offline captioned `shapes` dataset (determinism, held-out pairs, captions, drawn areas, TFDS, the pipeline) and
the pixel-level detector of colour and shape that measures prompt adherence on it."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from jdiff.config import DataConfig
from jdiff.data import (dataset_info, make_train_iterator, resize_images, shapes, shapes_examples,
                        shapes_split, sources)
from jdiff.metrics import shapes as adherence


@pytest.fixture(scope="module")
def data_dir():
  """conftest's TFDS_DATA_DIR, where the text tests read `shapes` too: it is built once and kept between runs."""
  builder = sources.get_builder("shapes", None)
  sources.prepare(builder)
  return str(builder.data_dir_root)


def test_same_seed_same_examples_other_seed_other_examples():
  first, again, other = (shapes_examples(50, seed) for seed in (3, 3, 4))
  for key in first:
    np.testing.assert_array_equal(first[key], again[key])
  assert np.mean(np.all(first["image"] == other["image"], axis=(1, 2, 3))) == 0


def test_held_out_pairs_only_in_heldout_split():
  held = set(shapes.held_out_labels())
  assert len(held) == 3
  train = shapes_split("train")
  assert set(train["label"].tolist()) == set(range(18)) - held
  assert not held & set(shapes_split("test")["label"].tolist())
  assert set(shapes_split("heldout")["label"].tolist()) == held
  # Each held-out pair's colour and shape both occur in train, only not together.
  for colour, shape in shapes.HELD_OUT_PAIRS:
    assert (train["colour"] == shapes.COLOURS.index(colour)).any()
    assert (train["shape"] == shapes.SHAPES.index(shape)).any()


def test_captions_name_the_attributes():
  examples = shapes_examples(400, seed=0)
  kinds = set()
  for i, text in enumerate(examples["caption"]):
    colour, shape = shapes.COLOURS[examples["colour"][i]], shapes.SHAPES[examples["shape"][i]]
    size, position = shapes.SIZES[examples["size"][i]], shapes.POSITIONS[examples["position"][i]]
    assert f"{colour} {shape}" in text and text.startswith("a ")
    has_size, has_position = text.startswith(f"a {size} "), text.endswith(position)
    size_or_none = examples["size"][i] if has_size else None
    position_or_none = examples["position"][i] if has_position else None
    assert text == shapes.caption(examples["colour"][i], examples["shape"][i], size_or_none, position_or_none)
    kinds.add((has_size, has_position))
    assert examples["label"][i] == shapes.pair_label(examples["colour"][i], examples["shape"][i])
  assert kinds == {(True, True), (True, False), (False, True), (False, False)}
  assert shapes.caption(0, 2, 1, 0) == "a large red triangle at the top left"
  assert shapes.caption(3, 1, None, 4) == "a yellow square in the center"


@pytest.mark.parametrize("shape, area", [(0, np.pi), (1, 4.0), (2, 2.0)])  # area / half_extent**2
def test_drawn_area_and_colour_match_the_shape(shape, area):
  size, half, level = 256, 0.25, 20.0
  rgb = np.array([[200.0, 100.0, 50.0]])
  image = shapes.render(np.array([shape]), np.array([[0.5, 0.5]]), np.array([half]), rgb, np.array([level]), size)[0]
  coverage = (image[..., 0].astype(np.float64) - level) / (rgb[0, 0] - level)
  np.testing.assert_allclose(coverage.sum() / (half * size)**2, area, rtol=2e-3)
  np.testing.assert_array_equal(image[size // 2, size // 2], [200, 100, 50])
  np.testing.assert_array_equal(image[2, 2], [20, 20, 20])


def test_triangle_points_up():
  image = shapes.render(np.array([2]), np.array([[0.5, 0.5]]), np.array([0.3]), np.array([[255.0, 255, 255]]),
                        np.array([0.0]), 64)[0, ..., 0]
  widths = (image > 127).sum(axis=1)
  rows = np.flatnonzero(widths)
  assert widths[rows[0]] <= 2 and widths[rows[-1]] >= 36 and np.all(np.diff(widths[rows]) >= 0)


def test_examples_cover_the_training_pairs_evenly():
  examples = shapes_examples(3000, seed=1)
  assert examples["image"].shape == (3000, 32, 32, 3) and examples["image"].dtype == np.uint8
  counts = np.bincount(examples["label"], minlength=len(shapes.LABEL_NAMES))
  held = list(shapes.held_out_labels())
  assert counts[held].sum() == 0
  expected = 3000 / (len(counts) - len(held))  # uniform over the other pairs; a count's std is about sqrt(expected)
  np.testing.assert_allclose(np.delete(counts, held), expected, atol=4 * np.sqrt(expected))


def test_builder_stores_the_drawn_splits(data_dir):
  builder = tfds.builder("shapes", data_dir=data_dir)
  assert {name: split.num_examples for name, split in builder.info.splits.items()} == shapes.SPLIT_SIZES
  stored = tfds.as_numpy(builder.as_dataset(split="heldout", batch_size=-1, shuffle_files=False))
  expected = shapes_split("heldout")
  # TFDS stores the examples in its own (fixed) order.
  keys = lambda images, captions: sorted(zip((i.tobytes() for i in images), captions))
  assert keys(stored["image"], [c.decode() for c in stored["caption"]]) == keys(expected["image"], expected["caption"])
  assert builder.info.features["label"].names[:2] == ["red circle", "red square"]


def test_train_iterator_serves_shapes(data_dir):
  config = DataConfig(name="shapes", image_size=16, data_dir=data_dir)
  assert dataset_info(config).image_shape == (16, 16, 3) and dataset_info(config).num_classes == 18
  batch = next(make_train_iterator(config, 32, seed=0))
  assert batch["image"].shape == (32, 16, 16, 3) and -1 <= batch["image"].min() and batch["image"].max() <= 1
  assert not set(batch["label"].tolist()) & set(shapes.held_out_labels())


def test_detector_reads_colour_and_shape_of_real_images():
  examples = {key: np.concatenate([a, b]) for (key, a), b in zip(shapes_examples(200, seed=7).items(),
                                                                  shapes_examples(100, seed=7, heldout=True).values())}
  for size in (16, 32):
    found = adherence.detect(resize_images(examples["image"], size))
    np.testing.assert_array_equal(found.colour, examples["colour"])
    np.testing.assert_array_equal(found.shape, examples["shape"])
  blank = np.full((2, 16, 16, 3), 30, np.uint8)
  assert adherence.detect(blank).shape.tolist() == [-1, -1]
  assert adherence.accuracy(blank, np.zeros(2, int), np.zeros(2, int)) == {"colour": 0.0, "shape": 0.0, "both": 0.0}
