"""CLIP's byte-level BPE tokenizer, as Stable Diffusion's text encoders read prompts: text -> int32 token ids.

It gives the ids of transformers' CLIPTokenizer (the tokenizers-backed one) with padding="max_length" and
truncation, without transformers: the text is NFC-normalised, runs of whitespace become one space and every
character is lower-cased on its own; special-token strings written in the prompt are those tokens; the rest splits
into the contractions 's 't 're 've 'm 'll 'd, runs of letters, single digits and runs of other non-space
characters. Each piece's UTF-8 bytes map to printable characters (GPT-2's byte-to-unicode table), its last character
takes the end-of-word mark "</w>", and the BPE merges join symbols by rank. A prompt becomes
[start, tokens..., end, pad...] of `max_length` ids, its tokens truncated to max_length - 2; the pad token is the
model's own (Stable Diffusion 1's is the end token, Stable Diffusion 2's "!", id 0).

Reads a diffusers model's tokenizer/ folder (vocab.json and merges.txt, or tokenizer.json, with
tokenizer_config.json and special_tokens_map.json), or open_clip's bpe_simple_vocab_16e6.txt.gz.
"""
from __future__ import annotations

import functools
import gzip
import json
import os
import unicodedata
from typing import Mapping, Sequence

import numpy as np

START, END = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
# Unicode's White_Space property (what the tokenizers library's regex \s matches).
WHITESPACE = frozenset(map(chr, [*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028,
                                 0x2029, 0x202F, 0x205F, 0x3000]))


@functools.cache
def byte_to_unicode() -> dict[int, str]:
  """GPT-2's table: the printable bytes map to themselves, the others to the code points from 256 up, in order."""
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  table = {b: chr(b) for b in printable}
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + len(table) - len(printable))
  return table


def openai_vocabulary(merges: Sequence[tuple[str, str]]) -> list[str]:
  """CLIP's vocabulary in id order: the 256 byte symbols, the same with </w>, each merge's result, START, END."""
  symbols = list(byte_to_unicode().values())
  return [*symbols, *(s + END_OF_WORD for s in symbols), *(a + b for a, b in merges), START, END]


def _category(char: str) -> str:
  if char in WHITESPACE:
    return " "
  major = unicodedata.category(char)[0]
  return major if major in "LN" else "other"


def _scan(text: str, literals: Sequence[str]) -> list[str]:
  """Leftmost-first matching, as the regex does: at each position a literal, else a run of letters, one digit or a
  run of other non-space characters (which may reach into a literal further on)."""
  out, i = [], 0
  while i < len(text):
    literal = next((c for c in literals if text.startswith(c, i)), None)
    kind = _category(text[i])
    if literal:
      j = i + len(literal)
    elif kind == " ":
      i += 1
      continue
    else:
      j = i + 1
      while kind != "N" and j < len(text) and _category(text[j]) == kind:
        j += 1
    out.append(text[i:j])
    i = j
  return out


def pieces(text: str) -> list[str]:
  """The pre-tokenized pieces of normalized text: contractions ('s 't 're 've 'm 'll 'd), letter runs, single
  digits, runs of other characters. START and END written out are one piece each, which the byte-level step
  splits again by the same rules."""
  out = []
  for piece in _scan(text, (START, END, *CONTRACTIONS)):
    out.extend(_scan(piece, CONTRACTIONS) if piece in (START, END) else [piece])
  return out


def normalize(text: str) -> str:
  """NFC, whitespace runs to one space, each character lower-cased on its own (so a final sigma stays sigma)."""
  text = unicodedata.normalize("NFC", text)
  out, space = [], False
  for char in text:
    if char in WHITESPACE:
      if not space:
        out.append(" ")
      space = True
    else:
      out.append(char.lower())
      space = False
  return "".join(out)


class CLIPTokenizer:
  """Maps prompts to [N, max_length] int32 ids of CLIP's vocabulary, as transformers' CLIPTokenizer does."""

  def __init__(self, vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], *, max_length: int = 77,
               pad_token: str = END, start_token: str = START, end_token: str = END,
               normalized_specials: Sequence[str] = ()):
    """normalized_specials: the special tokens matched in the normalized text (so case-insensitively), as
    tokenizer files may flag them; the others match the prompt exactly. Every special token written in a prompt
    is that token (a Stable Diffusion 2 prompt's "!" is its pad token, id 0)."""
    if max_length < 2:
      raise ValueError(f"max_length={max_length} must be at least 2 (the start and end tokens)")
    for name, token in (("start_token", start_token), ("end_token", end_token), ("pad_token", pad_token)):
      if token not in vocab:
        raise ValueError(f"{name}={token!r} is not in the vocabulary of {len(vocab)} tokens")
    self.max_length = max_length
    self.vocab = dict(vocab)
    self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
    self.start_id, self.end_id, self.pad_id = vocab[start_token], vocab[end_token], vocab[pad_token]
    specials = {start_token, end_token, pad_token}
    self.exact_specials = tuple(sorted(specials - set(normalized_specials), key=len, reverse=True))
    self.normalized_specials = tuple(sorted(specials & set(normalized_specials), key=len, reverse=True))
    self._tokens = {i: token for token, i in self.vocab.items()}
    self._bpe = functools.lru_cache(maxsize=65536)(self._merge)

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  @classmethod
  def from_dir(cls, path: str, *, max_length: int | None = None) -> CLIPTokenizer:
    """The tokenizer of a diffusers model's tokenizer/ folder (or the model folder holding one). max_length:
    None takes tokenizer_config.json's model_max_length (77 for Stable Diffusion)."""
    if os.path.isdir(os.path.join(path, "tokenizer")):
      path = os.path.join(path, "tokenizer")
    config = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins where both say
      config.update({k: v for k, v in _read_json(path, name).items() if v is not None})
    vocab, merges = _read_vocab_and_merges(path)
    if max_length is None:
      max_length = config.get("model_max_length")
      if not isinstance(max_length, int) or max_length > 1_000_000:
        raise ValueError(f"{path}/tokenizer_config.json gives no model_max_length (got {max_length!r}): pass "
                         "max_length, the text encoder's max_position_embeddings (77 for Stable Diffusion)")
    tokens = {k: config.get(k, default) for k, default in (("bos_token", START), ("eos_token", END),
                                                            ("unk_token", END), ("pad_token", END))}
    content = {k: t["content"] if isinstance(t, Mapping) else t for k, t in tokens.items()}
    # Whether a special token matches the normalized text: transformers registers them in this order, and a
    # token's last mention sets it (a plain string: no), so Stable Diffusion 1's pad token, the end token's text,
    # makes the end token match exactly.
    flags = {content[k]: isinstance(t, Mapping) and bool(t.get("normalized")) for k, t in tokens.items()}
    added = _read_json(path, "tokenizer.json").get("added_tokens")
    if added is not None:  # tokenizer.json's own flags, where it has them
      flags = {t["content"]: bool(t.get("normalized")) for t in added}
    normalized = {token for token, flag in flags.items() if flag}
    return cls(vocab, merges, max_length=max_length, pad_token=content["pad_token"],
               start_token=content["bos_token"], end_token=content["eos_token"], normalized_specials=normalized)

  @classmethod
  def from_open_clip(cls, path: str, *, max_length: int = 77, pad_token: str = END) -> CLIPTokenizer:
    """OpenAI CLIP's tokenizer from open_clip's bpe_simple_vocab_16e6.txt.gz (its merges; the vocabulary follows)."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
      lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    vocab = {token: i for i, token in enumerate(openai_vocabulary(merges))}
    return cls(vocab, merges, max_length=max_length, pad_token=pad_token)

  def tokenize(self, text: str) -> list[int]:
    """The ids of one prompt, without the start and end tokens, padding or truncation."""
    ids = []
    for part, special in _split(text, self.exact_specials):
      for piece, normalized_special in ([(part, True)] if special else
                                        _split(normalize(part), self.normalized_specials)):
        if normalized_special:
          ids.append(self.vocab[piece])
          continue
        for word in pieces(piece):
          symbols = "".join(byte_to_unicode()[b] for b in word.encode("utf-8"))
          ids.extend(self.vocab.get(token, self.end_id) for token in self._bpe(symbols))
    return ids

  def encode(self, texts: str | Sequence[str]) -> np.ndarray:
    """int32 ids [N, max_length] of N prompts (a single string gives N = 1)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    ids = np.full((len(texts), self.max_length), self.pad_id, np.int32)
    for row, text in enumerate(texts):
      tokens = self.tokenize(str(text))[:self.max_length - 2]
      ids[row, :len(tokens) + 2] = [self.start_id, *tokens, self.end_id]
    return ids

  def decode(self, ids: np.ndarray) -> list[str]:
    """The text between the start and end tokens of each row of ids [N, L] (lower-cased, as encoded)."""
    to_byte = {char: b for b, char in byte_to_unicode().items()} | {" ": ord(" ")}  # " " ends a word
    texts = []
    for row in np.asarray(ids).reshape(-1, np.shape(ids)[-1]).tolist():
      row = row[1:] if row and row[0] == self.start_id else row
      row = row[:row.index(self.end_id)] if self.end_id in row else row
      symbols = "".join(self._tokens[i] for i in row)
      words = bytes(to_byte[c] for c in symbols.replace(END_OF_WORD, " "))
      texts.append(" ".join(words.decode("utf-8", errors="replace").split()))
    return texts

  def _merge(self, symbols: str) -> tuple[str, ...]:
    """BPE: the lowest-ranked adjacent pair joins everywhere, left to right, until no pair has a rank."""
    word = [*symbols[:-1], symbols[-1] + END_OF_WORD]
    while len(word) > 1:
      pair = min(zip(word, word[1:]), key=lambda p: self.ranks.get(p, float("inf")))
      if pair not in self.ranks:
        break
      merged, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == pair:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    return tuple(word)


def _split(text: str, tokens: Sequence[str]):
  """(part, is_token) pieces of text: the occurrences of tokens (longest first where they start alike) and what lies
  between them."""
  i = start = 0
  while i < len(text):
    token = next((t for t in tokens if text.startswith(t, i)), None)
    if token:
      if i > start:
        yield text[start:i], False
      yield token, True
      i = start = i + len(token)
    else:
      i += 1
  if start < len(text):
    yield text[start:], False


def _read_json(path: str, name: str) -> dict:
  if not os.path.exists(os.path.join(path, name)):
    return {}
  with open(os.path.join(path, name), encoding="utf-8") as f:
    return json.load(f)


def _read_vocab_and_merges(path: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
  """vocab.json and merges.txt, or else tokenizer.json's BPE model."""
  vocab_file, merges_file = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
  if os.path.exists(vocab_file) and os.path.exists(merges_file):
    with open(vocab_file, encoding="utf-8") as f:
      vocab = json.load(f)
    with open(merges_file, encoding="utf-8") as f:
      lines = [line for line in f.read().split("\n") if line and not line.startswith("#version")]
    return vocab, [tuple(line.split()) for line in lines]
  model = _read_json(path, "tokenizer.json").get("model")
  if model is None:
    raise FileNotFoundError(f"{path} holds neither vocab.json and merges.txt nor tokenizer.json: not a CLIP "
                            "tokenizer folder")
  if model.get("type") != "BPE" or model.get("end_of_word_suffix") != END_OF_WORD:
    raise ValueError(f"{path}/tokenizer.json is not CLIP's byte-level BPE (model type {model.get('type')!r}, "
                     f"end_of_word_suffix {model.get('end_of_word_suffix')!r})")
  merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
  return model["vocab"], merges
