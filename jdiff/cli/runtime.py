"""Process set-up shared by the CLIs, and only theirs: flag errors as one line, quiet start-up, the persistent
compilation cache, the CPU-only process tuning, and a progress bar.

Nothing here runs when jdiff is imported as a library: a notebook keeps its own XLA flags, malloc and logging.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import re
import sys

from absl import flags
from absl import logging as absl_logging

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "jdiff", "xla")
HOST_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def quiet_start() -> None:
  """Before TensorFlow or JAX load: their C++ start-up lines (oneDNN notices, plugin probes) stay off the console."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def enable_compilation_cache(cache_dir: str | None = None) -> str:
  """Reuses compiled programs across runs: a restarted train.py or sample.py skips recompiling."""
  import jax  # pylint: disable=import-outside-toplevel
  cache_dir = cache_dir or os.environ.get("JDIFF_COMPILATION_CACHE", DEFAULT_CACHE_DIR)
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return cache_dir


class _Console(logging.Formatter):
  """jdiff's own lines as they are; warnings and errors with their level."""

  def format(self, record: logging.LogRecord) -> str:
    message = record.getMessage()
    return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


BACKGROUND_WRITERS = (f"orbax{os.sep}", f"clu{os.sep}asynclib.py")


class _OwnInfo(logging.Filter):
  """INFO lines from jdiff only; warnings from anyone but TFDS, which warns about its own bookkeeping while it
  builds jdiff's offline datasets (its failures raise, and jdiff reports those), and the background threads of
  orbax's saves and clu's metric writer, which log each failure (with tracebacks) that they then raise in the
  training loop, where jdiff reports it in one line; asyncio logs orbax's failed writes once more."""

  def filter(self, record: logging.LogRecord) -> bool:
    if f"{os.sep}tensorflow_datasets{os.sep}" in record.pathname:
      return record.levelno >= logging.ERROR
    if (any(f"{os.sep}{name}" in record.pathname for name in BACKGROUND_WRITERS)
        or (record.name == "asyncio" and "orbax" in record.getMessage())):
      return record.levelno >= logging.CRITICAL
    return record.levelno >= logging.WARNING or f"{os.sep}jdiff{os.sep}" in record.pathname


def console_logging() -> None:
  absl_logging.set_verbosity(absl_logging.INFO)
  handler = absl_logging.get_absl_handler()
  handler.setFormatter(_Console())
  handler.addFilter(_OwnInfo())


def _unraisable(unraisable) -> None:
  """After a save fails, tensorstore completes the save's other writes once orbax has closed their event loop, and
  each completion's callback raises "Event loop is closed"; the failure itself is reported, so these are not."""
  if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
    return
  sys.__unraisablehook__(unraisable)


def start_cli(argv: list[str]) -> None:
  """What train.py and sample.py do first: refuse stray arguments, log jdiff's lines plainly, cache compilations."""
  if len(argv) > 1:
    fail(os.path.basename(argv[0]), f"unexpected arguments: {' '.join(argv[1:])} (flags take the form --name=value)")
  console_logging()
  sys.unraisablehook = _unraisable
  enable_compilation_cache()


def accelerator_expected() -> bool:
  """Whether JAX will find a GPU or TPU backend, judged without starting one: JAX_PLATFORMS, or an installed
  accelerator plugin (jax[cuda12] registers one) or libtpu."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() not in ("cpu", "")
  plugins = importlib.metadata.entry_points(group="jax_plugins")
  return bool(plugins) or importlib.util.find_spec("libtpu") is not None


def cpu_device_count(cores: int, micro_batch: int, fsdp: int = 1) -> int:
  """The most devices, at most one per core, that split `micro_batch` evenly and are a multiple of `fsdp`."""
  return next((n for n in range(cores, 0, -1) if micro_batch % n == 0 and n % fsdp == 0), 1)


def available_cores() -> int:
  if hasattr(os, "sched_getaffinity"):  # Linux: the cores this process may run on.
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def tune_cpu_process(*, cpu_devices: int, micro_batch: int, fsdp: int = 1, keep_host_memory: bool = True) -> int:
  """On the CPU backend only, before JAX starts: keep freed host memory for reuse (jdiff/cli/host_memory.py) and
  split the cores into `cpu_devices` XLA devices (0: one per core that divides the micro-batch), over which the
  batch is sharded. XLA:CPU runs a convolution with 64 or fewer input channels on one thread, so one device per
  core runs the batch's shards side by side. Returns the device count asked for (1: left as it is)."""
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  if accelerator_expected() or xla_bridge.backends_are_initialized():  # too late once JAX has started
    return 1
  if keep_host_memory:
    from jdiff.cli import host_memory  # pylint: disable=import-outside-toplevel
    host_memory.keep_freed_memory()
  if HOST_DEVICE_COUNT_FLAG in os.environ.get("XLA_FLAGS", ""):
    return 1
  count = cpu_devices or cpu_device_count(available_cores(), micro_batch, fsdp)
  if count > 1:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {HOST_DEVICE_COUNT_FLAG}={count}".strip()
  return count


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """absl's flag parsing for app.run(main, flags_parser=parse_flags), except that a bad flag or config override
  (a wrong type, an unknown field, a missing config file) is one line on stderr and exit status 2, never a
  traceback. A --config naming no file but one of jdiff's bundled configs ("default", "shapes") loads that."""
  quiet_start()
  if any(arg in ("-h", "--help", "-help") for arg in argv[1:]):
    print(f"usage: {os.path.basename(argv[0])} [flags]\n\n{flag_values.get_help()}")
    sys.exit(0)
  program = os.path.basename(argv[0])
  try:
    argv = [argv[0]] + bundled_config_args(argv[1:])
    flag_values.unparse_flags()  # every flag from its default, also when a process parses twice (the tests do)
    remaining = flag_values(argv)
    if not flags.FLAGS.is_parsed():  # absl's own flags (logging's) at their defaults: app.run wants them parsed
      flags.FLAGS([argv[0]])
    return remaining
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError, OSError, SyntaxError) as e:
    fail(program, flag_error_message(argv, e))


def bundled_config_args(args: list[str]) -> list[str]:
  """args with `--config NAME` (or `--config=NAME`, overrides after a colon kept) pointing at the bundled config
  file NAME.py when NAME is not a file itself."""
  from jdiff import configs  # pylint: disable=import-outside-toplevel
  out = []
  for i, arg in enumerate(args):
    value = arg[len("--config="):] if arg.startswith("--config=") else None
    if value is None and i and args[i - 1] == "--config":
      value, out = arg, out[:-1]
    if value is not None:
      arg = f"--config={configs.resolve(value)}"
    out.append(arg)
  return out


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


def progress_bar(label: str, stream=sys.stderr):
  """progress(done, total) that redraws one line on a terminal, and prints a line per quarter otherwise."""
  reported = set()

  def progress(done: int, total: int) -> None:
    if stream.isatty():
      filled = 30 * done // total
      stream.write(f"\r{label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}")
      if done == total:
        stream.write("\n")
    else:
      quarter = 4 * done // total
      if quarter not in reported:
        reported.add(quarter)
        stream.write(f"{label}: {done}/{total}\n")
    stream.flush()
  return progress
