"""Fine-tuning (jdiff/train/finetune.py): LoRA and DreamBooth configs, the identifier's tokenizer, the cross detector of
bench/dreambooth_shapes.py, and (slow) LoRA and DreamBooth runs end to end from a trained tiny text model."""
import os

import flax
import jax
import numpy as np
import pytest

from jdiff.config import ConfigError, parse_config
from jdiff.data import shapes
from jdiff.metrics import crosses
from jdiff.tokenizer import Tokenizer, with_identifier


@pytest.mark.parametrize("sections,message", [
    (dict(lora=dict(rank=4)), "set config.finetune.base"),
    (dict(finetune=dict(base="runs/x"), lora=dict(rank=4, targets=("attention", "norms"))), "config.lora: targets="),
    (dict(finetune=dict(base="runs/x"), lora=dict(rank=-1)), "config.lora: rank=-1"),
    (dict(finetune=dict(base="runs/x"), dreambooth=dict(instance_images="x.npz", instance_prompt="a shape")),
     "a prompt containing the identifier 'sks'"),
    (dict(finetune=dict(base="runs/x"), dreambooth=dict(prior_weight=-1.0)), "prior_weight=-1.0"),
])
def test_finetune_config_errors_name_the_field(sections, message):
  with pytest.raises(ConfigError, match=message):
    parse_config(sections)


def test_finetune_config_defers_the_model_to_the_base():
  """Without a model section, the model and its checks are the base's (the U-Net's default size would not match
  the data's here)."""
  config = parse_config(dict(finetune=dict(base="runs/x"), lora=dict(rank=4, alpha=8.0), data=dict(image_size=8),
                             sampling=dict(guidance_scale=3.0)))
  assert config.lora.enabled and config.lora.scale == 2.0


def test_identifier_takes_the_replaced_words_id():
  tok = Tokenizer(8)
  db = with_identifier(tok, "sks", "sandal")
  assert db.vocab_size == tok.vocab_size
  np.testing.assert_array_equal(db.encode("a red sks shape"), tok.encode("a red sandal shape"))
  assert db.decode(db.encode("a sks shape")) == ["a sks shape"]
  with pytest.raises(ValueError, match="'sandals' is not in the tokenizer's vocabulary"):
    with_identifier(tok, "sks", "sandals")
  with pytest.raises(ValueError, match="'red' is a word of the vocabulary already"):
    with_identifier(tok, "red", "sandal")


@pytest.mark.parametrize("size", [16, 32])
def test_cross_detector_on_drawn_crosses_and_dataset_shapes(size):
  """Every drawn cross reads as a cross with its colour and place, and none of the dataset's shapes does."""
  drawn = crosses.draw_crosses(40, seed=3, image_size=size)
  found = crosses.detect_crosses(drawn["image"])
  assert found.cross.all()
  np.testing.assert_array_equal(found.colour, drawn["colour"])
  np.testing.assert_array_equal(found.position, drawn["position"])
  real = shapes.shapes_examples(120, seed=4, image_size=size)
  found = crosses.detect_crosses(real["image"])
  assert not found.cross.any()
  np.testing.assert_array_equal(found.position, real["position"])


def test_a_cross_covers_five_ninths_of_its_box():
  polygon = crosses.cross_polygon((0.5, 0.5), 0.3)
  grid = (np.arange(600) + 0.5) / 600
  rows, cols = np.meshgrid(grid, grid, indexing="ij")
  assert abs(crosses.inside(polygon, rows, cols).mean() / 0.6**2 - 5 / 9) < 2e-3


@pytest.mark.slow
def test_lora_training_holds_and_writes_only_the_adapters(text_workdir, tmp_path):
  """A LoRA run from a trained tiny text model: the state holds the adapters alone (Adam's moments too), the base is
  untouched, the run resumes, and its lora.safetensors merged into the base is the EMA adapters' model."""
  import jdiff
  from jdiff import lora
  from jdiff.configs import lora_shapes
  from jdiff.train import train_and_evaluate
  raw = lora_shapes.get_config()
  raw.finetune.base = text_workdir
  raw.lora.update(rank=2, alpha=4.0, targets=("attention", "feed_forward"))
  raw.text.sample_prompts = ("a red square",)
  raw.training.update(batch_size=8, num_steps=3, checkpoint_every=3, warmup_steps=1)
  raw.sampling.update(num_samples=2, steps=2)
  workdir = str(tmp_path / "lora")
  result = train_and_evaluate(raw, workdir)
  base = jdiff.load(text_workdir)
  paths = lora.target_paths(base.params, ("attention", "feed_forward"), ("unet", "text_encoder"))
  adapters = lora.adapter_pairs(result.state.params)
  assert sorted(adapters) == paths
  n = sum(d.size + u.size for d, u in adapters.values())
  moments = [x for x in jax.tree_util.tree_leaves(result.state.opt_state) if x.ndim]  # Adam's mu and nu; no counts
  assert sum(x.size for x in moments) == 2 * n
  assert any(np.abs(u).max() > 0 for _, u in adapters.values())  # up starts at zero: training moved it
  with pytest.raises(ConfigError, match=r"holds LoRA adapters of .*with_lora"):
    jdiff.load(workdir)
  merged = base.with_lora(workdir)  # its lora.safetensors
  want = lora.apply_adapters(base.params, result.state.ema_params, 2.0)
  for path, value in flax.traverse_util.flatten_dict(merged.params).items():
    np.testing.assert_allclose(value, flax.traverse_util.flatten_dict(want)[path], rtol=1e-5, atol=1e-6)
  raw.training.num_steps = 4
  assert int(train_and_evaluate(raw, workdir).state.step) == 4
  again = jdiff.load(text_workdir)
  for path, value in flax.traverse_util.flatten_dict(again.params).items():
    np.testing.assert_array_equal(value, flax.traverse_util.flatten_dict(base.params)[path])


@pytest.mark.slow
def test_dreambooth_with_prior_preservation_runs_and_samples_its_identifier(text_workdir, tmp_path):
  import jdiff
  from jdiff.configs import dreambooth_shapes
  from jdiff.data import resize_images
  from jdiff.train import train_and_evaluate
  instances = str(tmp_path / "crosses.npz")
  np.savez(instances, image=resize_images(crosses.draw_crosses(5, seed=0)["image"], 8))
  raw = dreambooth_shapes.get_config()
  raw.finetune.base = text_workdir
  raw.dreambooth.update(instance_images=instances, num_class_images=4)
  raw.training.update(batch_size=8, num_steps=2, checkpoint_every=2)
  raw.sampling.update(num_samples=2, steps=2)
  workdir = str(tmp_path / "db")
  train_and_evaluate(raw, workdir)
  classes = np.load(os.path.join(workdir, "class_images.npz"))["image"]
  assert classes.shape == (4, 8, 8, 3) and classes.dtype == np.uint8
  pipe = jdiff.load(workdir)
  assert pipe.tokenizer.decode(pipe.tokenizer.encode("a sks shape")) == ["a sks shape"]
  assert pipe.generate("a red sks shape", num=1, steps=2).images.shape == (1, 8, 8, 3)
