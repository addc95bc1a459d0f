"""Test-suite setup: the tiers, the device count, and JAX's persistent compilation cache.

`python -m pytest` runs the fast tier on one CPU device. The slow tier holds the tests marked `slow` (real
train.py / sample.py processes, signals, multi-host, the notebook) and `multidevice` (sharding on 8 CPU devices):

    JDIFF_TEST_DEVICES=8 python -m pytest -m "slow or multidevice"
"""
import os

# Must be set before JAX initialises its backends; subprocesses inherit them. The test programs are tiny, so
# compiling them costs far more than running them: LLVM's -O0 halves the suite's CPU time (same XLA graph passes).
DEVICES = int(os.environ.get("JDIFF_TEST_DEVICES", "1"))
_FLAGS = [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]
if DEVICES > 1:
  _FLAGS.append(f"--xla_force_host_platform_device_count={DEVICES}")
os.environ["XLA_FLAGS"] = " ".join(flag for flag in _FLAGS if flag)
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Datasets the tests build (sklearn_digits, shapes) go under .pytest_cache, not the user's ~/tensorflow_datasets.
_HERE = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(_HERE, "..", ".pytest_cache", "tfds"))

import jax  # noqa: E402
import pytest  # noqa: E402

CACHE_DIR = os.path.abspath(os.environ.get("JDIFF_TEST_CACHE", os.path.join(_HERE, "..", ".pytest_cache", "jax")))
os.environ.setdefault("JDIFF_COMPILATION_CACHE", CACHE_DIR)  # the CLIs' cache, in process and in subprocesses
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_collection_modifyitems(config, items):
  for item in items:
    if "multidevice" in item.keywords and jax.device_count() < 8:
      item.add_marker(pytest.mark.skip(reason="needs 8 devices: JDIFF_TEST_DEVICES=8 python -m pytest -m multidevice"))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """The tiny config trained in this process, 20 steps with checkpoints at 10 and 20 (a TrainResult): the one
  trained work dir that the pipeline and CLI tests sample from."""
  from jdiff.configs import tiny
  from jdiff.train import train_and_evaluate
  return train_and_evaluate(tiny.get_config(), str(tmp_path_factory.mktemp("tiny") / "run"))


@pytest.fixture(scope="session")
def tiny_workdir(tiny_run) -> str:
  return tiny_run.workdir


@pytest.fixture(scope="session")
def text_workdir(tmp_path_factory) -> str:
  """The tiny text-to-image config trained 4 steps in this process."""
  from jdiff.configs import tiny_text
  from jdiff.train import train_and_evaluate
  raw = tiny_text.get_config()
  raw.training.update(num_steps=4, checkpoint_every=4)
  workdir = str(tmp_path_factory.mktemp("text") / "run")
  train_and_evaluate(raw, workdir)
  return workdir


@pytest.fixture(autouse=True)
def signal_handlers_are_restored(request):
  """Every test leaves SIGINT's and SIGTERM's handlers as it found them (training installs its own for a run)."""
  import signal
  before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
  yield
  changed = [sig.name for sig, handler in before.items() if signal.getsignal(sig) is not handler]
  assert not changed, f"{request.node.nodeid} left the handlers of {changed} changed"
