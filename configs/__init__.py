"""jdiff's configs, one Python file each whose get_config() returns an ml_collections.ConfigDict.

They live in the repository's configs/ and install as the package `jdiff.configs`, so from any directory:

    from jdiff.configs import default          # or jdiff.configs.get("default")
    python train.py --config default ...       # train.py and jdiff-train take a bundled config's name too
"""
from __future__ import annotations

import importlib
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
  """The bundled configs' names."""
  return sorted(f[:-3] for f in os.listdir(HERE) if f.endswith(".py") and not f.startswith("_"))


def get(name: str):
  """The ConfigDict of the bundled config `name` (e.g. "default", "shapes")."""
  if name not in names():
    raise ValueError(f"no bundled config {name!r}; choose one of {', '.join(names())}")
  return importlib.import_module(f"{__name__}.{name}").get_config()


def resolve(spec: str) -> str:
  """A --config value as a file path: a file that exists as given, else the bundled config of that name
  ("default", "default.py", "configs/default.py"); overrides after a colon ("default:arg") are kept."""
  path, colon, rest = spec.partition(":")
  if os.path.exists(path):
    return spec
  name = os.path.basename(path)
  name = name[:-3] if name.endswith(".py") else name
  if name in names():
    return os.path.join(HERE, f"{name}.py") + colon + rest
  raise ValueError(f"--config={spec!r}: no such file, and no bundled config of that name; give a config file's "
                   f"path or one of {', '.join(names())}")
