"""The notebook API on the shared tiny work dir: loading, generate's options and their errors, Samples, inversion,
interpolation, pipelines from training's state, and inference that imports nothing of training."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import jdiff
from jdiff import images as imaging
from jdiff.configs import tiny


@pytest.fixture(scope="module")
def pipe(tiny_workdir):
  return jdiff.load(tiny_workdir)


def test_load_picks_checkpoints_and_names_what_is_missing(tiny_workdir, tmp_path):
  assert jdiff.load(tiny_workdir).step == 20 and jdiff.load(tiny_workdir, step=10).step == 10
  with pytest.raises(FileNotFoundError, match="no checkpoints in work dir"):
    jdiff.load(str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="available steps: 10, 20"):
    jdiff.load(tiny_workdir, step=15)


def test_each_image_depends_on_its_seed_alone(pipe):
  whole = pipe.generate(num=5, seed=10, steps=3, sampler="euler_ancestral")
  chunked = pipe.generate(num=5, seed=10, steps=3, sampler="euler_ancestral", batch_size=2)
  np.testing.assert_array_equal(whole.images, chunked.images)
  assert whole.labels.tolist() == [0, 1, 2, 3, 4] and whole.seeds.tolist() == [10, 11, 12, 13, 14]
  fourth = pipe.generate(num=1, seed=13, label=3, steps=3, sampler="euler_ancestral")
  np.testing.assert_array_equal(fourth.images[0], whole.images[3])


def test_given_latents_replace_the_seeds_noise(pipe):
  noise = np.random.default_rng(0).standard_normal((3, 8, 8, 1)).astype(np.float32)
  seeded = pipe.generate(num=3, seed=0, steps=4)
  from jdiff import generate as gen
  own_noise = np.asarray(gen.seeded_noise(pipe.noise_shape, np.arange(3))[0])
  np.testing.assert_array_equal(pipe.generate(latents=own_noise, steps=4).images, seeded.images)
  assert not np.array_equal(pipe.generate(latents=noise, steps=4).images, seeded.images)


def test_guidance_steers_away_from_the_negative_label(pipe):
  """At guidance scale 0 only the negative (unconditional) half of the batch counts: sampling label 3 away from
  label 8 at scale 0 is sampling label 8 without guidance."""
  away = pipe.generate(num=4, seed=0, label=3, negative_label=8, guidance_scale=0.0, steps=4).images
  eight = pipe.generate(num=4, seed=0, label=8, guidance_scale=1.0, steps=4).images
  assert np.abs(away.astype(int) - eight).max() <= 1


def test_options_are_checked_before_sampling(pipe):
  with pytest.raises(ValueError, match="steps=5000 must be an integer between 1 and the model's 1000"):
    pipe.generate(num=2, steps=5000)
  with pytest.raises(ValueError, match="guidance_rescale=1.5 must be in"):
    pipe.generate(num=2, guidance_rescale=1.5)
  with pytest.raises(ValueError, match="unknown spacing 'cosine'"):
    pipe.generate(num=2, spacing="cosine")
  with pytest.raises(ValueError, match="got 3 labels for 2 images"):
    pipe.generate(num=2, label=[1, 2, 3])
  with pytest.raises(ValueError, match="prompt='a red square' given, but this model takes no text"):
    pipe.generate("a red square")
  assert pipe.generate(label=[1, 2, 3], steps=2).labels.tolist() == [1, 2, 3]  # num from the list


def test_samples_tile_into_grids_and_save_as_png_and_npz(pipe, tmp_path):
  samples = pipe.generate(num=20, steps=2)
  assert samples.columns == 10  # one column per class
  grid = samples.grid()
  assert grid.size == (10 * 10 + 2, 2 * 10 + 2) and grid.mode == "L"  # 8x8 tiles, 2-pixel gaps
  np.testing.assert_array_equal(np.asarray(grid)[2:10, 2:10], samples.images[0, ..., 0])
  np.testing.assert_array_equal(np.asarray(samples.to_pil()[7]), samples.images[7, ..., 0])
  samples.save(str(tmp_path / "grid.png"))
  big = Image.open(tmp_path / "grid.png")
  assert big.size == (102 * 3, 22 * 3)  # upscaled to at least 256 pixels
  samples.save(str(tmp_path / "raw.npz"))
  raw = np.load(tmp_path / "raw.npz")
  np.testing.assert_array_equal(raw["images"], samples.images)
  assert raw["labels"].tolist() == samples.labels.tolist() and raw["seeds"].tolist() == list(range(20))
  with pytest.raises(ValueError, match="use a .png"):
    samples.save(str(tmp_path / "grid.jpg"))


def test_training_writes_the_grid_that_the_pipeline_samples(tiny_workdir, pipe):
  """The sample grid written at step 20 is the EMA pipeline's 20 samples of seeds 0..19, one column per class."""
  written = np.asarray(Image.open(os.path.join(tiny_workdir, "samples", "step_0000020.png")))
  expected = imaging.make_grid(pipe.generate(num=tiny.get_config().sampling.num_samples).images, 10)[..., 0]
  scale = written.shape[0] // expected.shape[0]
  assert scale >= 2 and written.shape == (expected.shape[0] * scale, expected.shape[1] * scale)
  assert np.abs(written[::scale, ::scale].astype(int) - expected).max() <= 1


def test_from_state_samples_what_load_samples(tiny_run, pipe):
  in_memory = jdiff.from_state(tiny_run.config, tiny_run)
  assert in_memory.step == 20
  np.testing.assert_array_equal(in_memory.generate(num=3, steps=3).images, pipe.generate(num=3, steps=3).images)


def test_ddim_inversion_round_trip(pipe):
  images = pipe.generate(num=4, seed=5, label=1, steps=20, guidance_scale=1.0, spacing="linspace").images
  noise = pipe.invert(images, label=1, steps=50, spacing="linspace", refine=2)
  back = pipe.generate(latents=noise, label=1, steps=50, spacing="linspace", sampler="ddim", eta=0.0,
                       guidance_scale=1.0).images
  assert noise.shape == (4, 8, 8, 1)
  assert np.abs(back.astype(np.float64) - images).mean() / 255 < 0.02


@pytest.mark.slow  # trains or compiles enough to crowd the fast tier
def test_interpolation_starts_at_the_seeds_sample_and_moves_in_small_steps(pipe):
  strip = pipe.interpolate(6, seed=4, label=3, label_end=8, steps=4, spacing="karras", sampler="heun")
  assert strip.images.shape == (6, 8, 8, 1) and strip.labels.tolist() == [3, 3, 3, 8, 8, 8]
  first = pipe.generate(num=1, seed=4, label=3, steps=4, spacing="karras", sampler="heun")
  assert np.abs(strip.images[0].astype(int) - first.images[0]).max() <= 2  # slerp weights round at 1e-7
  frames = pipe.interpolate(9, seed=0, seed_end=1, label=2, steps=4).images.astype(np.float64)
  moves = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))
  assert moves.max() < np.abs(frames[-1] - frames[0]).mean()  # no frame jumps the whole path


INFERENCE_ONLY = """
import sys, time
start = time.perf_counter()
import jdiff
pipe = jdiff.load(sys.argv[1])
pipe.generate(num=2, steps=2)
loaded = sorted(m for m in ("tensorflow", "tensorflow_datasets", "clu", "jdiff.train", "jdiff.data") if m in sys.modules)
print(loaded, round(time.perf_counter() - start, 1))
"""


def test_inference_imports_no_training_tensorflow_or_clu(tiny_workdir):
  out = subprocess.run([sys.executable, "-c", INFERENCE_ONLY, tiny_workdir], capture_output=True, text=True,
                       check=True).stdout
  assert out.startswith("[] "), out
