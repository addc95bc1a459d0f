"""The VAE (shapes, SD-1.5 size, KL, training) and latent diffusion end to end on tiny configs."""
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

import jdiff
from jdiff import data
from jdiff import generate as gen
from jdiff.config import ConfigError, DataConfig, parse_config, parse_vae_config
from jdiff.configs import tiny, vae_digits, vae_sd15
from jdiff.images import model_range_to_uint8, uint8_to_model_range
from jdiff.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig, init_vae_params, vae_param_count
from jdiff.train import latent, train_and_evaluate
from jdiff.train.vae import PSNR_FILE, create_vae_state, psnr, vae_loss, vae_train_step

TINY_VAE = dict(image_size=16, in_channels=1, latent_channels=2, block_out_channels=(8, 16), layers_per_block=1,
                norm_groups=4, mid_attention=True, dtype="float32")


def tiny_vae_config(data_dir, **training) -> ConfigDict:
  raw = vae_digits.get_config()
  raw.data.update(image_size=16, data_dir=str(data_dir))
  raw.vae.update(TINY_VAE)
  raw.training.update(dict(batch_size=16, num_steps=8, warmup_steps=1, log_every=4, checkpoint_every=8,
                           sample_every=0), **training)
  raw.evaluation.num_images = 40
  return raw


def tiny_latent_config(data_dir, vae_workdir) -> ConfigDict:
  raw = tiny.get_config()
  raw.data.update(image_size=16, data_dir=str(data_dir))
  raw.model.update(image_size=8, in_channels=2)
  raw.training.update(num_steps=4, checkpoint_every=4, log_every=2)
  raw.sampling.update(steps=3, num_samples=10)
  raw.latent = dict(vae_workdir=str(vae_workdir), vae_checkpoint=None, encode="sample", scaling_factor=0.0,
                    scale_batches=3)
  return raw


def test_sd15_config_has_the_sd15_autoencoder_parameter_count():
  config = parse_vae_config(vae_sd15.get_config())
  assert (config.vae.downsample_factor, config.vae.latent_size) == (8, 32)
  # SD-1.5's AutoencoderKL (diffusers) has 83,653,863 parameters; the count does not depend on the image size.
  assert vae_param_count(VAEConfig(**dict(vars(config.vae), image_size=64))) == 83_653_863


def test_downsample_padding_end_is_the_one_on_every_side_a_pixel_down_and_right():
  """"end" pads the bottom and right (diffusers' AutoencoderKL), "all" every side: away from the top and left
  border, "end" sees the image that "all" sees shifted up and left by one pixel."""
  from jdiff.models.layers import Downsample
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  params = Downsample().init(jax.random.key(1), x)
  end = Downsample(pad_end=True).apply(params, x)
  shifted = jnp.pad(x[:, 1:, 1:], ((0, 0), (0, 1), (0, 1), (0, 0)))
  np.testing.assert_allclose(end[:, 1:, 1:], Downsample().apply(params, shifted)[:, 1:, 1:], atol=1e-6)
  assert float(jnp.abs(end - Downsample().apply(params, x)).max()) > 0.1
  # jdiff's configs train with "end"; a stored config without the field (an older checkpoint's) keeps "all".
  assert parse_vae_config(vae_digits.get_config()).vae.downsample_padding == "end"
  assert VAEConfig(**TINY_VAE).downsample_padding == "all"
  from jdiff.interop.configs import diffusers_vae_config
  with pytest.raises(ValueError, match=r"downsample_padding='all'.* export a VAE trained with downsample_padding"):
    diffusers_vae_config(VAEConfig(**TINY_VAE), 0.5)


def test_vae_shapes_and_config_errors():
  config = VAEConfig(**TINY_VAE)
  model = AutoencoderKL(config)
  params = jax.eval_shape(lambda: init_vae_params(model, jax.random.key(0)))
  shape = lambda method, x, *args: jax.eval_shape(lambda p, x: model.apply({"params": p}, x, *args, method=method),
                                                  params, jax.ShapeDtypeStruct(x, jnp.float32))
  posterior = shape(AutoencoderKL.encode, (3, 16, 16, 1))
  assert posterior.mean.shape == posterior.logvar.shape == (3, 8, 8, 2) and config.latent_size == 8
  recon, _ = shape(AutoencoderKL.__call__, (3, 16, 16, 1), jax.random.key(2))
  assert recon.shape == (3, 16, 16, 1) and recon.dtype == jnp.float32
  # Fully convolutional: 32x32 images have 16x16 latents, which decode to 32x32 images.
  assert shape(AutoencoderKL.encode, (1, 32, 32, 1)).mean.shape == (1, 16, 16, 2)
  assert shape(AutoencoderKL.decode, (1, 16, 16, 2)).shape == (1, 32, 32, 1)
  with pytest.raises(ValueError, match=r"VAEConfig.norm_groups=3 .* a divisor of every level's channel count"):
    VAEConfig(**dict(TINY_VAE, norm_groups=3))
  with pytest.raises(ConfigError, match=r"config.vae: VAEConfig.image_size=17 .* divisible by .* = 2"):
    parse_vae_config(dict(vae=dict(TINY_VAE, image_size=17), data=dict(image_size=17)))
  with pytest.raises(ConfigError, match=r"config.loss: reconstruction='l3' .* one of l1, l2"):
    parse_vae_config(dict(vae=TINY_VAE, data=dict(image_size=16), loss=dict(reconstruction="l3")))


def test_kl_closed_form_matches_monte_carlo():
  rng = np.random.default_rng(0)
  mean = rng.normal(size=(2, 3, 3, 2)).astype(np.float32)
  logvar = rng.uniform(-2.0, 1.0, size=(2, 3, 3, 2)).astype(np.float32)
  closed_form = np.asarray(DiagonalGaussian(mean=jnp.asarray(mean), logvar=jnp.asarray(logvar)).kl())
  n = 100_000
  z = mean + np.exp(0.5 * logvar) * rng.normal(size=(n, *mean.shape))
  log_q = -0.5 * (np.square(z - mean) / np.exp(logvar) + logvar)  # the 2*pi terms of q and p cancel
  log_p = -0.5 * np.square(z)
  samples = np.sum(log_q - log_p, axis=(2, 3, 4))  # [n, batch]
  monte_carlo, stderr = samples.mean(axis=0), samples.std(axis=0) / np.sqrt(n)
  np.testing.assert_array_less(np.abs(monte_carlo - closed_form), 4 * stderr)
  assert float(DiagonalGaussian(jnp.zeros((1, 2)), jnp.zeros((1, 2))).kl()[0]) == 0.0
  # from_moments splits mean | logvar and clips the log-variance.
  clipped = DiagonalGaussian.from_moments(jnp.array([[1.0, -100.0]]))
  assert float(clipped.mean[0, 0]) == 1.0 and float(clipped.logvar[0, 0]) == -30.0


@pytest.mark.slow  # trains or compiles enough to crowd the fast tier
def test_vae_train_steps_lower_the_loss_on_a_fixed_batch():
  config = parse_vae_config(tiny_vae_config("unused", learning_rate=3e-3, warmup_steps=1))
  yy, xx = np.mgrid[:16, :16] / 15.0
  centres = np.linspace(0.2, 0.8, 8)
  images = np.exp(-((xx[None] - centres[:, None, None]) ** 2 + (yy[None] - 0.5) ** 2) * 30) * 2 - 1
  batch = {"image": jnp.asarray(images[..., None], jnp.float32)}
  state = jax.jit(functools.partial(create_vae_state, config))(jax.random.key(0))
  step = jax.jit(functools.partial(vae_train_step, config=config))
  evaluate = jax.jit(lambda p: vae_loss(p, batch, jax.random.key(5), config=config)[1]["reconstruction"])
  before = float(evaluate(state.params))
  for _ in range(30):
    state, metrics = step(state, batch, jax.random.key(1))
  after = float(evaluate(state.params))
  assert after < 0.5 * before, (before, after)
  assert np.isfinite(float(metrics["kl"])) and float(metrics["kl"]) > 0
  # The loss is reconstruction + kl_weight * KL per image value.
  np.testing.assert_allclose(float(metrics["loss"]), float(metrics["reconstruction"]) + 1e-6 * float(metrics["kl"]),
                             rtol=1e-6)


def test_psnr_is_exact_on_known_errors():
  images = np.full((2, 4, 4, 1), 100, np.uint8)
  recons = images.copy()
  recons[0] += 1  # MSE 1 -> 20*log10(255)
  np.testing.assert_allclose(psnr(images, recons)[0], 20 * np.log10(255.0))
  assert psnr(images, recons)[1] == pytest.approx(10 * np.log10(255.0**2 / 1e-10))


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
  """A tiny VAE trained 8 steps on 16x16 digits, then a tiny latent U-Net trained 4 steps on its 8x8x2 latents."""
  root = tmp_path_factory.mktemp("latent")
  data_dir = os.environ.get("TFDS_DATA_DIR", root / "tfds")
  train_and_evaluate(tiny_vae_config(data_dir), str(root / "vae"))
  train_and_evaluate(tiny_latent_config(data_dir, root / "vae"), str(root / "ldm"))
  return root, data_dir


def test_vae_training_writes_checkpoints_and_held_out_psnr(latent_run):
  root, _ = latent_run
  assert sorted(os.listdir(root / "vae" / "checkpoints")) == ["8"]
  with open(root / "vae" / PSNR_FILE) as f:
    result = json.load(f)
  assert result["split"] == "test" and result["num_images"] == 40 and result["step"] == 8
  assert 5.0 < result["psnr_mean_db"] < 60.0
  assert os.path.exists(root / "vae" / "samples" / "reconstructions_0000008.png")


def test_latent_diffusion_samples_decode_to_images_with_every_kind_of_sampler(latent_run):
  root, _ = latent_run
  pipe = jdiff.load(str(root / "ldm"))
  lc = pipe.config.latent
  assert lc.vae_workdir == str(root / "vae") and lc.vae_checkpoint == 8 and lc.scaling_factor > 0
  assert pipe.image_shape == (16, 16, 1) and pipe.codec.scaling_factor == lc.scaling_factor
  assert os.path.exists(root / "ldm" / "samples" / "step_0000004.png")
  for sampler in ("ddim", "dpmpp_2m_sde"):  # deterministic; stochastic, multistep
    samples = pipe.generate(num=4, seed=0, sampler=sampler, steps=2)
    assert samples.images.shape == (4, 16, 16, 1) and samples.images.dtype == np.uint8
    assert samples.latents.shape == (4, 8, 8, 2)
    # The images are the VAE's decoding of the sampled latents.
    np.testing.assert_array_equal(samples.images, model_range_to_uint8(pipe.codec.decode(samples.latents)))


def test_stored_scaling_factor_gives_held_out_latents_unit_std(latent_run):
  root, data_dir = latent_run
  pipe = jdiff.load(str(root / "ldm"))
  codec = pipe.codec  # encodes a posterior sample when given a key, as training does
  assert abs(codec.scaling_factor - 1.0) > 0.1  # the VAE's latents are not unit scale by themselves
  test_digits = uint8_to_model_range(data.load_split(DataConfig(image_size=16, split="test",
                                                                data_dir=str(data_dir)))[0][:96])
  held_out = [codec.encode(test_digits[i:i + 32], jax.random.key(i)) for i in range(0, 96, 32)]
  assert latent.latent_std(held_out) == pytest.approx(1.0, abs=0.1)
  # Decoding undoes the scaling: the same images as the unscaled latents decoded with factor 1.
  unscaled = dataclasses.replace(codec, scaling_factor=1.0)
  np.testing.assert_allclose(codec.decode(held_out[0]), unscaled.decode(held_out[0] / codec.scaling_factor),
                             atol=1e-4)


def test_latent_config_errors_name_the_field(latent_run, tmp_path):
  root, data_dir = latent_run
  raw = tiny_latent_config(data_dir, root / "vae")
  raw.model.update(image_size=16, attention_resolutions=(8,))
  with pytest.raises(ConfigError, match=r"config.model.image_size=16 must be the latent size 8"):
    train_and_evaluate(raw, str(tmp_path / "bad"))
  raw = tiny_latent_config(data_dir, tmp_path / "missing")
  with pytest.raises(ConfigError, match=r"config.latent.vae_workdir=.*missing.*no trained VAE in .*missing; train "
                                       r"it first with `python train.py --config configs/vae_digits.py"):
    train_and_evaluate(raw, str(tmp_path / "bad"))
  assert not os.path.exists(tmp_path / "bad")
  raw = tiny_latent_config(data_dir, tmp_path / "other_vae")
  raw.training.num_steps = 6
  with pytest.raises(ConfigError, match=r"was trained on the latents of .*vae'"):
    train_and_evaluate(raw, str(root / "ldm"))  # resuming must keep the VAE (and factor) it started with
  with pytest.raises(ConfigError, match=r"config.latent: encode='median' .* one of sample, mean"):
    parse_config(dict(tiny_latent_config(data_dir, root / "vae").to_dict(), latent=dict(encode="median")))


def test_latent_models_sample_unclipped_latents_and_pixel_models_clip(latent_run, monkeypatch):
  root, _ = latent_run
  pipe = jdiff.load(str(root / "ldm"))
  assert pipe.config.clip_x0 is False and parse_config(tiny.get_config()).clip_x0 is True
  overridden = tiny.get_config()
  overridden.sampling.clip_x0 = False
  assert parse_config(overridden).clip_x0 is False
  noise, keys = gen.seeded_noise(pipe.noise_shape, np.arange(8))
  sample = lambda clip: np.asarray(gen.sample_unet(pipe.model, pipe.params, pipe.schedule, noise, keys,
                                                   prediction="v", steps=3, clip_x0=clip))
  # A barely trained latent U-Net predicts latents of about unit scale: a third of them lie outside [-1, 1].
  assert np.mean(np.abs(sample(False)) > 1.0) > 0.1 and np.abs(sample(True)).max() <= 1.0
  used = []
  real = gen.sample_unet
  monkeypatch.setattr(gen, "sample_unet", lambda *a, **k: used.append(k["clip_x0"]) or real(*a, **k))
  pipe.generate(num=2, steps=2)
  pipe.generate(num=2, steps=2, clip_x0=True)
  pipe.generate(latents=np.asarray(noise[:2]), steps=2)
  pipe.interpolate(2, steps=2)
  assert used == [False, True, False, False]


def test_a_relative_vae_workdir_lies_beside_the_work_dir_and_is_checked_first(latent_run, tmp_path, monkeypatch):
  root, data_dir = latent_run
  config = parse_config(tiny_latent_config(data_dir, "vae"))
  assert latent.vae_workdir(config, str(root / "another_run")) == str(root / "vae")
  # A missing VAE is named, with the command that trains it, before the data pipeline opens.
  monkeypatch.setattr(data, "make_train_iterator", lambda *a, **k: pytest.fail("opened the data"))
  with pytest.raises(ConfigError, match=r"no trained VAE in .*/nowhere/vae; train it first with `python train.py "
                                        r"--config configs/vae_digits.py --workdir .*/nowhere/vae`"):
    train_and_evaluate(tiny_latent_config(data_dir, "vae"), str(tmp_path / "nowhere" / "ldm"))
  assert not (tmp_path / "nowhere").exists()
