"""U-Nets conditioned on images through concatenated input channels (jdiff/conditioning.py): the conditions,
random training masks, PSNR and SSIM in closed form, configs, guidance with a fixed condition, Pipeline.upscale and
Pipeline.inpaint_model, and Stable Diffusion's inpainting pipeline against StableDiffusionInpaintPipeline on the
tiny random one in tests/fixtures/inpainting (written by tests/fixtures/make_inpainting_fixtures.py)."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdiff
from jdiff import build, conditioning, generate as gen, images, samplers
from jdiff.config import ConfigError, parse_config
from jdiff.configs import tiny
from jdiff.metrics import similarity
from jdiff.train.masks import random_masks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "inpainting")


def conditioned_config(kind: str, **model):
  raw = tiny.get_config()
  extra = {"super_resolution": 1, "inpainting": 2}[kind]
  raw.model.update(in_channels=1 + extra, out_channels=1, **model)
  raw.conditioning = dict(kind=kind)
  if not raw.model.num_classes:
    raw.sampling.update(guidance_scale=1.0)
  return raw


# The conditions.

def test_low_resolution_images_are_block_means_rounded_to_8_bits():
  x = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  means = x.reshape(2, 4, 2, 4, 2, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(conditioning.downsample(x, 2), means, atol=1e-6)
  low = np.asarray(conditioning.low_resolution(x, 2))
  np.testing.assert_allclose(low, np.round((means + 1) * 127.5) / 127.5 - 1, atol=1e-6)
  np.testing.assert_array_equal(images.model_range_to_uint8(low), np.round((means + 1) * 127.5))


def test_upsampling_repeats_pixels_or_reproduces_a_linear_ramp_bicubically():
  low = np.linspace(-0.7, 0.7, 8, dtype=np.float32)[None, None, :, None] * np.ones((1, 8, 1, 1), np.float32)
  np.testing.assert_array_equal(conditioning.upsample(low, 16, 16, "nearest"), np.repeat(np.repeat(low, 2, 1), 2, 2))
  cubic = np.asarray(conditioning.upsample(low, 16, 16, "bicubic"))
  step = 1.4 / 7  # the ramp's slope per low-resolution pixel; high-resolution pixel j sits at (j + 0.5) / 2 - 0.5
  expected = -0.7 + step * ((np.arange(16) + 0.5) / 2 - 0.5)
  np.testing.assert_allclose(cubic[0, 5, 4:12, 0], expected[4:12], atol=1e-6)  # Keys' cubic is exact on lines
  with pytest.raises(ValueError, match="choose one of bicubic, nearest"):
    conditioning.upsample(low, 16, 16, "bilinear")


def test_inpainting_condition_is_the_mask_then_the_image_with_the_masked_pixels_zeroed():
  x = np.random.default_rng(1).uniform(-1, 1, (1, 4, 4, 2)).astype(np.float32)
  mask = conditioning.half_mask("right", 4, 4)[None]
  assert mask[0, :, :, 0].tolist() == [[0, 0, 1, 1]] * 4
  cond = np.asarray(conditioning.inpainting_condition(x, mask))
  np.testing.assert_array_equal(cond[..., 0], mask[..., 0])
  np.testing.assert_array_equal(cond[..., 1:], np.where(mask > 0.5, 0.0, x))
  assert conditioning.half_mask("top", 4, 4)[:, 0, 0].tolist() == [1, 1, 0, 0]
  big = np.arange(64, dtype=np.float32).reshape(1, 8, 8, 1)
  np.testing.assert_array_equal(conditioning.mask_to_latent_size(big, 4)[0, :, :, 0], [[0, 4], [32, 36]])


def test_random_masks_are_whole_images_rectangles_or_strokes_in_their_shares():
  draw = jax.jit(random_masks, static_argnums=(1, 2, 3))
  masks = np.asarray(draw(jax.random.key(0), 2000, 16, 16, 0.2))[..., 0]
  full = masks.min(axis=(1, 2)) == 1
  assert abs(full.mean() - 0.2) < 4 * np.sqrt(0.2 * 0.8 / 2000)
  rows, cols = masks.max(axis=2), masks.max(axis=1)
  rectangle = np.all(masks == rows[:, :, None] * cols[:, None, :], axis=(1, 2)) & \
      (rows.sum(1) >= 4) & (cols.sum(1) >= 4)
  rest = ~full
  # Strokes that happen to form a rectangle (a short thick horizontal one) are counted as rectangles.
  assert 0.5 <= rectangle[rest].mean() < 0.7 and np.all(masks[rest].sum(axis=(1, 2)) > 0)
  assert set(np.unique(masks)) == {0.0, 1.0}
  assert np.all(np.asarray(draw(jax.random.key(1), 2000, 16, 16, 1.0)) == 1.0)


# PSNR and SSIM.

def test_psnr_of_a_constant_offset_is_its_closed_form():
  x = np.random.default_rng(2).integers(10, 240, (3, 12, 12, 1)).astype(np.uint8)
  np.testing.assert_allclose(similarity.psnr(x + np.uint8(5), x), 20 * np.log10(255 / 5))
  assert np.all(np.isinf(similarity.psnr(x, x)))


def test_ssim_is_one_on_equal_images_and_the_luminance_term_alone_under_an_offset():
  rng = np.random.default_rng(3)
  x = rng.integers(20, 200, (2, 13, 12, 3)).astype(np.uint8)
  np.testing.assert_allclose(similarity.ssim(x, x), 1.0)
  # y = x + 10 has x's local variance and covariance, so only the luminance term (2 mu_x mu_y + C1) / (...) stays.
  w = similarity.gaussian_window()
  mu = np.array([[[[np.sum(w * x[n, i:i + 11, j:j + 11, c]) for c in range(3)] for j in range(2)] for i in range(3)]
                 for n in range(2)])
  c1 = (0.01 * 255) ** 2
  luminance = (2 * mu * (mu + 10) + c1) / (mu**2 + (mu + 10) ** 2 + c1)
  np.testing.assert_allclose(similarity.ssim_map(x + np.uint8(10), x), luminance, rtol=1e-9)
  a, b = np.full((1, 11, 11, 1), 50, np.uint8), np.full((1, 11, 11, 1), 90, np.uint8)
  np.testing.assert_allclose(similarity.ssim(a, b), (2 * 50 * 90 + c1) / (50**2 + 90**2 + c1))
  with pytest.raises(ValueError, match="at least that size"):
    similarity.ssim(x[:, :10], x[:, :10])


# Configs.

@pytest.mark.parametrize("kind, in_channels, message", [
    ("super_resolution", 3, "in_channels=3 must be 2 for a super-resolution model"),
    ("inpainting", 2, "in_channels=2 must be 3 for an inpainting model"),
    ("none", 2, "in_channels=2 must be 1 for no conditioning"),
])
def test_configs_whose_input_channels_do_not_fit_the_condition_are_refused(kind, in_channels, message):
  raw = tiny.get_config()
  raw.model.update(in_channels=in_channels, out_channels=1)
  raw.conditioning = dict(kind=kind)
  with pytest.raises(ConfigError, match=message):
    parse_config(raw)


def test_conditioning_kinds_and_latent_runs_are_checked():
  raw = conditioned_config("super_resolution")
  raw.conditioning.kind = "colorize"
  with pytest.raises(ConfigError, match="kind='colorize' is not allowed: must be one of none, super_resolution"):
    parse_config(raw)
  raw = conditioned_config("inpainting")
  raw.latent = dict(vae_workdir="vae_digits")
  with pytest.raises(ConfigError, match="trains on pixels"):
    parse_config(raw)
  assert parse_config(conditioned_config("inpainting")).model.cond_channels == 2


# Sampling with a fixed condition.

@pytest.mark.slow  # compiles four U-Net applications: too dear for the fast tier
def test_guidance_runs_both_halves_on_the_same_condition():
  config = parse_config(conditioned_config("inpainting", attention_resolutions=()))
  unet = build.make_model(config)
  params = build.init_params(unet, jax.random.key(0))
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), params)
  rng = np.random.default_rng(4)
  x, cond_image = rng.normal(size=(2, 8, 8, 1)).astype(np.float32), rng.normal(size=(2, 8, 8, 2)).astype(np.float32)
  t, labels, null = jnp.array([10.0, 700.0]), jnp.array([3, 5]), jnp.array([10, 10])

  @jax.jit
  def both(params):
    fn = samplers.guided_model_fn(gen.concat_model_fn(unet, params), guidance_scale=2.5,
                                  uncond={"image": cond_image, "labels": null})
    run = lambda l: unet.apply({"params": params}, jnp.concatenate([x, cond_image], -1), t, l)
    return fn(x, t, {"image": cond_image, "labels": labels}), run(null) + 2.5 * (run(labels) - run(null))
  guided, expected = both(params)
  np.testing.assert_allclose(guided, expected, atol=1e-5)


@pytest.fixture(scope="module")
def sr_pipe():
  config = parse_config(conditioned_config("super_resolution", num_classes=0, attention_resolutions=()))
  params = build.init_params(build.make_model(config), jax.random.key(0))
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), params)
  return jdiff.from_state(config, params)


@pytest.mark.slow  # trains or compiles enough to crowd the fast tier
def test_upscale_feeds_the_upsampled_image_and_each_output_depends_on_its_input_and_seed_alone(sr_pipe):
  low = np.random.default_rng(5).integers(0, 256, (2, 4, 4, 1)).astype(np.uint8)
  samples = sr_pipe.upscale(low, seed=7, steps=2, batch_size=2)
  assert samples.images.shape == (2, 8, 8, 1) and samples.seeds.tolist() == [7, 8]
  np.testing.assert_array_equal(sr_pipe.upscale(low[1:], seed=8, steps=2, batch_size=2).images, samples.images[1:])
  noise, keys = gen.seeded_noise((8, 8, 1), np.array([7, 8]))
  cond = conditioning.super_resolution_condition(images.uint8_to_model_range(low), 8, 8)
  direct = gen.sample_conditioned(sr_pipe.model, sr_pipe.params, sr_pipe.schedule, noise, keys, cond,
                                  prediction="eps", sampler="ddim", steps=2, spacing="trailing")
  np.testing.assert_array_equal(images.model_range_to_uint8(direct), samples.images)


@pytest.mark.slow  # trains or compiles enough to crowd the fast tier
def test_conditioned_models_say_which_call_samples_them(sr_pipe):
  with pytest.raises(ValueError, match=r"conditioned on an image \(super_resolution\); sample it with upscale"):
    sr_pipe.generate(num=1)
  with pytest.raises(ValueError, match="inpaint_model needs a U-Net trained for inpainting"):
    sr_pipe.inpaint_model(np.zeros((1, 8, 8, 1), np.uint8), np.ones((8, 8)))
  with pytest.raises(ValueError, match=r"images must be uint8 \[N, height, width, 1\]"):
    sr_pipe.upscale(np.zeros((1, 4, 4, 3), np.uint8))


# Stable Diffusion inpainting in diffusers' format.

@pytest.fixture(scope="module")
def sd_inpaint():
  return jdiff.load(os.path.join(FIXTURES, "sd1_inpaint")), np.load(os.path.join(FIXTURES, "references.npz"))


@pytest.mark.slow
def test_sd_inpainting_directory_loads_with_its_masked_image_latents_as_diffusers_encodes_them(sd_inpaint):
  pipe, refs = sd_inpaint
  assert (pipe.config.model.in_channels, pipe.config.conditioning.kind, pipe.image_shape) == (9, "inpainting",
                                                                                                (16, 16, 3))
  x = images.uint8_to_model_range(refs["images"])
  latents = np.asarray(pipe.codec.encode(np.asarray(conditioning.masked(x, refs["masks"]))))
  want = refs["masked_image_latents"].transpose(0, 2, 3, 1)
  assert np.abs(latents - want).max() / np.abs(want).max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["plms", "ddim"])
def test_sd_inpainting_equals_stable_diffusion_inpaint_pipeline(sd_inpaint, sampler):
  pipe, refs = sd_inpaint
  options = {} if sampler == "plms" else {"sampler": sampler}  # plms: the directory's own PNDM scheduler
  samples = pipe.inpaint_model(refs["images"], refs["masks"], [str(p) for p in refs["prompts"]],
                               negative_prompt=str(refs["negative"]), latents=refs["latents"].transpose(0, 2, 3, 1),
                               steps=10, guidance_scale=7.5, **options)
  decoded = np.clip(np.asarray(pipe.codec.decode(samples.latents)) / 2 + 0.5, 0.0, 1.0)
  want = refs[f"{sampler}/images"]
  assert np.abs(decoded - want).max() < 1e-3 and np.abs(want - want[::-1]).max() > 0.1


# Training through the loop, and the CLI: real processes.

def run(program, *args):
  return subprocess.run([sys.executable, os.path.join(ROOT, program), *map(str, args)], capture_output=True,
                        text=True, cwd=ROOT, timeout=600)


TINY_UNET = ["--config.model.channels=16", "--config.model.channel_mults=(1,2)",
             "--config.model.attention_resolutions=()", "--config.training.num_steps=6",
             "--config.training.checkpoint_every=6", "--config.sampling.steps=2"]


@pytest.mark.slow
def test_super_resolution_trains_through_the_loop_and_sample_py_upscales_a_png(tmp_path):
  workdir = tmp_path / "sr"
  trained = run("train.py", "--config", "configs/sr_digits.py", "--workdir", workdir, *TINY_UNET)
  assert trained.returncode == 0, trained.stderr[-3000:]
  from PIL import Image
  grid = Image.open(workdir / "samples" / "step_0000006.png")
  assert grid.size[0] / grid.size[1] == pytest.approx((10 * 18 + 2) / (3 * 18 + 2))  # given, made, real x 10
  low = tmp_path / "low.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)).save(low)
  high = tmp_path / "high.png"
  sampled = run("sample.py", "--workdir", workdir, "--upscale", 2, "--upscale_image", low, "--out", high)
  assert sampled.returncode == 0, sampled.stderr[-3000:]
  assert Image.open(high).size == (16, 16) and Image.open(high).mode == "L"
  wrong = run("sample.py", "--workdir", workdir, "--upscale", 4, "--upscale_image", low, "--out", tmp_path / "x.png")
  assert wrong.returncode != 0 and "this model upscales by 2; pass --upscale 2" in wrong.stderr


@pytest.mark.slow
def test_inpainting_model_trains_through_the_loop_and_inpaints(tmp_path):
  from jdiff.configs import inpaint_digits
  from jdiff.train import train_and_evaluate
  raw = inpaint_digits.get_config()
  raw.model.update(channels=16, channel_mults=(1, 2), attention_resolutions=())
  raw.training.update(num_steps=6, checkpoint_every=6)
  raw.sampling.update(steps=2)
  result = train_and_evaluate(raw, str(tmp_path / "inpaint"))
  pipe = jdiff.load(result.workdir)
  real = np.random.default_rng(1).integers(0, 256, (3, 16, 16, 1)).astype(np.uint8)
  samples = pipe.inpaint_model(real, conditioning.half_mask("left", 16, 16)[..., 0], label=[1, 2, 3], steps=2)
  assert samples.images.shape == (3, 16, 16, 1) and samples.labels.tolist() == [1, 2, 3]
  again = pipe.inpaint(real, conditioning.half_mask("left", 16, 16)[..., 0], label=[1, 2, 3], steps=2)
  np.testing.assert_array_equal(again.images, samples.images)  # inpaint hands an inpainting model to inpaint_model
  with pytest.raises(ValueError, match="trained for inpainting"):
    pipe.inpaint(real, conditioning.half_mask("left", 16, 16)[..., 0], label=[1, 2, 3], steps=2, strength=0.5)
