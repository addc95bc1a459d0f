"""LoRA (jdiff/lora.py) against diffusers: files PEFT and kohya wrote, applied in jdiff, give what diffusers computed
with them, and a file jdiff wrote gives in diffusers (load_lora_weights) what jdiff computes; merging, unmerging,
stacking and the errors of a LoRA made for another model. Fixtures: tests/fixtures/lora, written by
tests/fixtures/make_lora_fixtures.py on the tiny SD 1.x fixture."""
import os

import flax
import jax
import numpy as np
import pytest
from safetensors import safe_open

import jdiff
from jdiff import lora
from jdiff.models.text import TextEncoder
from jdiff.models.unet import UNet

HERE = os.path.dirname(os.path.abspath(__file__))
SD1 = os.path.join(HERE, "fixtures", "diffusers", "sd1")
SD2 = os.path.join(HERE, "fixtures", "diffusers", "sd2")
LORAS = os.path.join(HERE, "fixtures", "lora")
REFS = np.load(os.path.join(LORAS, "references.npz"))


@pytest.fixture(scope="module")
def pipe():
  return jdiff.load(SD1)


@pytest.fixture(scope="module")
def outputs(pipe):
  """params -> the text encoder's hidden states of the reference ids, and the U-Net's prediction (NCHW) on the
  reference inputs with those hidden states as context: one program, compiled once."""
  @jax.jit
  def run(params):
    hidden = TextEncoder(pipe.model.text).apply({"params": params["text_encoder"]}, REFS["ids"].astype(np.int32))
    out = UNet(pipe.config.model).apply({"params": params["unet"]}, REFS["x"].transpose(0, 2, 3, 1), REFS["t"],
                                        context=hidden)
    return {"hidden": hidden, "out": out.transpose(0, 3, 1, 2)}
  return lambda params: jax.device_get(run(params))


def rel_error(got, want) -> float:
  return float(np.abs(got - want).max() / np.abs(want).max())


CASES = (("peft", 1.0, "peft"), ("kohya", 1.0, "peft"), ("peft", 0.5, "peft_half"), ("jdiff", 1.0, "jdiff"))


def torch_layout(kernel) -> np.ndarray:
  kernel = np.asarray(kernel)
  return kernel.transpose(3, 2, 0, 1) if kernel.ndim == 4 else kernel.T


def test_merged_weights_equal_diffusers_fused_ones(pipe):
  """Every kernel a file adapts, merged by jdiff, equals the weight diffusers' fuse_lora made of it (PEFT's and
  kohya's files against diffusers with the PEFT one, at weight 1 and 0.5; jdiff's file against diffusers'
  load_lora_weights of it), and the updates are far above the tolerance."""
  for name, weight, refs in CASES:
    adapter = lora.load(os.path.join(LORAS, f"{name}.safetensors"), pipe.params)
    merged = flax.traverse_util.flatten_dict(pipe.with_lora(adapter, weight).params)
    base = flax.traverse_util.flatten_dict(pipe.params)
    fused = {k.split("/", 2)[2]: k for k in REFS.files if k.startswith(f"fused/{refs}/")}
    assert len(fused) == len(adapter.paths)
    for path in adapter.paths:
      want = REFS[fused.pop("/".join(lora._module_of(pipe.params, path)))]
      got = torch_layout(merged[path])
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
      assert np.abs(torch_layout(base[path]) - want).max() > 1e-2 * np.abs(want).max()


@pytest.mark.slow
def test_lora_files_give_what_diffusers_computes(pipe, outputs):
  """The text encoder's and U-Net's outputs with each file merged equal diffusers' with it loaded (1e-4)."""
  assert rel_error(outputs(pipe.params)["out"], REFS["base/out"]) < 1e-4
  for name, weight, refs in CASES:
    got = outputs(pipe.with_lora(os.path.join(LORAS, f"{name}.safetensors"), weight).params)
    for key in ("hidden", "out"):
      assert rel_error(got[key], REFS[f"{refs}/{key}"]) < 1e-4, (name, weight, key)
      assert rel_error(REFS[f"base/{key}"], REFS[f"{refs}/{key}"]) > 1e-2


def read(path: str) -> tuple[dict, dict]:
  with safe_open(path, framework="numpy") as f:
    return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_jdiff_writes_the_committed_file_again(pipe, tmp_path):
  """Reading jdiff.safetensors and writing it again gives the same tensors and metadata (so the file diffusers
  was checked on is what jdiff.lora.save writes)."""
  committed = os.path.join(LORAS, "jdiff.safetensors")
  lora.save(lora.load(committed, pipe.params), pipe.params, str(tmp_path / "again.safetensors"))
  (tensors, metadata), (want, want_metadata) = read(str(tmp_path / "again.safetensors")), read(committed)
  assert metadata == want_metadata
  assert sorted(tensors) == sorted(want)
  for key in want:
    np.testing.assert_array_equal(tensors[key], want[key])


def test_peft_and_kohya_layouts_read_to_the_same_updates(pipe):
  peft = lora.load(os.path.join(LORAS, "peft.safetensors"), pipe.params)
  kohya = lora.load(os.path.join(LORAS, "kohya.safetensors"), pipe.params)
  # U-Net: 4 transformers x (2 attentions x 4 + 2 feed-forward) + 8 residual blocks x 2 convs; text: 2 layers x 4
  assert peft.paths == kohya.paths and len(peft.paths) == 40 + 16 + 8
  for path in peft.paths:
    assert peft.scale[path] == kohya.scale[path] == (2.0 if path[0] == "unet" else 1.5)
    np.testing.assert_array_equal(peft.down[path], kohya.down[path])
    np.testing.assert_array_equal(peft.up[path], kohya.up[path])


def test_merge_unmerge_and_stacking(pipe):
  """Two LoRAs stacked, then taken off: the base again up to float rounding; stacking adds the updates."""
  first = lora.load(os.path.join(LORAS, "peft.safetensors"), pipe.params)
  both = pipe.with_lora(first, 0.7).with_lora(os.path.join(LORAS, "jdiff.safetensors"), -0.3)
  base, back = flax.traverse_util.flatten_dict(pipe.params), flax.traverse_util.flatten_dict(
      both.without_lora().params)
  merged = flax.traverse_util.flatten_dict(both.params)
  second = lora.load(os.path.join(LORAS, "jdiff.safetensors"), pipe.params)
  for path in base:
    np.testing.assert_allclose(back[path], base[path], atol=1e-6)
    want = np.asarray(base[path], np.float64)
    for adapter, weight in ((first, 0.7), (second, -0.3)):
      if path in adapter.down:
        want = want + weight * adapter.scale[path] * np.einsum("...ir,ro->...io", adapter.down[path],
                                                               adapter.up[path])
    np.testing.assert_allclose(merged[path], want, atol=1e-5)
  assert len(both.loras) == 2 and both.without_lora().loras == ()


def test_save_and_load_round_trip_exactly_with_mixed_ranks_and_scales(pipe, tmp_path):
  """A LoRA whose modules differ in rank and scale (folded into lora_B by the writer) reads back to the same
  updates."""
  paths = lora.target_paths(pipe.params, ("attention", "conv"), ("unet", "text_encoder"))
  rng = np.random.default_rng(3)
  flat = flax.traverse_util.flatten_dict(pipe.params)
  down, up, scale = {}, {}, {}
  for i, path in enumerate(paths):
    r = 1 + i % 3
    down[path] = rng.normal(size=(*flat[path].shape[:-1], r)).astype(np.float32)
    up[path] = rng.normal(size=(r, flat[path].shape[-1])).astype(np.float32)
    scale[path] = [0.5, 1.0, 2.0][i % 3]
  made = lora.LoRA(down, up, scale)
  lora.save(made, pipe.params, str(tmp_path / "mixed.safetensors"))
  back = lora.load(str(tmp_path / "mixed.safetensors"), pipe.params)
  assert back.paths == made.paths
  for path in paths:
    update = lambda d, u, s: s * np.einsum("...ir,ro->...io", d, u)
    np.testing.assert_allclose(update(back.down[path], back.up[path], back.scale[path]),
                               update(down[path], up[path], scale[path]), rtol=1e-6, atol=1e-6)


def test_a_lora_for_another_model_is_refused_naming_module_and_shapes(pipe):
  """A model whose to_k takes a wider context than the LoRA's (as SD 2's 1024 against SD 1's 768)."""
  flat = flax.traverse_util.flatten_dict(pipe.params)
  path = ("unet", "down0_attn0", "transformer_blocks_0", "attn2", "to_k", "kernel")
  flat[path] = np.zeros((24, flat[path].shape[1]), np.float32)
  other = flax.traverse_util.unflatten_dict(flat)
  with pytest.raises(lora.LoRAMismatchError, match=r"does not fit module 'unet/down0_attn0/transformer_blocks_0/attn2/"
                     r"to_k': its kernel is \[24, 8\], the LoRA's down is \[16, 4\] and up \[4, 8\]"):
    lora.load(os.path.join(LORAS, "peft.safetensors"), other)


def test_unknown_modules_and_missing_files_are_named(pipe, tmp_path):
  from safetensors.numpy import save_file
  path = str(tmp_path / "odd.safetensors")
  save_file({"unet.down_blocks.7.attentions.0.to_q.lora_A.weight": np.zeros((2, 8), np.float32)}, path)
  with pytest.raises(lora.LoRAMismatchError, match=r"module unet.down_blocks.7.attentions.0.to_q has no place"):
    pipe.with_lora(path)
  with pytest.raises(FileNotFoundError, match="no LoRA file"):
    pipe.with_lora(str(tmp_path / "missing.safetensors"))


@pytest.mark.slow
def test_sample_cli_stacks_loras(pipe, tmp_path, capsys):
  """sample.py --lora FILE:WEIGHT (twice) samples what Pipeline.with_lora does."""
  from jdiff.cli import sample as sample_cli
  out = tmp_path / "x.npz"
  peft, mine = os.path.join(LORAS, "peft.safetensors"), os.path.join(LORAS, "jdiff.safetensors")
  with pytest.raises(SystemExit) as exit_:
    sample_cli.run(["sample.py", "--model", SD1, "--lora", f"{peft}:0.5", "--lora", mine, "--prompt",
                    "a photo of a cat", "--num", "2", "--steps", "3", "--out", str(out)])
  assert exit_.value.code in (0, None), capsys.readouterr().err
  same = pipe.with_lora(peft, 0.5).with_lora(mine).generate("a photo of a cat", num=2, steps=3)
  np.testing.assert_array_equal(np.load(out)["images"], same.images)
  assert not np.array_equal(same.images, pipe.generate("a photo of a cat", num=2, steps=3).images)


def test_sample_cli_refuses_a_missing_lora_before_loading(tmp_path, capsys):
  from jdiff.cli import sample as sample_cli
  with pytest.raises(SystemExit) as exit_:
    sample_cli.run(["sample.py", "--model", SD1, "--lora", str(tmp_path / "none.safetensors:0.5"), "--out",
                    str(tmp_path / "x.png")])
  err = capsys.readouterr().err
  assert exit_.value.code == 2 and "--lora=" in err and "no file or directory" in err, err
  assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
def test_sample_cli_names_a_lora_that_does_not_fit(tmp_path, capsys):
  from jdiff.cli import sample as sample_cli
  with pytest.raises(SystemExit) as exit_:
    sample_cli.run(["sample.py", "--model", SD2, "--lora", os.path.join(LORAS, "kohya.safetensors"), "--out",
                    str(tmp_path / "x.png")])
  err = capsys.readouterr().err
  assert exit_.value.code == 2 and "does not fit module" in err and "its kernel is" in err, err
  assert not (tmp_path / "x.png").exists()
