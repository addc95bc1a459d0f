"""jdiff: diffusion models in JAX/Flax.

The maths (schedules, diffusion, samplers) is pure JAX; models are Flax Linen; `jdiff.load(workdir)`
returns a Pipeline whose `generate(...)` samples from a trained work dir.
"""

__all__ = ["Pipeline", "Samples", "load"]


def __getattr__(name):
  # Lazy, so `import jdiff.schedules` stays free of Flax, orbax and TensorFlow.
  if name in __all__:
    from jdiff import pipeline
    return getattr(pipeline, name)
  raise AttributeError(f"module 'jdiff' has no attribute {name!r}")
