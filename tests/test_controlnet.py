"""ControlNet: a fresh one leaves its base exactly as it was, diffusers' ControlNetModel weights load and compute
what diffusers computed (tests/fixtures/controlnet, written by tests/fixtures/make_controlnet_fixtures.py), whole
runs equal StableDiffusionControlNetPipeline's, and a ControlNet that does not fit its base is refused by name."""
import dataclasses
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdiff
from jdiff import control
from jdiff.models.controlnet import ControlNet, example_inputs, params_from_unet
from jdiff.models.unet import UNet, UNetConfig

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
REFS = np.load(os.path.join(FIXTURES, "controlnet", "references.npz"))
CONTROLNET = os.path.join(FIXTURES, "controlnet", "controlnet")


def nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def rel_error(got, want) -> float:
  return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def sd1():
  return jdiff.load(os.path.join(FIXTURES, "diffusers", "sd1"))


def test_fresh_controlnet_copies_the_encoder_and_leaves_the_unet_output_unchanged():
  config = UNetConfig(image_size=8, in_channels=3, channels=8, channel_mults=(1, 2), num_res_blocks=1,
                      attention_resolutions=(4,), num_heads=2, norm_groups=4, context_dim=6, dropout=0.0)
  unet, model = UNet(config), ControlNet(config, conditioning_channels=1, embedding_channels=(4, 8))
  rng = np.random.default_rng(0)
  x, t = rng.normal(size=(2, 8, 8, 3)).astype(np.float32), np.array([3.0, 700.0], np.float32)
  context = rng.normal(size=(2, 5, 6)).astype(np.float32)
  control_image = rng.uniform(size=(2, 16, 16, 1)).astype(np.float32)
  # Random U-Net weights, all nonzero (its zero-initialised layers too), drawn without compiling its init.
  shapes = jax.eval_shape(lambda: unet.init(jax.random.key(0), x, t, context=context))["params"]
  unet_params = jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(np.float32), shapes)
  sample_x, sample_t, sample_control, _, _ = example_inputs(model)
  key = jax.random.key(1, impl="unsafe_rbg")  # a small init program: this test compiles little
  fresh = jax.jit(lambda k: model.init(k, sample_x, sample_t, sample_control, context=context[:1]))(key)["params"]
  params = params_from_unet(fresh, unet_params)
  assert all(jax.tree.all(jax.tree.map(np.array_equal, params[name], unet_params[name]))
             for name in params if name in unet_params)

  @jax.jit
  def run(params, unet_params):
    residuals = model.apply({"params": params}, x, t, control_image, context=context, scale=2.0)
    apply = lambda r: unet.apply({"params": unet_params}, x, t, context=context, residuals=r)
    return residuals, apply(residuals), apply(None)

  residuals, controlled, plain = run(params, unet_params)
  assert len(residuals[0]) == 4 and all(not np.any(r) for r in (*residuals[0], residuals[1]))
  np.testing.assert_array_equal(controlled, plain)
  assert float(jnp.abs(plain).max()) > 0.1


def test_residuals_equal_diffusers_controlnet(sd1):
  piped = sd1.with_controlnet(CONTROLNET)
  model, params = piped.controlnet.model, piped.controlnet.params
  assert (model.conditioning_channels, model.embedding_channels, model.control_factor) == (3, (4, 8, 16), 4)
  run = jax.jit(lambda p, x, t, c, ctx: model.apply({"params": p}, x, t, c, context=ctx, scale=REFS["residuals/scale"]))
  down, mid = run(params, nhwc(REFS["residuals/x"]), REFS["residuals/t"], nhwc(REFS["residuals/control"]),
                  REFS["residuals/context"])
  assert len(down) == 4
  for k, r in enumerate(down):
    assert rel_error(nhwc(REFS[f"residuals/down{k}"]), np.asarray(r)) < 1e-4
  assert rel_error(nhwc(REFS["residuals/mid"]), np.asarray(mid)) < 1e-4


@pytest.mark.slow  # a 10-step sampling program: too much compilation for the fast tier's budget
def test_controlled_text_to_image_equals_stable_diffusion_controlnet_pipeline(sd1):
  piped = sd1.with_controlnet(CONTROLNET)
  samples = piped.generate([str(p) for p in REFS["pipeline/prompts"]], negative_prompt=str(REFS["pipeline/negative"]),
                           latents=nhwc(REFS["pipeline/latents"]), steps=10, guidance_scale=7.5,
                           control_image=REFS["pipeline/control"], control_scale=float(REFS["pipeline/scale"]))
  images = np.clip(np.asarray(sd1.codec.decode(samples.latents)) / 2 + 0.5, 0.0, 1.0)
  want = REFS["pipeline/images"]
  assert np.abs(images - want).max() < 1e-3
  assert np.abs(want - REFS["pipeline/uncontrolled_images"]).max() > 0.05  # the control changed the images


def test_a_controlnet_for_another_base_is_refused_naming_the_shapes(sd1, tmp_path):
  other = dataclasses.replace(sd1.config.model, channels=4)
  model = ControlNet(other, 3, (4, 8, 16))
  params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), control.abstract_params(model))
  with pytest.raises(ValueError, match=r"its conv_in/bias has shape \[4\], where the base's U-Net needs \[8\]"):
    sd1.with_controlnet(control.Control(model, params))
  path = tmp_path / "controlnet"
  shutil.copytree(CONTROLNET, path)
  raw = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps(dict(raw, cross_attention_dim=32)))
  with pytest.raises(ValueError, match="context_dim = 32, the base's is 16"):
    sd1.with_controlnet(str(path))
  with pytest.raises(ValueError, match="no ControlNet"):
    sd1.generate("a cat", control_image=REFS["pipeline/control"][0])


@pytest.mark.slow
def test_controlnet_trains_on_a_frozen_base_and_samples_through_the_cli(text_workdir, tmp_path, capsys):
  from PIL import Image
  from jdiff.cli import sample as sample_cli
  from jdiff.cli import train as train_cli
  from jdiff.data import shapes
  from test_cli import ROOT, cli

  base = jdiff.load(text_workdir)
  workdir = tmp_path / "controlnet"
  code, out, err = cli(train_cli, capsys, "--config", os.path.join(ROOT, "configs", "controlnet_shapes.py"),
                       "--workdir", workdir, f"--config.finetune.base={text_workdir}",
                       "--config.training.num_steps=4", "--config.training.batch_size=8",
                       "--config.training.checkpoint_every=4", "--config.training.sample_every=0",
                       "--config.sampling.num_samples=4", "--config.sampling.steps=4")
  assert code == 0, err
  assert f"--workdir {workdir} --control_image" in out
  restored = jdiff.load(text_workdir)  # the base is read, never written
  assert jax.tree.all(jax.tree.map(np.array_equal, restored.params, base.params))
  with pytest.raises(ValueError, match="holds a ControlNet"):
    jdiff.load(str(workdir))

  piped = base.with_controlnet(str(workdir))
  sizes = lambda tree: sum(int(np.size(leaf)) for leaf in jax.tree.leaves(tree))
  trained = piped.controlnet.params
  assert sizes(trained) < sizes(base.params["unet"])  # the encoder's copy, not the whole U-Net
  assert any(np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(trained["mid_zero"]))  # the zero convs moved

  mask = shapes.control_examples(1, 0, (5,), 8, "silhouette")["control"][0]
  options = dict(num=2, seed=3, steps=4, guidance_scale=2.0)
  np.testing.assert_array_equal(piped.generate("a red circle", control_image=mask, control_scale=0.0, **options).images,
                                base.generate("a red circle", **options).images)
  png, npz = tmp_path / "mask.png", tmp_path / "controlled.npz"
  Image.fromarray(mask[..., 0]).save(png)
  code, out, err = cli(sample_cli, capsys, "--workdir", workdir, "--control_image", png, "--prompt", "a red circle",
                       "--num", 2, "--seed", 3, "--steps", 4, "--guidance_scale", 2.0, "--out", npz)
  assert code == 0, err
  want = piped.generate("a red circle", control_image=mask, **options).images
  np.testing.assert_array_equal(np.load(npz)["images"], want)
