"""Test-suite setup: 8 fake CPU devices for sharding tests and JAX's persistent compilation cache."""
import os

# Must be set before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Datasets the tests build (sklearn_digits) go under .pytest_cache, not the user's ~/tensorflow_datasets.
_HERE = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(_HERE, "..", ".pytest_cache", "tfds"))

import jax  # noqa: E402

from jdiff.host_memory import keep_freed_memory  # noqa: E402

keep_freed_memory()  # as train.py does: XLA:CPU's temporaries are reused, not faulted in again each call

CACHE_DIR = os.environ.get("JDIFF_TEST_CACHE", os.path.join(_HERE, "..", ".pytest_cache", "jax"))
jax.config.update("jax_compilation_cache_dir", os.path.abspath(CACHE_DIR))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
