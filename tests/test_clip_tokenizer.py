"""CLIP's tokenizer against transformers' CLIPTokenizer ids (tests/fixtures/make_clip_tokenizer_fixtures.py),
on OpenAI CLIP's real vocabulary, offline."""
import json
import os

import numpy as np
import pytest

from jdiff.clip_tokenizer import END, START, CLIPTokenizer

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "clip_tokenizer")
with open(os.path.join(FIXTURES, "reference_ids.json"), encoding="utf-8") as _f:
  REFERENCE = json.load(_f)
PROMPTS = REFERENCE["prompts"]


@pytest.fixture(scope="module")
def open_clip():
  return CLIPTokenizer.from_open_clip(os.path.join(FIXTURES, "bpe_simple_vocab_16e6.txt.gz"))


def write_folder(path, tokenizer, model, *, tokenizer_json=False):
  """A diffusers tokenizer/ folder: vocab.json and merges.txt (or tokenizer.json, as transformers 5 saves it),
  with the model's tokenizer_config.json and special_tokens_map.json."""
  os.makedirs(path, exist_ok=True)
  merges = sorted(tokenizer.ranks, key=tokenizer.ranks.get)
  if tokenizer_json:
    added = [{"id": tokenizer.vocab[t], "content": t, "normalized": False, "special": True} for t in (START, END)]
    model_json = {"type": "BPE", "end_of_word_suffix": "</w>", "vocab": tokenizer.vocab, "merges": merges}
    with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
      json.dump({"added_tokens": added, "model": model_json}, f)
  else:
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
      json.dump(tokenizer.vocab, f)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
      f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    with open(os.path.join(FIXTURES, model, name), encoding="utf-8") as f:
      config = json.load(f)
    with open(os.path.join(path, name), "w", encoding="utf-8") as f:
      json.dump(config, f)
  return str(path)


@pytest.mark.parametrize("model", ["sd1", "sd2"])
def test_ids_equal_transformers(open_clip, tmp_path, model):
  """Every prompt (punctuation, numbers, unicode, whitespace, special-token text, truncated, empty), padded to 77
  with the model's pad token: Stable Diffusion 1's end token, 2's "!" (which also marks every "!" in a prompt)."""
  tokenizer = CLIPTokenizer.from_dir(write_folder(tmp_path / "model" / "tokenizer", open_clip, model))
  assert (tokenizer.max_length, tokenizer.vocab_size, tokenizer.pad_id) == (77, 49408, {"sd1": 49407, "sd2": 0}[model])
  ids = tokenizer.encode(PROMPTS)
  assert ids.dtype == np.int32 and ids.shape == (len(PROMPTS), 77)
  wrong = [p for p, got, want in zip(PROMPTS, ids.tolist(), REFERENCE[model]) if got != want]
  assert not wrong, wrong
  np.testing.assert_array_equal(tokenizer.encode(PROMPTS[3]), ids[3:4])


def test_known_ids_truncation_and_folders(open_clip, tmp_path):
  # CLIP's published ids for Stable Diffusion's best-known prompt.
  want = [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 525, 7496, 49407]
  assert open_clip.encode("a photo of an astronaut riding a horse on mars")[0, :12].tolist() == want
  long = open_clip.encode("a " * 100)[0]
  assert long[0] == 49406 and long[-1] == 49407 and np.all(long[1:-1] == 320)
  from_json = CLIPTokenizer.from_dir(write_folder(tmp_path / "v5", open_clip, "sd1", tokenizer_json=True))
  np.testing.assert_array_equal(from_json.encode(PROMPTS), REFERENCE["sd1"])
  model_dir = tmp_path / "pipeline"
  write_folder(model_dir / "tokenizer", open_clip, "sd2")
  assert CLIPTokenizer.from_dir(str(model_dir), max_length=16).encode("hi!").tolist() == [
      [49406, 1883, 0, 49407] + [0] * 12]


def test_decode(open_clip):
  texts = ["a photo of an astronaut riding a horse on mars", "Héllo,  WORLD 日本の桜 🐱", ""]
  assert open_clip.decode(open_clip.encode(texts)) == [texts[0], "héllo , world 日本の桜 🐱", ""]


def test_bad_folders_are_named(open_clip, tmp_path):
  with pytest.raises(FileNotFoundError, match="neither vocab.json and merges.txt nor tokenizer.json"):
    CLIPTokenizer.from_dir(str(tmp_path))
  folder = write_folder(tmp_path / "t", open_clip, "sd1")
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"model_max_length": 10**30}, f)
  with pytest.raises(ValueError, match="gives no model_max_length.*pass max_length"):
    CLIPTokenizer.from_dir(folder)
  assert CLIPTokenizer.from_dir(folder, max_length=8).encode("").shape == (1, 8)
  with pytest.raises(ValueError, match="pad_token='<pad>' is not in the vocabulary"):
    CLIPTokenizer(open_clip.vocab, [], pad_token="<pad>")
