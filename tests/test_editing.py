"""Editing from an image (jdiff.editing, Pipeline.img2img / inpaint / outpaint, sample.py --init_image): against
exact denoisers of Gaussian data (tests/exact_denoisers.py), the tiny trained model, and diffusers' img2img."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdiff
from jdiff import editing, samplers, schedules
from tests import exact_denoisers as ed

SCHEDULE = schedules.make_schedule("scaled_linear", 1000)  # sigma 0.029 to 14.6, as Stable Diffusion's
_rng = np.random.default_rng(3)
_a = _rng.normal(size=(4, 4))
COV = _a @ _a.T / 4 + 0.2 * np.eye(4)
MEAN = _rng.normal(size=4) * 0.5
MODEL = ed.as_model_fn(lambda x, sigma, cond: ed.gaussian_x0(x, sigma, mean=MEAN, cov=COV), SCHEDULE, "eps")


def test_strength_picks_the_last_steps_as_diffusers():
  """diffusers: init_timestep = min(int(steps * strength), steps); the run starts at steps - init_timestep."""
  assert [editing.start_step(10, s) for s in (0.0, 0.3, 0.75, 0.99, 1.0)] == [10, 7, 3, 1, 0]
  assert editing.start_step(50, 0.3) == 35
  with pytest.raises(ValueError, match=r"strength=1.5 must be in \[0, 1\]"):
    editing.start_step(10, 1.5)


# img2img with strength s starts at sigma_k = the level of step k = start_step(steps, s), from x0 + sigma_k noise,
# and follows the probability-flow ODE from there: its closed form for Gaussian data gives the exact answer. Largest
# RMS error over strengths 0.4 and 1 after the last 12 and 30 of 30 Karras steps, 2.5x the largest measured (strength
# 0.4 / 1: ddim 0.019 / 0.064, heun 0.0012 / 0.0058, dpmpp_2m 0.0007 / 0.0059, unipc 0.0004 / 0.0015, lms 0.0046 /
# 0.0017, plms 0.0003 / 0.0017); a multistep sampler whose first step used a history would be off by O(1).
IMG2IMG_ERRORS = {"ddim": 0.16, "heun": 0.015, "dpmpp_2m": 0.015, "unipc": 0.004, "lms": 0.012, "plms": 0.005}


@pytest.mark.slow
@pytest.mark.parametrize("strength", [0.4, 1.0])
def test_img2img_follows_the_ode_from_the_noised_image(strength):
  x0 = jnp.asarray(_rng.normal(size=(64, 4)), jnp.float32)
  noise = jax.random.normal(jax.random.key(0), x0.shape)
  steps = 30
  start = editing.start_step(steps, strength)
  sigmas, _ = samplers.noise_levels(SCHEDULE, steps=steps, spacing="karras")
  sigma, last = float(sigmas[start]), float(sigmas[-1])
  exact = ed.gaussian_ode_solution(np.asarray(x0 + sigma * noise, np.float64), sigma_from=sigma, sigma_to=0.0,
                                   mean=MEAN, cov=COV)
  at_last = ed.gaussian_ode_solution(np.asarray(x0 + sigma * noise, np.float64), sigma_from=sigma, sigma_to=last,
                                     mean=MEAN, cov=COV)
  at_last = ed.gaussian_x0(at_last, np.full((len(x0), 1), last), mean=MEAN, cov=COV)
  run = jax.jit(lambda x0, noise: {s: editing.edit(MODEL, SCHEDULE, x0, noise, sampler=s, steps=steps,
                                                    strength=strength, spacing="karras", clip_x0=False)
                                   for s in IMG2IMG_ERRORS})
  errors = {}
  for sampler, out in run(x0, noise).items():
    # LMS and PLMS integrate their last step to sigma 0; the others land on the denoised estimate at the last level.
    target = exact if sampler in ("lms", "plms") else at_last
    errors[sampler] = float(np.sqrt(np.mean((np.asarray(out, np.float64) - target) ** 2)))
  print(f"strength {strength}: RMS errors {errors}")
  assert all(errors[s] < IMG2IMG_ERRORS[s] for s in errors), str(errors)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", pytest.param("ddpm", marks=pytest.mark.slow),
                                     pytest.param("unipc", marks=pytest.mark.slow)])
def test_strength_zero_returns_the_data_and_one_from_pure_noise_is_text_to_image(sampler):
  """Strength 1 on a zero-terminal-SNR schedule starts from the noise itself, as sampling does, for every sampler
  (stochastic ones draw the same step noise); elsewhere it starts from x0 + sigma_max noise (diffusers' img2img)."""
  betas = schedules.rescale_zero_terminal_snr(schedules.scaled_linear_betas(1000))
  zero_snr = schedules.from_betas(betas)
  model = ed.gaussian_vp_model_fn(zero_snr, "v", mean=MEAN, cov=COV)
  x0 = jnp.asarray(_rng.normal(size=(8, 4)), jnp.float32)
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  kw = dict(steps=6, prediction="v", rng=jax.random.key(2), clip_x0=False)
  edited = editing.edit(model, zero_snr, x0, noise, sampler=sampler, strength=1.0, **kw)
  np.testing.assert_array_equal(edited, samplers.sample(model, zero_snr, noise, sampler=sampler, **kw))
  np.testing.assert_array_equal(editing.edit(model, zero_snr, x0, noise, strength=0.0, **kw), x0)


def _conditional(known, values):
  """Closed-form mean and covariance of the unknown coordinates of N(MEAN, COV) given the known ones."""
  k, u = known, ~known
  gain = COV[np.ix_(u, k)] @ np.linalg.inv(COV[np.ix_(k, k)])
  return MEAN[u] + gain @ (values - MEAN[k]), COV[np.ix_(u, u)] - gain @ COV[np.ix_(k, u)]


@pytest.mark.parametrize("names", [("unipc",), pytest.param(samplers.SAMPLERS, marks=pytest.mark.slow)])
def test_inpainting_keeps_the_known_region_exactly(names):
  """UniPC's corrector (as Heun's and PLMS's steps) reads the sampler's state beyond the model's outputs: the known
  region must come out exact all the same."""
  x0 = jnp.asarray(_rng.normal(size=(16, 4)), jnp.float32)
  mask = jnp.asarray([0.0, 1.0, 0.0, 1.0])
  noise = jax.random.normal(jax.random.key(3), x0.shape)
  run = jax.jit(lambda x0, noise: {s: editing.edit(MODEL, SCHEDULE, x0, noise, mask=mask, sampler=s, steps=4,
                                                    rng=jax.random.key(4), clip_x0=False)
                                   for s in names})
  for sampler, out in run(x0, noise).items():
    np.testing.assert_array_equal(np.asarray(out)[:, [0, 2]], np.asarray(x0)[:, [0, 2]], err_msg=sampler)
    assert np.all(np.isfinite(out)), sampler


# Replacement against the closed-form conditional. Known coordinates 0 and 2 at (0.8, -0.6) move the unknown ones'
# mean by up to 0.223 from the prior's. Measured with 20,000 samples (standard error of a mean 0.008, of a covariance
# entry about 0.011): replacement alone (ddpm, 100 steps) leaves a mean error of 0.130 (0.139 with ddim at 25, 100 or
# 400 steps, 0.133 with ddpm at 400; fresh noise for the known region at each level instead of one draw: 0.130 too):
# it does not converge to the conditional as steps grow, because the unknown coordinates follow the joint model's
# score given a noisy version of the known ones, which is weaker coupling than conditioning on them. RePaint's
# resampling (jumps 10, 9 rounds) brings the mean error down to 0.026 (covariance error 0.089). With the unknown
# coordinates independent of the known ones, replacement samples their marginal (dpmpp_2m, 50 Karras steps, whose ODE
# error is small: mean error 0.011 and covariance error 0.023, about twice the sampling error). DDPM at 100 steps has a
# covariance error of 0.08 there from its own discretisation, so the covariance errors above are partly DDPM's.
GAUSSIAN_KNOWN = np.array([True, False, True, False])


def _inpaint_statistics(model, values, **kw):
  n = 20000
  x0 = np.tile(MEAN, (n, 1)).astype(np.float32)
  x0[:, GAUSSIAN_KNOWN] = values
  out = editing.edit(model, SCHEDULE, x0, jax.random.normal(jax.random.key(1), x0.shape),
                     mask=jnp.asarray(~GAUSSIAN_KNOWN, jnp.float32), clip_x0=False, rng=jax.random.key(2), **kw)
  unknown = np.asarray(out, np.float64)[:, ~GAUSSIAN_KNOWN]
  return unknown.mean(0), np.cov(unknown.T)


@pytest.mark.slow
def test_inpainting_against_the_closed_form_conditional():
  values = np.array([0.8, -0.6])
  mean, cov = _conditional(GAUSSIAN_KNOWN, values)
  shift = np.abs(mean - MEAN[~GAUSSIAN_KNOWN]).max()
  got_mean, _ = _inpaint_statistics(MODEL, values, sampler="ddpm", steps=100)
  replaced = np.abs(got_mean - mean).max()
  got_mean, got_cov = _inpaint_statistics(MODEL, values, sampler="ddpm", steps=100, resample_jumps=10,
                                          resample_rounds=9)
  resampled, resampled_cov = np.abs(got_mean - mean).max(), np.abs(got_cov - cov).max()
  print(f"conditional shift {shift:.3f}; mean error: replacement {replaced:.3f}, resampled {resampled:.3f} "
        f"(covariance {resampled_cov:.3f})")
  assert 0.2 < shift < 0.25 and 0.10 < replaced < 0.16 and resampled < 0.045 and resampled_cov < 0.12

  independent = np.where(np.equal.outer(GAUSSIAN_KNOWN, GAUSSIAN_KNOWN), COV, 0.0)
  model = ed.as_model_fn(lambda x, sigma, cond: ed.gaussian_x0(x, sigma, mean=MEAN, cov=independent), SCHEDULE,
                         "eps")
  got_mean, got_cov = _inpaint_statistics(model, values, sampler="dpmpp_2m", steps=50, spacing="karras")
  marginal_cov = independent[np.ix_(~GAUSSIAN_KNOWN, ~GAUSSIAN_KNOWN)]
  print(f"independent: mean error {np.abs(got_mean - MEAN[~GAUSSIAN_KNOWN]).max():.4f}, covariance error "
        f"{np.abs(got_cov - marginal_cov).max():.4f}")
  np.testing.assert_allclose(got_mean, MEAN[~GAUSSIAN_KNOWN], atol=0.03)
  np.testing.assert_allclose(got_cov, marginal_cov, atol=0.05)


# The notebook API and sample.py on the tiny trained model (8x8 digits, class-conditional).

@pytest.fixture(scope="module")
def tiny_pipe(tiny_workdir):
  return jdiff.load(tiny_workdir)


def _digits(pipe, num=2):
  return pipe.generate(label=[3, 5][:num], num=num, steps=2, seed=0).images


@pytest.mark.parametrize("call, message", [
    (lambda pipe, imgs: pipe.img2img(imgs, strength=1.2), r"strength=1.2 must be in \[0, 1\]"),
    (lambda pipe, imgs: pipe.inpaint(imgs, np.ones((4, 4))), r"mask has shape \[4, 4\] but the images are 8x8"),
    (lambda pipe, imgs: pipe.img2img(np.repeat(imgs, 3, axis=-1)), "images have 3 channels, this model takes 1: "
     "convert them to grayscale"),
    (lambda pipe, imgs: pipe.img2img(imgs.astype(np.float32)), r"images must be uint8 \[N, H, W, 1\]"),
    (lambda pipe, imgs: pipe.outpaint(imgs, right=3), "gives 8x11: width=11 must be a positive multiple of 2"),
    (lambda pipe, imgs: pipe.outpaint(imgs), "outpaint needs a side to extend"),
    (lambda pipe, imgs: pipe.inpaint(imgs, np.full((8, 8), 2.0)), r"mask values must be in \[0, 1\]"),
    (lambda pipe, imgs: pipe.inpaint(imgs, np.ones((8, 8)), resample_rounds=-1), "resample_rounds=-1 must be"),
])
def test_editing_rejects_bad_input_naming_the_value(tiny_pipe, call, message):
  pipe = tiny_pipe
  images = np.zeros((2, 8, 8, 1), np.uint8)
  with pytest.raises(ValueError, match=message):
    call(pipe, images)


@pytest.mark.slow
def test_pipeline_edits_keep_what_they_should(tiny_pipe):
  """A pixel model's inpainting keeps the unmasked pixels exactly, with and without resampling; outpainting keeps the
  image beyond its overlap; strength 0 returns the images; strength 1 is generate from the same seed, up to the
  start's sqrt(abar_max) x0 (the tiny config's cosine schedule: 2e-5, nothing in uint8)."""
  pipe = tiny_pipe
  images = _digits(pipe)
  mask = np.zeros((8, 8), bool)
  mask[2:6, 4:] = True
  for resample in ({}, dict(resample_jumps=2, resample_rounds=1)):
    out = pipe.inpaint(images, mask, label=[3, 5], steps=4, seed=1, **resample).images
    np.testing.assert_array_equal(out[:, ~mask], images[:, ~mask])
    assert np.abs(out[:, mask].astype(int) - images[:, mask]).mean() > 2, resample  # the masked region is redrawn
  wide = pipe.outpaint(images[:, :, :4], label=[3, 5], right=4, overlap=1, steps=4, seed=1).images
  assert wide.shape == images.shape
  np.testing.assert_array_equal(wide[:, :, :3], images[:, :, :3])
  np.testing.assert_array_equal(pipe.img2img(images, label=[3, 5], strength=0.0).images, images)
  same = pipe.generate(label=[3, 5], steps=4, seed=1).images
  np.testing.assert_array_equal(pipe.img2img(images, label=[3, 5], strength=1.0, steps=4, seed=1).images, same)


def cli(capsys, *args):
  from jdiff.cli import sample as sample_cli
  with pytest.raises(SystemExit) as exit_:
    sample_cli.run([sample_cli.PROGRAM, *map(str, args)])
  out, err = capsys.readouterr()
  return exit_.value.code or 0, out, err


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
  from PIL import Image
  folder = tmp_path_factory.mktemp("pngs")
  gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
  Image.fromarray(gray).save(folder / "digit.png")
  Image.fromarray(np.where(np.arange(8) >= 4, 255, 0).astype(np.uint8)[None].repeat(8, 0)).save(folder / "mask.png")
  Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / "small.png")
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "rgb.png")
  (folder / "broken.png").write_bytes(b"not a png")
  return folder


@pytest.mark.parametrize("args, message", [
    (["--init_image", "{d}/digit.png", "--strength", "1.5"], r"--strength=1.5 must be in [0, 1]"),
    (["--init_image", "{d}/digit.png", "--mask", "{d}/small.png"], "--mask='{d}/small.png' is 4x4 but --init_image="
     "'{d}/digit.png' is 8x8: give a mask of the image's size"),
    (["--init_image", "{d}/broken.png"], "cannot read '{d}/broken.png' as an image"),
    (["--init_image", "{d}/missing.png"], "cannot read '{d}/missing.png' as an image"),
    pytest.param(["--init_image", "{d}/rgb.png"], "--init_image='{d}/rgb.png' has 3 channels but the model makes "
                 "grayscale images: convert it to grayscale", marks=pytest.mark.slow),  # these two load the model
    pytest.param(["--init_image", "{d}/digit.png", "--outpaint", "right=3"], "gives 8x11: width=11 must be a "
                 "positive multiple", marks=pytest.mark.slow),
    (["--init_image", "{d}/digit.png", "--outpaint", "rigth=4"], "give SIDE=PIXELS pairs"),
    (["--strength", "0.5"], "--strength edits an image: pass --init_image=in.png too"),
    (["--init_image", "{d}/digit.png", "--resample", "5"], "--resample harmonises an inpainted region"),
])
def test_sample_cli_rejects_bad_edits_with_one_line(tiny_workdir, pngs, tmp_path, capsys, args, message):
  out = tmp_path / "x.png"
  code, _, err = cli(capsys, "--workdir", tiny_workdir, "--out", out, *[a.format(d=pngs) for a in args])
  assert code == 2 and err.startswith("sample.py: error: ") and err.count("\n") == 1, err
  assert message.format(d=pngs) in err
  assert not os.path.exists(out)


@pytest.mark.slow
def test_sample_cli_inpaints_the_image_it_reads(tiny_workdir, tiny_pipe, pngs, tmp_path, capsys):
  from PIL import Image
  out = tmp_path / "edited.png"
  code, stdout, err = cli(capsys, "--workdir", tiny_workdir, "--init_image", pngs / "digit.png", "--mask",
                          pngs / "mask.png", "--label", 3, "--steps", 4, "--seed", 2, "--out", out)
  assert code == 0, err
  assert f"wrote 1 images from checkpoint 20 of {tiny_workdir} to {out}" in stdout
  written = np.asarray(Image.open(out))
  image = np.asarray(Image.open(pngs / "digit.png"))
  np.testing.assert_array_equal(written[:, :4], image[:, :4])
  mask = np.asarray(Image.open(pngs / "mask.png")) >= 128
  same = tiny_pipe.inpaint(image[None, ..., None], mask, label=3, steps=4, seed=2).images
  np.testing.assert_array_equal(written, same[0, ..., 0])


# Parity with diffusers' StableDiffusionImg2ImgPipeline on the tiny random SD 1.x directory, from the same image
# latents (the posterior's mode) and noise (tests/fixtures/make_editing_fixtures.py).

EDITING_FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


@pytest.fixture(scope="module")
def img2img_refs():
  return np.load(os.path.join(EDITING_FIXTURES, "editing", "references.npz"))


@pytest.fixture(scope="module")
def sd1():
  return jdiff.load(os.path.join(EDITING_FIXTURES, "diffusers", "sd1"))


def parity_cases():
  """Each scheduler and strength of the references; the slow tier runs three (about 15 s each), one per scheduler and
  strength, and JDIFF_EDITING_PARITY=all the other six (measured: all nine within 3e-6 of diffusers)."""
  every = os.environ.get("JDIFF_EDITING_PARITY") == "all"
  for name in ("ddim", "euler", "dpmpp_2m"):
    for strength in (0.3, 0.75, 1.0):
      chosen = (name, strength) in {("ddim", 0.3), ("euler", 1.0), ("dpmpp_2m", 0.75)}
      skip = pytest.mark.skipif(not every, reason="JDIFF_EDITING_PARITY=all runs it")
      marks = [pytest.mark.slow] + ([] if chosen else [skip])
      yield pytest.param(f"{name}/{strength}", marks=marks)


@pytest.mark.parametrize("case", parity_cases())
def test_img2img_equals_diffusers_img2img_pipeline(sd1, img2img_refs, case):
  import json
  from jdiff import schedulers
  name, strength = case.split("/")
  _, options = schedulers.sampler_options_from_diffusers(json.loads(str(img2img_refs[f"{name}/scheduler"])))
  samples = sd1.img2img(img2img_refs["images"], [str(p) for p in img2img_refs["prompts"]],
                        negative_prompt=str(img2img_refs["negative"]), strength=float(strength),
                        latents=img2img_refs["noise"].transpose(0, 2, 3, 1), steps=10, guidance_scale=7.5,
                        sampler=options["sampler"], spacing=options["spacing"])
  images = np.clip(np.asarray(sd1.codec.decode(samples.latents)) / 2 + 0.5, 0.0, 1.0)
  want = img2img_refs[case]
  error = np.abs(images - want).max()
  print(f"{case}: max error {error:.2e}")
  assert error < 1e-3


@pytest.mark.parametrize("name", [pytest.param("dpmpp_2m", marks=pytest.mark.slow),
                                  pytest.param("ddim", marks=[pytest.mark.slow, pytest.mark.skipif(
                                      os.environ.get("JDIFF_EDITING_PARITY") != "all",
                                      reason="JDIFF_EDITING_PARITY=all runs it")])])
def test_inpainting_equals_diffusers_inpaint_pipeline_with_a_four_channel_unet(sd1, img2img_refs, name):
  """Strength 0.75, where both blend from the same noised image latents (at strength 1 diffusers' first evaluation
  sees pure noise in the known region, jdiff's the noised image: 0.009 (ddim) and 0.005 (dpmpp_2m) apart)."""
  import json
  from jdiff import schedulers
  _, options = schedulers.sampler_options_from_diffusers(json.loads(str(img2img_refs[f"{name}/scheduler"])))
  samples = sd1.inpaint(img2img_refs["images"], img2img_refs["inpaint/mask"],
                        [str(p) for p in img2img_refs["prompts"]], negative_prompt=str(img2img_refs["negative"]),
                        strength=0.75, latents=img2img_refs["noise"].transpose(0, 2, 3, 1), steps=10,
                        guidance_scale=7.5, sampler=options["sampler"], spacing=options["spacing"])
  images = np.clip(np.asarray(sd1.codec.decode(samples.latents)) / 2 + 0.5, 0.0, 1.0)
  error = np.abs(images - img2img_refs[f"inpaint/{name}/0.75"]).max()
  print(f"inpaint {name}/0.75: max error {error:.2e}")
  assert error < 1e-3
