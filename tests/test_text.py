"""Text conditioning: tokenizer, CLIP-layout text encoder, cross-attention blocks, SD-1.5 size, captions, prompts."""
import functools
import os
import re
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jdiff
from jdiff import samplers
from jdiff.build import param_count
from jdiff.config import ConfigError, DataConfig, parse_config
from jdiff.configs import tiny_text
from jdiff.data import make_train_iterator, shapes
from jdiff.models.layers import CrossAttention, SpatialTransformer
from jdiff.models.text import (CLIP_VIT_L14_TEXT, TextEncoder, TextEncoderConfig, TextToImageUNet,
                               clip_text_params)
from jdiff.models.unet import UNet, UNetConfig
from jdiff.tokenizer import Tokenizer
from jdiff.train import train_and_evaluate
from jdiff.train.step import drop_captions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD15_UNET = UNetConfig(image_size=64, in_channels=4, channels=320, channel_mults=(1, 2, 4, 4), num_res_blocks=2,
                       attention_resolutions=(64, 32, 16), num_heads=8, dropout=0.0, scale_shift=False,
                       norm_groups=32, context_dim=768)


def abstract_params(module, *args, **kwargs):
  return jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))["params"]


# Tokenizer.

def test_tokenizer_round_trip_and_empty_prompt():
  tokenizer = Tokenizer(max_length=12)
  ids = tokenizer.encode(["a small red circle at the top left", "", "A Red-Square!"])
  assert ids.shape == (3, 12) and ids.dtype == np.int32
  assert ids[1].tolist() == [1, 2] + [0] * 10  # BOS, EOS, PAD...
  assert ids[0, 0] == 1 and ids[0, 9] == 2 and ids[0, 10:].tolist() == [0, 0]
  assert tokenizer.decode(ids) == ["a small red circle at the top left", "", "a red square"]
  assert tokenizer.encode("a red square").tolist() == ids[2:].tolist()


def test_tokenizer_rejects_unknown_words_and_long_captions():
  tokenizer = Tokenizer(max_length=6)
  with pytest.raises(ValueError, match="word 'teal' in caption 'a teal circle' is not in the tokenizer's vocab"):
    tokenizer.encode("a teal circle")
  with pytest.raises(ValueError, match="has 5 words; at most 4 fit in max_length=6"):
    tokenizer.encode("a small red circle left")


def test_tokenizer_knows_every_shapes_caption_and_class_name():
  tokenizer = Tokenizer(max_length=12)
  captions = [shapes.caption(c, s, z, p) for c in range(6) for s in range(3) for z in range(2) for p in range(5)]
  assert tokenizer.decode(tokenizer.encode(captions)) == captions
  cifar = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
  fashion = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
  tokenizer.encode([f"a photo of a {name}" for name in cifar + fashion + [str(d) for d in range(10)]])


# Text encoder.

def test_clip_vit_l14_text_encoder_has_clips_parameter_count_and_names():
  params = abstract_params(TextEncoder(CLIP_VIT_L14_TEXT), jnp.zeros((1, 77), jnp.int32))
  assert param_count(params) == 123_060_480  # Hugging Face CLIPTextModel, openai/clip-vit-large-patch14.
  flat = {"/".join(path) for path in flax.traverse_util.flatten_dict(params)}
  for name in ("embeddings/token_embedding/embedding", "embeddings/position_embedding/embedding",
               "encoder/layers_11/self_attn/q_proj/kernel", "encoder/layers_0/self_attn/out_proj/bias",
               "encoder/layers_3/layer_norm1/scale", "encoder/layers_3/mlp/fc1/kernel", "encoder/layers_3/mlp/fc2/bias",
               "encoder/layers_3/layer_norm2/bias", "final_layer_norm/scale"):
    assert name in flat, name
  assert params["embeddings"]["token_embedding"]["embedding"].shape == (49408, 768)
  assert params["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"].shape == (768, 3072)


@pytest.mark.parametrize("causal", [True, False])
def test_causal_mask_hides_later_tokens(causal):
  config = TextEncoderConfig(vocab_size=20, max_length=6, width=16, depth=2, num_heads=2, mlp_dim=32, causal=causal)
  encoder = TextEncoder(config)
  ids = jnp.array([[1, 5, 6, 7, 2, 0]])
  params = jax.jit(encoder.init)(jax.random.key(0), ids)
  apply = jax.jit(encoder.apply)
  out, changed = apply(params, ids), apply(params, ids.at[0, 3].set(9))
  earlier = np.abs(np.asarray(out - changed))[0, :3].max()
  assert np.abs(np.asarray(out - changed))[0, 3:].max() > 1e-3
  assert (earlier == 0.0) if causal else (earlier > 1e-3)


def test_clip_state_dict_loads_into_the_encoder():
  config = TextEncoderConfig(vocab_size=30, max_length=8, width=16, depth=2, num_heads=2, mlp_dim=32)
  encoder = TextEncoder(config)
  params = jax.device_get(jax.jit(encoder.init)(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"])
  # The names and layouts of a Hugging Face CLIPTextModel state dict (torch Linear weights are [out, in]).
  state = {"text_model.embeddings.position_ids": np.arange(8)[None],
           "text_model.embeddings.token_embedding.weight": params["embeddings"]["token_embedding"]["embedding"],
           "text_model.embeddings.position_embedding.weight": params["embeddings"]["position_embedding"]["embedding"],
           "text_model.final_layer_norm.weight": params["final_layer_norm"]["scale"],
           "text_model.final_layer_norm.bias": params["final_layer_norm"]["bias"]}
  for i in range(2):
    layer = params["encoder"][f"layers_{i}"]
    for module, leaves in [("self_attn.q_proj", layer["self_attn"]["q_proj"]), ("self_attn.k_proj",
                           layer["self_attn"]["k_proj"]), ("self_attn.v_proj", layer["self_attn"]["v_proj"]),
                           ("self_attn.out_proj", layer["self_attn"]["out_proj"]), ("mlp.fc1", layer["mlp"]["fc1"]),
                           ("mlp.fc2", layer["mlp"]["fc2"])]:
      state[f"text_model.encoder.layers.{i}.{module}.weight"] = leaves["kernel"].T
      state[f"text_model.encoder.layers.{i}.{module}.bias"] = leaves["bias"]
    for norm in ("layer_norm1", "layer_norm2"):
      state[f"text_model.encoder.layers.{i}.{norm}.weight"] = layer[norm]["scale"]
      state[f"text_model.encoder.layers.{i}.{norm}.bias"] = layer[norm]["bias"]
  loaded = clip_text_params(state)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  with pytest.raises(ValueError, match="unexpected CLIP text weight 'vision_model.post_layernorm.weight'"):
    clip_text_params({"vision_model.post_layernorm.weight": np.zeros(3)})


# Cross-attention and the U-Net.

def test_sd15_unet_parameter_count_matches_diffusers():
  params = abstract_params(UNet(SD15_UNET), jnp.zeros((1, 64, 64, 4)), jnp.zeros((1,)),
                           context=jnp.zeros((1, 77, 768)))
  assert param_count(params) == 859_520_964  # diffusers' UNet2DConditionModel of Stable Diffusion 1.5.
  assert set(params["down0_attn0"]) == {"norm", "proj_in", "transformer_blocks_0", "proj_out"}
  assert params["mid_attn"]["transformer_blocks_0"]["attn2"]["to_k"]["kernel"].shape == (768, 1280)


def test_cross_attention_to_one_token_is_its_projected_value_and_ignores_token_order():
  attention = CrossAttention(num_heads=2)
  x, context = jax.random.normal(jax.random.key(0), (2, 5, 8)), jax.random.normal(jax.random.key(1), (2, 3, 12))
  params = jax.jit(attention.init)(jax.random.key(2), x, context)["params"]
  apply = jax.jit(lambda context: attention.apply({"params": params}, x, context))
  one = apply(context[:, :1])
  p = params
  expected = (context[:, :1] @ p["to_v"]["kernel"]) @ p["to_out"]["kernel"] + p["to_out"]["bias"]
  np.testing.assert_allclose(one, jnp.broadcast_to(expected, one.shape), rtol=1e-5, atol=1e-5)
  full, permuted = apply(context), apply(context[:, ::-1])
  np.testing.assert_allclose(full, permuted, rtol=1e-5, atol=1e-5)


def test_spatial_transformer_starts_as_identity_and_then_reads_the_context():
  block = SpatialTransformer(num_heads=2, depth=2, groups=4)
  x, context = jax.random.normal(jax.random.key(0), (2, 4, 4, 8)), jax.random.normal(jax.random.key(1), (2, 3, 6))
  params = jax.jit(block.init)(jax.random.key(2), x, context)["params"]
  apply = jax.jit(lambda params, context: block.apply({"params": params}, x, context))
  np.testing.assert_array_equal(apply(params, context), x)  # proj_out starts at zero
  params = jax.tree.map(lambda p: p + 0.1, params)
  a, b = apply(params, context), apply(params, context + 1.0)
  assert np.abs(np.asarray(a - b)).max() > 1e-3


def test_class_and_text_conditioning_are_exclusive():
  with pytest.raises(ValueError, match="num_classes=10 is invalid: expected 0 when context_dim > 0"):
    UNetConfig(num_classes=10, context_dim=64)


# Training pieces.

def test_caption_dropout_uses_the_empty_prompt_at_the_given_rate():
  ids = jnp.tile(jnp.arange(8, dtype=jnp.int32)[None] + 3, (20_000, 1))
  empty = jnp.asarray(Tokenizer(8).encode("")[0])
  dropped = np.asarray(drop_captions(jax.random.key(0), ids, empty, 0.1))
  is_empty = (dropped == np.asarray(empty)).all(axis=1)
  assert np.all(is_empty | (dropped == np.asarray(ids)).all(axis=1))
  assert abs(is_empty.mean() - 0.1) < 0.01


def test_guidance_batches_token_id_conditions_with_the_empty_prompt():
  # A model whose output is a known function of the prompt's ids: guidance must pair each image with its own prompt
  # in the conditional half and with the empty prompt in the unconditional half.
  fn = lambda x, t, ids: x * ids.sum(axis=-1)[:, None, None, None] + t[:, None, None, None]
  ids = jnp.asarray(Tokenizer(12).encode(["a red circle", "a blue square at the top left"]))
  empty = jnp.asarray(Tokenizer(12).encode("")[0])
  x, t = jax.random.normal(jax.random.key(1), (2, 8, 8, 3)), jnp.array([300.0, 700.0])
  guided = jax.jit(samplers.guided_model_fn(fn, guidance_scale=3.0, uncond=empty))(x, t, ids)
  cond, uncond = fn(x, t, ids), fn(x, t, jnp.broadcast_to(empty, ids.shape))
  np.testing.assert_allclose(guided, uncond + 3.0 * (cond - uncond), rtol=1e-5, atol=1e-4)
  assert int(empty.sum()) == 3 and np.abs(np.asarray(cond - uncond)).max() > 1.0


def test_caption_batches_from_shapes_and_from_class_names():
  data_dir = None  # conftest's TFDS_DATA_DIR: built once, kept between runs
  batch = next(make_train_iterator(DataConfig(name="shapes", image_size=8, data_dir=data_dir), 16, 0, captions=True))
  names = shapes.LABEL_NAMES
  assert all(names[label] in text for label, text in zip(batch["label"], batch["caption"]))
  template = DataConfig(data_dir=data_dir, caption_template="a handwritten {label}")
  digits = next(make_train_iterator(template, 16, 0, captions=True))
  assert digits["caption"].tolist() == [f"a handwritten {label}" for label in digits["label"]]
  assert "caption" not in next(make_train_iterator(DataConfig(name="shapes", data_dir=data_dir), 16, 0))


@pytest.mark.parametrize("field, value, message", [
    ("model.context_dim", 48, "config.model.context_dim (48) must equal config.text.width (32)"),
    ("text.sample_prompts", ("a teal circle",), "word 'teal'"),
    ("text.caption_dropout", 1.0, "caption_dropout=1.0 is not allowed"),
    ("text.activation", "relu", "activation='relu' is invalid"),
    ("data.caption_template", "a photo", "caption_template='a photo' is not allowed: must be a string containing"),
])
def test_text_config_errors_name_the_field(field, value, message):
  raw = tiny_text.get_config()
  section, key = field.split(".")
  raw[section][key] = value
  with pytest.raises(ConfigError, match=re.escape(message)):
    parse_config(raw)


# End to end: train, then sample with prompts from the notebook API and sample.py.

def test_prompts_from_the_notebook_api(text_workdir):
  pipe = jdiff.load(text_workdir)
  assert isinstance(pipe.model, TextToImageUNet)
  # 4 images of 5 steps with guidance, as the training grid: one compiled program serves every call here.
  sample = functools.partial(pipe.generate, num=4, seed=2, steps=5, guidance_scale=5.0)
  red = sample("a red square")
  assert red.prompts == ("a red square",) * 4 and red.labels is None and red.images.shape == (4, 8, 8, 3)
  # At guidance 0 only the negative prompt's prediction is left: steering away from "a blue circle" at scale 0
  # samples "a blue circle" itself.
  away = sample("a red square", negative_prompt="a blue circle", guidance_scale=0.0).images
  itself = sample("a blue circle", guidance_scale=1.0).images
  assert np.abs(away.astype(int) - itself).max() <= 1
  cycled = pipe.generate(num=4, seed=0)
  assert cycled.prompts == ("a red circle", "a blue square") * 2 and cycled.columns == 2
  assert pipe.generate(["a red square", "a blue circle"]).prompts == ("a red square", "a blue circle")
  with pytest.raises(ValueError, match="word 'teal' in caption 'a teal square'"):
    pipe.generate("a teal square")
  with pytest.raises(ValueError, match="this is a text-to-image model: pass prompt"):
    pipe.generate(num=2, label=3)
