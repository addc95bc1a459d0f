"""A word-level tokenizer over a fixed vocabulary that ships with the code: captions -> int32 token ids.

Text is lower-cased and split into runs of letters and digits; everything else separates words. A caption of n words
becomes [BOS, w1, ..., wn, EOS, PAD, ...] of exactly `max_length` ids, so the empty prompt "" is [BOS, EOS, PAD, ...]:
the unconditional input of classifier-free guidance. A word outside the vocabulary, or a caption too long for
`max_length`, raises ValueError naming it: silently mapping it to an unknown token would make prompts quietly mean
nothing.

The vocabulary covers the `shapes` captions, digits and the class names of sklearn_digits, mnist, fashion_mnist and
cifar10 (so `caption_template` turns those labels into captions), and a few common words. No Flax here.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)
_WORDS = """
a an the of at in on and with to is this that picture photo image drawing digit number handwritten written
small large big tiny huge little medium
red green blue yellow magenta cyan orange purple pink brown black white grey gray
circle square triangle rectangle star shape
top bottom left right center centre middle corner
0 1 2 3 4 5 6 7 8 9 zero one two three four five six seven eight nine
airplane automobile bird cat deer dog frog horse ship truck
t shirt top trouser pullover dress coat sandal sneaker bag ankle boot
"""
VOCABULARY = tuple(dict.fromkeys(SPECIAL_TOKENS + tuple(_WORDS.split())))  # dict: drop repeats, keep the order
_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
  """The words of `text` as the tokenizer sees them: lower-cased runs of letters and digits."""
  return _WORD.findall(text.lower())


class Tokenizer:
  """Maps captions to [N, max_length] int32 ids and back; ids index `vocabulary` (PAD=0, BOS=1, EOS=2)."""

  def __init__(self, max_length: int = 16, vocabulary: Sequence[str] = VOCABULARY):
    if tuple(vocabulary[:3]) != SPECIAL_TOKENS or len(set(vocabulary)) != len(vocabulary):
      raise ValueError(f"vocabulary must start with {SPECIAL_TOKENS} and hold no word twice")
    if max_length < 2:
      raise ValueError(f"max_length={max_length} must be at least 2 (BOS and EOS)")
    self.max_length = max_length
    self.vocabulary = tuple(vocabulary)
    self._ids = {word: i for i, word in enumerate(self.vocabulary)}

  @property
  def vocab_size(self) -> int:
    return len(self.vocabulary)

  def encode(self, texts: str | Sequence[str]) -> np.ndarray:
    """int32 ids [N, max_length] of N captions (a single string gives N = 1)."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    ids = np.zeros((len(texts), self.max_length), np.int32)  # PAD is 0
    for row, text in enumerate(texts):
      tokens = [self._word_id(word, text) for word in words(str(text))]
      if len(tokens) > self.max_length - 2:
        raise ValueError(f"caption {text!r} has {len(tokens)} words; at most {self.max_length - 2} fit in "
                         f"max_length={self.max_length} tokens (raise config.text.max_length)")
      ids[row, :len(tokens) + 2] = [self._ids[BOS], *tokens, self._ids[EOS]]
    return ids

  def decode(self, ids: np.ndarray) -> list[str]:
    """The words between BOS and EOS of each row of ids [N, L], joined by spaces."""
    texts = []
    for row in np.asarray(ids).reshape(-1, np.shape(ids)[-1]):
      tokens = [self.vocabulary[i] for i in row]
      end = tokens.index(EOS) if EOS in tokens else len(tokens)
      texts.append(" ".join(t for t in tokens[:end] if t not in SPECIAL_TOKENS))
    return texts

  def _word_id(self, word: str, text: str) -> int:
    if word not in self._ids:  # Special tokens cannot match: words hold no '<'.
      raise ValueError(f"word {word!r} in caption {text!r} is not in the tokenizer's vocabulary of "
                       f"{self.vocab_size} words (jdiff.tokenizer.VOCABULARY); use words it knows, such as "
                       f"{', '.join(self.vocabulary[3:12])}, ...")
    return self._ids[word]


def with_identifier(tokenizer: Tokenizer, word: str, replaces: str) -> Tokenizer:
  """The tokenizer with a new `word` in place of the vocabulary word `replaces`, at its id: DreamBooth's identifier
  of a subject, given an id the model never saw in its captions so that the vocabulary size stays the model's."""
  if replaces not in tokenizer.vocabulary:
    raise ValueError(f"{replaces!r} is not in the tokenizer's vocabulary: name a word of jdiff.tokenizer.VOCABULARY "
                     "the model never saw in its captions")
  if word in tokenizer.vocabulary:
    raise ValueError(f"{word!r} is a word of the vocabulary already: choose a new one such as 'sks'")
  vocabulary = list(tokenizer.vocabulary)
  vocabulary[vocabulary.index(replaces)] = word
  return Tokenizer(tokenizer.max_length, vocabulary)
