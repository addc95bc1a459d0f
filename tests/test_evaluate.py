"""Sample quality and likelihood of a trained model: jdiff.metrics.quality, jdiff-evaluate and training.eval_every, on
the tiny run, with a feature network trained briefly on the tests' digits."""
import json

import numpy as np
import pytest

import jdiff
from jdiff.cli import evaluate as evaluate_cli
from jdiff.config import parse_config
from jdiff.metrics import features, fid, quality
from jdiff.train import unet
from tests.test_cli import cli


@pytest.fixture(scope="module")
def network(tiny_workdir):
  """The tiny model's feature network, trained 40 steps (the real one trains 1,500) and cached where the tests'
  data lives, so the code under test finds it."""
  return features.dataset_features(quality.model_data(jdiff.load(tiny_workdir)), steps=40)


def test_feature_network_is_cached_and_names_its_space(network, tiny_workdir):
  again = quality.own_features(jdiff.load(tiny_workdir))
  assert again.space == network.space and network.space.startswith("sklearn_digits-features-v1-8x8x1-")
  real = quality.real_split(jdiff.load(tiny_workdir), "train")
  standardised = network(real.images)
  assert standardised.shape == (1437, 64)
  np.testing.assert_allclose(standardised.mean(axis=0), 0, atol=1e-3)
  np.testing.assert_allclose(standardised.std(axis=0), 1, atol=1e-3)
  assert set(network.accuracy) == {"label"} and network.accuracy["label"] > 0.3  # 40 steps: better than chance


class Recorder:
  def __init__(self):
    self.scalars = {}

  def write_scalars(self, step, scalars):
    self.scalars[step] = dict(scalars)


def test_training_evaluation_is_the_distance_of_the_checkpoints_samples(network, tiny_run):
  config = parse_config(dict(tiny_run.config, training=dict(tiny_run.config["training"], eval_samples=20)))
  trainer = unet.UNetTrainer(config, tiny_run.config, tiny_run.workdir, jdiff.sharding.make_mesh(), 20)
  writer = Recorder()
  result = trainer.evaluate(tiny_run.state, 20, writer)
  assert writer.scalars[20] == {"eval/fd_sklearn_digits_features": result["fd"],
                                "eval/kd_sklearn_digits_features": result["kd"]}
  pipe = jdiff.load(tiny_run.workdir)
  held_out = quality.real_split(pipe, "test")
  images, _ = quality.generate_like(pipe, held_out, 20, warm_up=False)
  np.testing.assert_array_equal(pipe.generate(num=20, label=held_out.labels["label"][:20]).images, images)
  reference = fid.FeatureStats.of(network(quality.real_split(pipe, "train").images), network.space)
  assert result["fd"] == pytest.approx(fid.stats_distance(fid.FeatureStats.of(network(images), "x"),
                                                          fid.FeatureStats.of(reference.features, "x")), rel=1e-5)


@pytest.mark.slow  # trains or compiles enough to crowd the fast tier
def test_evaluate_cli_reports_distances_and_bits_per_dim(network, tiny_workdir, tmp_path, capsys):
  out = tmp_path / "eval.json"
  code, stdout, err = cli(evaluate_cli, capsys, "--workdir", tiny_workdir, "--metric", "fd,kd,bpd,ode_bpd", "--num", 12,
                          "--steps", 3, "--likelihood_num", 6, "--vlb_timesteps", 5, "--ode_steps", 4, "--out", out)
  assert code == 0, err
  results = json.loads(out.read_text())
  assert f"fd: {results['fd']:.4g}  [Fréchet distance on sklearn_digits features]" in stdout
  assert results["fd"] > 0 and results["kd_std"] > 0 and results["num"] == 12
  # An untrained-looking model on 8x8 digits: far worse than 8 bits per dimension, and finite.
  assert 8 < results["bpd"] < 100 and results["bpd_standard_error"] > 0
  assert 0 < results["ode_bpd"] < 100 and f"ode_bpd: {results['ode_bpd']:.4g}" in stdout
  reference = tmp_path / "ref.npz"
  code, stdout, err = cli(evaluate_cli, capsys, "--workdir", tiny_workdir, "--write_reference", reference)
  assert code == 0, err
  stats = fid.FeatureStats.load(str(reference))
  assert stats.count == 1437 and stats.space == network.space


@pytest.mark.parametrize("args, message", [
    (["--metric", "fid"], "needs the Inception weights: pass --inception PATH to pytorch-fid's weights (https://"),
    (["--metric", "fd,FID"], "--metric='fd,FID': unknown FID; choose from fid, kid, fd, kd, bpd, ode_bpd"),
    (["--inception", "missing.pth"], "no Inception weights at 'missing.pth': download pytorch-fid's "
                                     "pt_inception-2015-12-05-6726825d.pth"),
    (["--reference", "missing.npz"], "--reference='missing.npz' does not exist; write one with --write_reference"),
    (["--num", "1"], "--num=1 must be at least 2"),
    (["--out", "eval.txt"], "--out='eval.txt' must end in .json"),
])
def test_evaluate_cli_rejects_bad_options_with_one_line(tiny_workdir, capsys, args, message):
  code, _, err = cli(evaluate_cli, capsys, "--workdir", tiny_workdir, *args)
  assert code == 2 and err.count("\n") == 1 and message in err, err


def test_training_logs_the_distance_every_eval_every_steps(network, tmp_path):
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  from jdiff.configs import tiny
  from jdiff.train import train_and_evaluate
  raw = tiny.get_config()
  raw.training.update(num_steps=2, checkpoint_every=2, eval_every=1, eval_samples=8)
  train_and_evaluate(raw, str(tmp_path))
  events = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
  events.Reload()
  logged = events.Tensors("eval/fd_sklearn_digits_features")
  assert [e.step for e in logged] == [1, 2]
  assert all(0 < float(tensor_util.make_ndarray(e.tensor_proto)) < 1e4 for e in logged)


@pytest.mark.multidevice
def test_feature_batches_are_split_over_every_device_and_padded():
  import jax
  images = (np.arange(13 * 4 * 4) % 7).astype(np.float32).reshape(13, 4, 4, 1)
  weights = (np.arange(16 * 3) % 5 - 2).astype(np.float32).reshape(16, 3)  # small integers: exact in float32
  shapes, devices = [], []

  def apply(params, batch):
    shapes.append(batch.shape[0])
    devices.append(len(batch.sharding.device_set))
    return jax.jit(lambda p, x: x.reshape(x.shape[0], -1) @ p)(params, batch)

  out = features.batched(apply, weights, images, batch_size=5)
  np.testing.assert_array_equal(out, images.reshape(13, -1) @ weights)
  assert shapes == [8, 8] and devices == [8, 8]  # 5 rounded up to the 8 devices; the last batch padded from 5
