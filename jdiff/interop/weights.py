"""safetensors weight files as jdiff reads and writes them: numpy only, one tensor at a time.

safetensors maps a file into memory, and every page a read touches stays resident while the file is open: reading
a whole model through one handle would cost its file size in host memory on top of the loaded copy. The reader
reopens a file after every REOPEN_BYTES read from it, which bounds that to about REOPEN_BYTES.
"""
from __future__ import annotations

import json
import os

import numpy as np

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
REOPEN_BYTES = 256 * 2**20
CONVERT_HINT = ("convert it to safetensors where torch is installed, e.g. `python -c \"from diffusers import "
                "DiffusionPipeline; DiffusionPipeline.from_pretrained('IN').save_pretrained('OUT', "
                "safe_serialization=True)\"`, or for a single .ckpt/.safetensors checkpoint file "
                "`StableDiffusionPipeline.from_single_file('FILE').save_pretrained('OUT')`")


def weight_files(directory: str, stem: str, variant: str | None = None) -> list[str]:
  """The safetensors files holding a component's weights: STEM[.VARIANT].safetensors, or the shards its
  STEM[.VARIANT].safetensors.index.json names. Without a variant, a directory whose only weights are one variant's
  uses those. PyTorch pickles are refused with the command that converts them."""
  names = sorted(os.listdir(directory))
  suffix = f".{variant}.safetensors" if variant else ".safetensors"
  for name in (stem + suffix, stem + suffix + ".index.json"):
    if name in names:
      return _resolve(directory, name)
  variants = [n for n in names if n.startswith(stem + ".") and n.endswith(".safetensors") and n.count(".") == 2]
  if variant is None and len(variants) == 1:
    return _resolve(directory, variants[0])
  pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
  if pickles:
    raise ValueError(f"{os.path.join(directory, pickles[0])} is a PyTorch pickle, which jdiff does not read (loading "
                     f"it needs torch and can run code): {CONVERT_HINT}")
  found = f"; it holds {', '.join(variants)} (pass variant={variants[0].split('.')[1]!r})" if variants else ""
  raise FileNotFoundError(f"no {stem + suffix} in {directory}{found}")


def _resolve(directory: str, name: str) -> list[str]:
  if not name.endswith(".index.json"):
    return [os.path.join(directory, name)]
  with open(os.path.join(directory, name)) as f:
    shards = sorted(set(json.load(f)["weight_map"].values()))
  return [os.path.join(directory, shard) for shard in shards]


class TensorReader:
  """The tensors of one component's safetensors files, read one at a time as numpy arrays."""

  def __init__(self, files: list[str]):
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    self._safe_open = safe_open
    self._file_of, self._shapes = {}, {}
    self._open, self._handle, self._read_since_open = None, None, 0
    for path in files:
      with safe_open(path, framework="numpy") as f:
        for key in f.keys():
          self._file_of[key] = path
          self._shapes[key] = tuple(f.get_slice(key).get_shape())

  @property
  def keys(self) -> set[str]:
    return set(self._file_of)

  def shape(self, key: str) -> tuple[int, ...]:
    return self._shapes[key]

  def read(self, key: str) -> np.ndarray:
    path = self._file_of[key]
    if self._open != path or self._read_since_open > REOPEN_BYTES:
      self.close()
      self._handle = self._safe_open(path, framework="numpy")
      self._open, self._read_since_open = path, 0
    tensor = self._handle.get_tensor(key)
    self._read_since_open += tensor.nbytes
    return tensor

  def close(self) -> None:
    """Unmaps the open file (reading again reopens it)."""
    self._open = self._handle = None


def write_tensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  """One safetensors file, marked as PyTorch's format (what diffusers and transformers expect to load)."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, metadata={"format": "pt"})
