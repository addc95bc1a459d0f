"""Process set-up shared by the CLIs: JAX's persistent compilation cache and quieter library logs."""
from __future__ import annotations

import logging
import os

import jax
from absl import app

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "jdiff", "xla")


def enable_compilation_cache(cache_dir: str | None = None) -> str:
  """Reuses compiled programs across runs (a restarted train.py or sample.py skips recompiling)."""
  cache_dir = cache_dir or os.environ.get("JDIFF_COMPILATION_CACHE", DEFAULT_CACHE_DIR)
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return cache_dir


class _DropLibraryInfo(logging.Filter):
  """Orbax logs each checkpoint step at INFO; the console keeps jdiff's own lines and warnings."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def quiet_library_logs() -> None:
  logging.getLogger("absl").addFilter(_DropLibraryInfo())


def start_cli(argv: list[str]) -> None:
  """What train.py and sample.py do first: refuse stray arguments, cache compilations, quiet orbax."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  enable_compilation_cache()
  quiet_library_logs()
