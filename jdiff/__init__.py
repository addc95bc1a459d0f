"""jdiff: diffusion models in JAX/Flax."""
