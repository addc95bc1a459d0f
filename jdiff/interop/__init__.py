"""Interoperation with diffusers' Stable Diffusion format: configs, parameter names, safetensors weights, and whole
pipeline directories read into jdiff's models and written from them (jdiff.load, jdiff.export_diffusers)."""
