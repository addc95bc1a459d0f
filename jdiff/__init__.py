"""jdiff: diffusion models in JAX/Flax.

The maths (schedules, diffusion, samplers) is pure JAX; models are Flax Linen; `jdiff.load(path)` returns a
Pipeline whose `generate(...)` makes images from a work dir or a diffusers directory (Stable Diffusion),
`jdiff.from_state(config, state)` does the same for a model that training returned, and
`jdiff.export_diffusers(pipe, directory)` writes one in diffusers' format. Training lives in `jdiff.train`, which
inference never imports.
"""

__all__ = ["Pipeline", "Samples", "export_diffusers", "from_state", "load"]


def __getattr__(name):
  # Lazy, so `import jdiff.schedules` stays free of Flax and orbax.
  if name in __all__:
    from jdiff import pipeline
    return getattr(pipeline, name)
  raise AttributeError(f"module 'jdiff' has no attribute {name!r}")
