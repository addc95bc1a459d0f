"""Stable Diffusion in diffusers' format: jdiff's U-Net, VAE and CLIP text encoder against what diffusers and
transformers computed on the same tiny random models (tests/fixtures/diffusers, written by
tests/fixtures/make_diffusers_fixtures.py), whole text-to-image runs against StableDiffusionPipeline, loading
errors, and exports that diffusers reads (checked when the fixtures were made) and jdiff reads back bit for bit."""
import json
import os
import re
import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jdiff
from jdiff import samplers, schedulers
from jdiff.clip_tokenizer import CLIPTokenizer
from jdiff.interop import configs, names, pretrained
from jdiff.models.text import TextEncoder
from jdiff.models.unet import UNet
from jdiff.models.vae import AutoencoderKL

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "diffusers")
REFS = np.load(os.path.join(FIXTURES, "references.npz"))


def rel_error(got, want) -> float:
  """max |got - want| relative to the largest |want|."""
  return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def text_hidden(config, params, ids):
  return jax.jit(lambda p, i: TextEncoder(config).apply({"params": p}, i))(params, ids)


def unet_out(config, params, x, t, context=None, labels=None):
  """The U-Net on diffusers-layout (NCHW) inputs, returned in that layout."""
  run = jax.jit(lambda p, x, t, c, l: UNet(config).apply({"params": p}, x, t, l, context=c))
  return nchw(run(params, nhwc(x), t, context, labels))


def vae_outputs(config, params, images, latents):
  """(posterior mean, log-variance, decoded latents), NCHW in and out."""
  def run(p, images, latents):
    vae = AutoencoderKL(config)
    posterior = vae.apply({"params": p}, images, method=AutoencoderKL.encode)
    return posterior.mean, posterior.logvar, vae.apply({"params": p}, latents, method=AutoencoderKL.decode)
  return tuple(nchw(a) for a in jax.jit(run)(params, nhwc(images), nhwc(latents)))


@pytest.fixture(scope="module")
def pipes():
  """The SD-1-like and SD-2-like fixtures, loaded: their tokenizer/ and scheduler config as they ship."""
  return {kind: jdiff.load(os.path.join(FIXTURES, kind)) for kind in ("sd1", "sd2")}


@pytest.fixture(params=["sd1", "sd2"])
def sd(request, pipes):
  """(kind, pipeline) of each fixture."""
  return request.param, pipes[request.param]


# Components, to a relative error of 1e-4 in fp32.

def test_configs_map_sd_1_and_2_architectures(sd):
  kind, pipe = sd
  unet, text = pipe.config.model, pipe.model.text
  assert (unet.flip_sin_to_cos, unet.freq_shift, unet.norm_eps, unet.scale_shift) == (True, 0, 1e-5, False)
  if kind == "sd1":
    assert (unet.level_heads, unet.linear_projection, unet.context_dim, text.activation, text.depth) == \
        ((2, 2), False, 16, "quick_gelu", 2)
    assert pipe.config.diffusion.prediction == "eps"
  else:
    assert (unet.level_heads, unet.linear_projection, unet.context_dim, text.activation, text.depth) == \
        ((2, 4, 4), True, 12, "gelu", 3)
    assert pipe.config.diffusion.prediction == "v"
  assert pipe.codec.scaling_factor == np.float32(0.18215) and pipe.image_shape == (16, 16, 3)
  assert pipe.schedule.num_timesteps == 1000 and pipe.config.sampling.guidance_scale == 7.5
  np.testing.assert_allclose(np.asarray(pipe.schedule.betas)[[0, -1]], [0.00085, 0.012], rtol=1e-6)


def test_configs_round_trip_through_diffusers_fields(sd):
  kind, pipe = sd
  assert configs.unet_config(configs.diffusers_unet_config(pipe.config.model)) == pipe.config.model
  assert configs.text_config(configs.diffusers_text_config(pipe.model.text)) == pipe.model.text
  assert configs.vae_config(configs.diffusers_vae_config(pipe.codec.vae, 0.13)) == (pipe.codec.vae, 0.13)
  for sampler in [s for s in samplers.SAMPLERS if s != "lcm"]:  # lcm: consistency models, no scheduler config
    for spacing in ("leading",) if sampler == "plms" else ("leading", "trailing", "linspace", "karras"):
      raw = configs.diffusers_scheduler_config(schedule="scaled_linear", num_timesteps=1000, prediction="v",
                                               sampler=sampler, spacing=spacing, clip_x0=False)
      schedule, options = schedulers.sampler_options_from_diffusers(raw)
      levels = options["spacing"]
      karras = "use_karras_sigmas" in schedulers.CLASS_DEFAULTS[schedulers.CLASS_OF_SAMPLER[sampler]]
      expected = "trailing" if spacing == "karras" and not karras else spacing
      assert (options["sampler"], "karras" if levels.karras else levels.spacing, options["prediction"]) == \
          (sampler, expected, "v") and levels.steps_offset == 0 and configs.schedule_name(raw) == "scaled_linear"
      np.testing.assert_allclose(schedule.betas, pipe.schedule.betas, rtol=1e-6)


def test_clip_tokenizer_of_the_directory_gives_transformers_ids(sd):
  kind, pipe = sd
  assert isinstance(pipe.tokenizer, CLIPTokenizer)
  prompts = [str(p) for p in REFS[f"{kind}/pipeline/prompts"]]
  np.testing.assert_array_equal(pipe.tokenizer.encode(prompts + [""]), REFS[f"{kind}/text/ids"])
  np.testing.assert_array_equal(pipe.tokenizer.encode(str(REFS[f"{kind}/pipeline/negative"])),
                                REFS[f"{kind}/pipeline/negative_ids"])


def test_text_encoder_hidden_states_equal_transformers(sd):
  kind, pipe = sd
  hidden = text_hidden(pipe.model.text, pipe.params["text_encoder"], REFS[f"{kind}/text/ids"])
  assert rel_error(hidden, REFS[f"{kind}/text/hidden"]) < 1e-4


def test_unet_noise_prediction_equals_diffusers(sd):
  kind, pipe = sd
  out = unet_out(pipe.config.model, pipe.params["unet"], REFS[f"{kind}/unet/x"], REFS[f"{kind}/unet/t"],
                 REFS[f"{kind}/unet/context"])
  assert rel_error(out, REFS[f"{kind}/unet/out"]) < 1e-4


def test_vae_encode_and_decode_equal_diffusers(sd):
  kind, pipe = sd
  mean, logvar, decoded = vae_outputs(pipe.codec.vae, pipe.codec.params, REFS[f"{kind}/vae/images"],
                                      REFS[f"{kind}/vae/mean"])
  assert rel_error(mean, REFS[f"{kind}/vae/mean"]) < 1e-4 and rel_error(logvar, REFS[f"{kind}/vae/logvar"]) < 1e-4
  assert rel_error(decoded, REFS[f"{kind}/vae/decoded"]) < 1e-4


def test_inpainting_unet_with_nine_input_channels_equals_diffusers():
  path = os.path.join(FIXTURES, "inpaint_unet")
  config = configs.unet_config(pretrained.read_config(path, "unet"))
  assert (config.in_channels, config.output_channels) == (9, 4)
  params = pretrained.read_params(path, "unet", pretrained.abstract_unet_params(config),
                                  names.unet_module_name(2, True), "float32", None, jax.devices()[0])
  out = unet_out(config, params, REFS["inpaint/unet/x"], REFS["inpaint/unet/t"], REFS["inpaint/unet/context"])
  assert rel_error(out, REFS["inpaint/unet/out"]) < 1e-4


# Whole text-to-image runs: 10 steps, guidance 7.5, the same initial latents as StableDiffusionPipeline.

def cases():
  """(kind, case): 'sd_*' is the directory's shipped scheduler config (PNDM, steps_offset 1, set_alpha_to_one false)
  read as plms (its own class, what generate does by default), ddim, euler or dpmpp_2m, as diffusers'
  from_config(pipe.scheduler.config) reads it; 'jdiff_*' are scheduler configs with jdiff's own conventions, stored
  with the references. The fast tier runs four; the rest are slow."""
  fast = {("sd1", "sd_plms"), ("sd1", "sd_euler"), ("sd2", "sd_ddim"), ("sd2", "sd_dpmpp_2m")}
  for kind in ("sd1", "sd2"):
    for case in ("sd_plms", "sd_ddim", "sd_euler", "sd_dpmpp_2m", "jdiff_ddim", "jdiff_euler", "jdiff_dpmpp_2m"):
      marks = [] if (kind, case) in fast else [pytest.mark.slow]
      yield pytest.param(kind, case, marks=marks, id=f"{kind}-{case}")


@pytest.mark.parametrize("kind, case", cases())
def test_text_to_image_equals_stable_diffusion_pipeline(pipes, kind, case):
  pipe = pipes[kind]
  if case.startswith("sd_"):  # the directory's scheduler: no sampler for its own class, else the sampler's name
    options = {} if case == "sd_plms" else dict(sampler=case.removeprefix("sd_"))
  else:
    _, options = schedulers.sampler_options_from_diffusers(json.loads(str(REFS[f"{kind}/pipeline/{case}/scheduler"])))
    options = dict(sampler=options["sampler"], spacing=options["spacing"])
  samples = pipe.generate([str(p) for p in REFS[f"{kind}/pipeline/prompts"]],
                          negative_prompt=str(REFS[f"{kind}/pipeline/negative"]),
                          latents=nhwc(REFS[f"{kind}/pipeline/latents"]), steps=10, guidance_scale=7.5, **options)
  images = np.clip(np.asarray(pipe.codec.decode(samples.latents)) / 2 + 0.5, 0.0, 1.0)
  want = REFS[f"{kind}/pipeline/{case}/images"]
  assert np.abs(images - want).max() < 1e-3
  assert samples.images.shape == (2, 16, 16, 3) and np.abs(want - want[::-1]).max() > 0.1  # two distinct images


# Loading: dtypes, variants, and errors that name what is wrong.

def test_bfloat16_networks_with_fp32_sampling_stay_close_to_diffusers_fp32(pipes):
  pipe = jdiff.load(os.path.join(FIXTURES, "sd1"), dtype="bfloat16")
  leaves = jax.tree.leaves((pipe.params, pipe.codec.params))
  assert {leaf.dtype for leaf in leaves} == {jnp.dtype(jnp.bfloat16)} and pipe.config.model.dtype == "bfloat16"
  assert pipe.schedule.sigmas.dtype == jnp.float32
  samples = pipe.generate([str(p) for p in REFS["sd1/pipeline/prompts"]],
                          negative_prompt=str(REFS["sd1/pipeline/negative"]),
                          latents=nhwc(REFS["sd1/pipeline/latents"]),
                          sampler="dpmpp_2m", spacing="trailing", steps=10, guidance_scale=7.5)
  assert samples.latents.dtype == np.float32
  images = np.clip(np.asarray(pipes["sd1"].codec.decode(samples.latents)) / 2 + 0.5, 0.0, 1.0)
  error = np.abs(images - REFS["sd1/pipeline/jdiff_dpmpp_2m/images"]).max()
  assert 1e-4 < error < 5e-2  # bfloat16's 8-bit mantissa, not a different computation


def copy_fixture(tmp_path, kind="sd1"):
  target = tmp_path / kind
  shutil.copytree(os.path.join(FIXTURES, kind), target)
  return target


def edit_config(path, change):
  raw = json.loads(path.read_text())
  change(raw)
  path.write_text(json.dumps(raw))


@pytest.mark.parametrize("component, field, value, message", [
    ("unet", "attention_type", "gated", "unet/config.json: attention_type='gated' is not supported by jdiff "
                                        "(supported: 'default')"),
    ("unet", "class_embed_type", "timestep", "class_embed_type='timestep' is not supported"),
    ("unet", "down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"], "down_block_types="),
    ("unet", "some_new_field", 3, "some_new_field=3 is not supported by jdiff (supported: a config without this"),
    ("vae", "shift_factor", 0.1159, "vae/config.json: shift_factor=0.1159 is not supported"),
    ("text_encoder", "hidden_act", "relu", "hidden_act='relu' is not supported by jdiff (supported: 'quick_gelu' or "
                                           "'gelu')"),
])
def test_unsupported_config_fields_are_named(tmp_path, component, field, value, message):
  path = copy_fixture(tmp_path)
  edit_config(path / component / "config.json", lambda raw: raw.update({field: value}))
  with pytest.raises(configs.UnsupportedConfigError, match=re.escape(message)):
    jdiff.load(str(path))


def test_scheduler_config_fields_jdiff_cannot_follow_are_named(tmp_path):
  path = copy_fixture(tmp_path)
  scheduler = path / "scheduler" / "scheduler_config.json"
  edit_config(scheduler, lambda raw: raw.update(beta_schedule="sigmoid"))
  with pytest.raises(configs.UnsupportedConfigError, match=r"scheduler/scheduler_config.json: scheduler config "
                                                           r"beta_schedule='sigmoid' is not supported by jdiff"):
    jdiff.load(str(path))
  edit_config(scheduler, lambda raw: raw.update(beta_schedule="scaled_linear", clip_sample=True))
  pipe = jdiff.load(str(path))  # PNDM has no clip_sample; DDIM reading the same config has
  with pytest.raises(ValueError, match=r"clip_sample=True \(DDIMScheduler\) is not supported by jdiff.*"
                                       r"scheduler_config.json; or pass a spacing name"):
    pipe.generate("a photo of a cat", sampler="ddim", steps=2)
  edit_config(scheduler, lambda raw: raw.update(_class_name="DDIMScheduler", thresholding=True))
  with pytest.warns(UserWarning, match=r"thresholding=True \(DDIMScheduler\) is not supported by jdiff.*jdiff "
                                       r"samples this model with its own conventions \(ddim, leading spacing\)"):
    pipe = jdiff.load(str(path))
  assert pipe.scheduler_config is None and pipe.config.sampling.sampler == "ddim"


def test_weight_files_errors_say_what_to_do(tmp_path):
  path = copy_fixture(tmp_path)
  weights = path / "unet" / "diffusion_pytorch_model.safetensors"
  weights.rename(path / "unet" / "diffusion_pytorch_model.bin")
  with pytest.raises(ValueError, match=r"diffusion_pytorch_model.bin is a PyTorch pickle, which jdiff does not read.*"
                                       r"safe_serialization=True"):
    jdiff.load(str(path))
  (path / "unet" / "diffusion_pytorch_model.bin").unlink()
  with pytest.raises(FileNotFoundError, match="no diffusion_pytorch_model.safetensors in"):
    jdiff.load(str(path))
  with pytest.raises(ValueError, match="is a file; jdiff.load reads a work dir or a diffusers directory"):
    jdiff.load(str(path / "model_index.json"))
  with pytest.raises(FileNotFoundError, match=r"no model.fp32.safetensors in .*text_encoder; it holds "
                                              r"model.fp16.safetensors \(pass variant='fp16'\)"):
    jdiff.load(os.path.join(FIXTURES, "sd2"), variant="fp32")


def test_mismatched_config_and_weights_are_refused(tmp_path):
  path = copy_fixture(tmp_path)
  edit_config(path / "unet" / "config.json", lambda raw: raw.update(cross_attention_dim=32))
  with pytest.raises(configs.UnsupportedConfigError, match="hidden_size 16 is not the U-Net's cross_attention_dim 32"):
    jdiff.load(str(path))
  path = copy_fixture(tmp_path / "b")
  edit_config(path / "unet" / "config.json", lambda raw: raw.update(layers_per_block=2))
  with pytest.raises(ValueError, match=r"unet: no weight 'down_blocks\.0\.\w+\.1\.[\w.]+' in the safetensors files, "
                                       "though config.json implies it"):
    jdiff.load(str(path))
  edit_config(path / "unet" / "config.json", lambda raw: raw.update(layers_per_block=1, block_out_channels=[8, 32]))
  with pytest.raises(ValueError, match=r"weight '[\w.]+' has shape \[\d+(, \d+)*\], but config.json implies"):
    jdiff.load(str(path))
  edit_config(path / "unet" / "config.json", lambda raw: raw.update(block_out_channels=[8, 16]))
  weights = str(path / "unet" / "diffusion_pytorch_model.safetensors")
  save_file({**load_file(weights), "extra.weight": np.zeros(3, np.float32)}, weights)
  with pytest.raises(ValueError, match="unet: 1 weights have no place in the model config.json describes, e.g. "
                                       "extra.weight"):
    jdiff.load(str(path))


def test_prompts_need_a_tokenizer(tmp_path):
  path = copy_fixture(tmp_path)
  shutil.rmtree(path / "tokenizer")
  pipe = jdiff.load(str(path))
  with pytest.raises(ValueError, match=r"this pipeline has no tokenizer for its prompts: pass jdiff.load\(.*"
                                       r"tokenizer=...\) an object whose encode\(prompts\) returns int32 token ids"):
    pipe.generate("a photo of a cat", steps=2)


# Export: what diffusers loaded when the fixtures were made, and what jdiff reads back.

def flat(params):
  return flax.traverse_util.flatten_dict(jax.device_get(params))


@pytest.mark.parametrize("name", ["export_class", "export_text", "sd1"])
def test_export_rewrites_the_same_files_and_reads_back_bit_for_bit(tmp_path, name):
  pipe = jdiff.load(os.path.join(FIXTURES, name))
  out = tmp_path / "exported"
  jdiff.export_diffusers(pipe, str(out))
  for component in ("unet", "vae", "text_encoder"):
    source = os.path.join(FIXTURES, name, component)
    if not os.path.isdir(source):
      assert not (out / component).exists()
      continue
    file = "model.safetensors" if component == "text_encoder" else "diffusion_pytorch_model.safetensors"
    want, got = load_file(os.path.join(source, file)), load_file(str(out / component / file))
    want = {k.removeprefix("text_model."): v for k, v in want.items()}
    got = {k.removeprefix("text_model."): v for k, v in got.items()}
    assert sorted(got) == sorted(k for k in want if not k.endswith("position_ids"))
    for key, value in got.items():
      np.testing.assert_array_equal(value, want[key])
  again = jdiff.load(str(out))
  codecs = (pipe.codec and pipe.codec.params, again.codec and again.codec.params)
  for before, after in ((pipe.params, again.params), codecs):
    a, b = flat(before or {}), flat(after or {})
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
  assert again.config.model.level_heads == pipe.config.model.level_heads and again.config == pipe.config
  with open(os.path.join(FIXTURES, name, "scheduler", "scheduler_config.json")) as f:
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text()) == json.load(f)
  with pytest.raises(FileExistsError, match="exists; choose another directory or pass overwrite=True"):
    jdiff.export_diffusers(pipe, str(out))


def test_exported_class_unet_equals_diffusers_on_the_export():
  pipe = jdiff.load(os.path.join(FIXTURES, "export_class"))
  assert pipe.config.model.num_classes == 10 and pipe.config.model.scale_shift
  out = unet_out(pipe.config.model, pipe.params, REFS["export_class/unet/x"], REFS["export_class/unet/t"],
                 labels=REFS["export_class/unet/labels"].astype(np.int32))
  assert rel_error(out, REFS["export_class/unet/out"]) < 1e-4


def test_exported_text_model_and_vae_equal_diffusers_on_the_export():
  pipe = jdiff.load(os.path.join(FIXTURES, "export_text"))
  hidden = text_hidden(pipe.model.text, pipe.params["text_encoder"], REFS["export_text/text/ids"])
  assert rel_error(hidden, REFS["export_text/text/hidden"]) < 1e-4
  out = unet_out(pipe.config.model, pipe.params["unet"], REFS["export_text/unet/x"], REFS["export_text/unet/t"],
                 REFS["export_text/text/hidden"])
  assert rel_error(out, REFS["export_text/unet/out"]) < 1e-4
  mean, logvar, decoded = vae_outputs(pipe.codec.vae, pipe.codec.params, REFS["export_text/vae/images"],
                                      REFS["export_text/vae/mean"])
  assert rel_error(mean, REFS["export_text/vae/mean"]) < 1e-4
  assert rel_error(logvar, REFS["export_text/vae/logvar"]) < 1e-4
  assert rel_error(decoded, REFS["export_text/vae/decoded"]) < 1e-4
  assert pipe.codec.scaling_factor == 0.5


# sample.py --model.

def test_sample_cli_samples_a_diffusers_directory(tmp_path, capsys):
  from jdiff.cli import sample as sample_cli
  model = os.path.join(FIXTURES, "export_class")
  out = tmp_path / "threes.npz"
  with pytest.raises(SystemExit) as exit_:
    sample_cli.run(["sample.py", "--model", model, "--label", "3", "--num", "2", "--steps", "3", "--out", str(out)])
  assert exit_.value.code in (0, None), capsys.readouterr().err
  assert f"wrote 2 images from {model} to {out}" in capsys.readouterr().out
  same = jdiff.load(model).generate(num=2, label=3, steps=3)
  np.testing.assert_array_equal(np.load(out)["images"], same.images)
  for args, message in ((["--model", model], "--model needs --out"),
                        (["--model", model, "--workdir", model, "--out", str(tmp_path / "x.png")], "not both"),
                        (["--model", model, "--checkpoint", "3", "--out", str(tmp_path / "x.png")],
                         "--checkpoint applies to --workdir")):
    with pytest.raises(SystemExit) as exit_:
      sample_cli.run(["sample.py", *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("sample.py: error: ") and message in err, err


def test_export_cli_writes_a_work_dir_that_loads_back_bit_for_bit(tiny_workdir, tmp_path, capsys):
  from jdiff.cli import export as export_cli
  out = tmp_path / "exported"
  with pytest.raises(SystemExit) as exit_:
    export_cli.run(["export.py", "--workdir", tiny_workdir, "--out", str(out)])
  assert exit_.value.code in (0, None), capsys.readouterr().err
  assert f"wrote checkpoint 20 of {tiny_workdir} to {out}" in capsys.readouterr().out
  assert json.loads((out / "unet" / "config.json").read_text())["num_class_embeds"] == 11
  a, b = flat(jdiff.load(tiny_workdir).params), flat(jdiff.load(str(out)).params)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  with pytest.raises(SystemExit) as exit_:
    export_cli.run(["export.py", "--workdir", tiny_workdir, "--out", str(out)])
  assert exit_.value.code == 2 and "exists; choose another directory or pass --overwrite" in capsys.readouterr().err
