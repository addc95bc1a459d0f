"""Process set-up shared by the CLIs: JAX's persistent compilation cache and quieter library logs."""
from __future__ import annotations

import logging
import os
import re
import sys

import jax
from absl import flags

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
    fail(os.path.basename(argv[0]), f"unexpected arguments: {' '.join(argv[1:])} (flags take the form --name=value)")
  enable_compilation_cache()
  quiet_library_logs()


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """absl's flag parsing for app.run(main, flags_parser=parse_flags), except that a bad flag or config override
  (a wrong type, an unknown field) is one line on stderr and exit status 2, never a traceback."""
  try:
    return flag_values(argv)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
    fail(os.path.basename(argv[0]), flag_error_message(argv, e))


def flag_error_message(argv: list[str], error: Exception) -> str:
  """ml_collections reports an unknown override as a bare KeyError/AttributeError of the key: name the flag."""
  text = " ".join(str(error).replace("\\n", " ").replace("\\", "").split())
  if isinstance(error, (KeyError, AttributeError)):
    match = re.search(r"'(\w+)'", text)
    key = match.group(1) if match else text
    hint = text[text.index("Did you mean"):].rstrip("'") if "Did you mean" in text else ""
    for arg in argv[1:]:
      override = re.match(r"--(config(\.\w+)*)=", arg)
      if override and key in override.group(1).split(".")[1:]:
        return f"unknown config field {override.group(1)} in {arg} {hint}".strip()
    return f"unknown config field {key!r} {hint}".strip()
  return text


def fail(program: str, message: str, status: int = 2):
  """Ends the process with one line `program: error: message` on stderr."""
  print(f"{program}: error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(status)
