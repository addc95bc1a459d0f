"""The FID Inception network against pytorch-fid's, on random weights (tests/fixtures/inception_random.npz, made by
bench/inception_fixture.py), and its weight files."""
import ast
import os

import numpy as np
import pytest

from bench import inception_fixture
from jdiff.metrics import inception

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "inception_random.npz")


@pytest.fixture(scope="module")
def reference():
  with np.load(FIXTURE) as data:
    return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def state(reference):
  return inception_fixture.random_state(inception.expected_state_shapes())


def test_reads_every_tensor_of_pytorch_fids_network_with_its_shape(reference):
  theirs = {str(name): tuple(ast.literal_eval(str(shape))) for name, shape in zip(reference["names"], reference["shapes"])}
  assert inception.expected_state_shapes() == theirs
  assert len(theirs) == 470  # 94 convolutions, each with batch norm's four vectors


@pytest.mark.parametrize("size", [7, 23])
def test_resize_is_torchs_bilinear_interpolation(reference, size):
  ours = inception.resize_bilinear(reference["resize_in"][None], size)[0]
  np.testing.assert_allclose(ours, reference[f"resize_{size}"], atol=1e-4)


def test_features_match_pytorch_fid_on_random_weights(reference, state):
  features = inception.InceptionFeatures(inception.params_from_state(state))
  errors = []
  for i, images in enumerate(inception_fixture.input_images()):
    ours, theirs = features(images), reference[f"features_{i}"]
    assert ours.shape == (len(images), inception.FEATURES)
    errors.append(np.abs(ours - theirs).max())
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
  print(f"max |ours - pytorch-fid| {max(errors):.2e}, features up to {np.abs(reference['features_0']).max():.2f}")


def test_npz_weights_load_and_bad_files_are_refused(tmp_path, state):
  path = str(tmp_path / "inception.npz")
  np.savez(path, **state)
  params = inception.load_params(path)
  assert params["Mixed_7c"]["branch_pool"]["conv"]["kernel"].shape == (1, 1, 2048, 192)
  np.testing.assert_array_equal(params["Conv2d_1a_3x3"]["conv"]["kernel"],
                                state["Conv2d_1a_3x3.conv.weight"].transpose(2, 3, 1, 0))
  with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth"):
    inception.load_params(str(tmp_path / "absent.pth"))
  partial = dict(state)
  del partial["Mixed_6b.branch1x1.bn.running_var"]
  np.savez(tmp_path / "partial.npz", **partial)
  with pytest.raises(ValueError, match="1 tensors are missing, e.g. Mixed_6b.branch1x1.bn.running_var"):
    inception.load_params(str(tmp_path / "partial.npz"))
