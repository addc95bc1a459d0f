"""train.py and sample.py end to end on the tiny config, the notebook API, and their error messages."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import jdiff

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args):
  env = dict(os.environ, JDIFF_COMPILATION_CACHE=os.environ.get("JDIFF_TEST_CACHE", os.path.join(
      ROOT, ".pytest_cache", "jax")))
  return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A work dir trained by train.py on the tiny config (20 steps, checkpoints at 10 and 20)."""
  root = tmp_path_factory.mktemp("cli")
  result = run("train.py", "--config", "configs/tiny.py", "--workdir", str(root / "run"),
               f"--config.data.data_dir={root / 'tfds'}", "--config.training.num_steps=20")
  assert result.returncode == 0, result.stderr[-3000:]
  return root / "run"


def test_train_cli_writes_checkpoints_logs_and_a_sample_grid(workdir):
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "20"]
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
  grid = np.asarray(Image.open(workdir / "samples" / "step_0000020.png"))
  assert grid.ndim == 2 and grid.std() > 0  # grayscale, not blank


def test_sample_cli_writes_a_grid_and_raw_arrays_reproducibly(workdir, tmp_path):
  png, npz = tmp_path / "grid.png", tmp_path / "sevens.npz"
  result = run("sample.py", "--workdir", str(workdir), "--num", "20", "--steps", "4", "--out", str(png))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "wrote 20 images from checkpoint 20" in result.stdout
  assert Image.open(png).size[0] >= 256
  result = run("sample.py", "--workdir", str(workdir), "--num", "6", "--steps", "4", "--label", "7", "--seed", "3",
               "--guidance", "2.5", "--sampler", "dpmpp_2m", "--out", str(npz))
  assert result.returncode == 0, result.stderr[-3000:]
  arrays = np.load(npz)
  assert arrays["images"].shape == (6, 8, 8, 1) and arrays["images"].dtype == np.uint8
  assert arrays["labels"].tolist() == [7] * 6 and arrays["seeds"].tolist() == list(range(3, 9))
  # The notebook API with the same options gives the same pixels in this process.
  same = jdiff.load(str(workdir)).generate(6, seed=3, label=7, steps=4, guidance=2.5, sampler="dpmpp_2m")
  np.testing.assert_array_equal(same.images, arrays["images"])


@pytest.mark.parametrize("args, message", [
    (["--sampler", "ddmi"], "unknown sampler 'ddmi'; choose one of ddpm, ddim, euler"),
    (["--label", "10"], "label 10 is outside this model's classes: use 0..9"),
    (["--out", "grid.jpg"], "must end in .png (a grid) or .npz"),
])
def test_sample_cli_rejects_bad_options_with_one_line(workdir, args, message):
  result = run("sample.py", "--workdir", str(workdir), "--num", "2", *args)
  assert result.returncode == 2
  assert message in result.stderr and "Traceback" not in result.stderr


def test_sample_cli_never_overwrites_unless_asked(workdir, tmp_path):
  out = tmp_path / "keep.png"
  out.write_bytes(b"precious")
  result = run("sample.py", "--workdir", str(workdir), "--num", "2", "--steps", "2", "--out", str(out))
  assert result.returncode == 2 and "pass --overwrite" in result.stderr
  assert out.read_bytes() == b"precious"


def test_train_cli_reports_an_undownloadable_dataset_and_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  result = run("train.py", "--config", "configs/tiny.py", "--workdir", str(workdir), "--config.data.name=mnist",
               f"--config.data.data_dir={tmp_path / 'tfds'}")
  assert result.returncode == 2
  assert "mnist" in result.stderr and "tfds build mnist" in result.stderr and "Traceback" not in result.stderr
  assert not workdir.exists()


def test_notebook_api_errors(workdir, tmp_path):
  pipe = jdiff.load(str(workdir), step=10)
  assert pipe.step == 10
  with pytest.raises(FileNotFoundError, match="no checkpoints in work dir"):
    jdiff.load(str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="available steps: 10, 20"):
    jdiff.load(str(workdir), step=15)
  with pytest.raises(ValueError, match="steps=5000 must be between 1 and the model's 1000"):
    pipe.generate(2, steps=5000)


def test_generate_is_deterministic_per_seed_and_independent_of_batching(workdir):
  pipe = jdiff.load(str(workdir))
  whole = pipe.generate(5, seed=10, steps=3, sampler="euler_ancestral")
  chunked = pipe.generate(5, seed=10, steps=3, sampler="euler_ancestral", batch_size=2)
  np.testing.assert_array_equal(whole.images, chunked.images)
  assert whole.labels.tolist() == [0, 1, 2, 3, 4]
  other = pipe.generate(5, seed=11, steps=3, sampler="euler_ancestral")
  assert not np.array_equal(whole.images, other.images)


def test_sample_cli_writes_an_interpolation_strip(workdir, tmp_path):
  out = tmp_path / "strip.npz"
  result = run("sample.py", "--workdir", str(workdir), "--interpolate", "6", "--seed", "4", "--label", "3",
               "--label_end", "8", "--steps", "4", "--spacing", "karras", "--sampler", "heun", "--out", str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  strip = np.load(out)
  assert strip["images"].shape == (6, 8, 8, 1) and strip["labels"].tolist() == [3, 3, 3, 8, 8, 8]
  # The first frame is the plain sample of its seed and label (up to float rounding of the slerp weights).
  pipe = jdiff.load(str(workdir))
  first = pipe.generate(1, seed=4, label=3, steps=4, spacing="karras", sampler="heun")
  np.testing.assert_allclose(strip["images"][:1].astype(int), first.images.astype(int), atol=2)


def test_interpolation_frames_change_smoothly(workdir):
  pipe = jdiff.load(str(workdir))
  frames = pipe.interpolate(9, seed=0, seed_end=1, label=2, steps=4).images.astype(np.float64)
  steps = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))
  ends = np.abs(frames[-1] - frames[0]).mean()
  assert ends > 0 and steps.max() < ends  # each frame moves less than the whole path


def test_ddim_inversion_round_trip_on_the_trained_model(workdir):
  pipe = jdiff.load(str(workdir))
  images = pipe.generate(4, seed=5, label=1, steps=20, sampler="ddim", guidance=1.0, spacing="linspace").images
  noise = pipe.invert(images, label=1, steps=50, spacing="linspace", refine=2)
  back = pipe.decode(noise, label=1, steps=50, spacing="linspace")
  error = np.abs(back.astype(np.float64) - images).mean() / 255
  assert noise.shape == (4, 8, 8, 1)
  assert error < 0.02, error


def test_negative_label_and_guidance_rescale_change_the_samples(workdir):
  pipe = jdiff.load(str(workdir))
  plain = pipe.generate(4, seed=0, label=3, steps=4, guidance=3.0).images
  negative = pipe.generate(4, seed=0, label=3, steps=4, guidance=3.0, negative_label=8).images
  rescaled = pipe.generate(4, seed=0, label=3, steps=4, guidance=3.0, guidance_rescale=0.7).images
  assert not np.array_equal(plain, negative) and not np.array_equal(plain, rescaled)
  with pytest.raises(ValueError, match="guidance_rescale=1.5 must be in"):
    pipe.generate(2, guidance_rescale=1.5)
  with pytest.raises(ValueError, match="unknown spacing 'cosine'"):
    pipe.generate(2, spacing="cosine")
