"""Checks jdiff's SpatialTransformer against diffusers' Transformer2DModel (Stable Diffusion's U-Net attention block,
linear projections) with the same weights: prints the largest output difference. Needs torch and diffusers.

  python bench/diffusers_equivalence.py
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from diffusers.models.transformers.transformer_2d import Transformer2DModel  # noqa: E402

from jdiff.models.layers import SpatialTransformer  # noqa: E402

HEADS, HEAD_DIM, CONTEXT_DIM, DEPTH, GROUPS = 2, 8, 12, 2, 4


def linear(state, name, bias=True):
  """A torch Linear's weights as a Flax Dense's params (kernel = weight transposed)."""
  params = {"kernel": state[f"{name}.weight"].T}
  if bias:
    params["bias"] = state[f"{name}.bias"]
  return params


def jdiff_params(state: dict) -> dict:
  """diffusers Transformer2DModel state dict -> SpatialTransformer params."""
  params = {"norm": {"scale": state["norm.weight"], "bias": state["norm.bias"]},
            "proj_in": linear(state, "proj_in"), "proj_out": linear(state, "proj_out")}
  for i in range(DEPTH):
    prefix = f"transformer_blocks.{i}."
    block = {norm: {"scale": state[f"{prefix}{norm}.weight"], "bias": state[f"{prefix}{norm}.bias"]}
             for norm in ("norm1", "norm2", "norm3")}
    for attn in ("attn1", "attn2"):
      block[attn] = {proj: linear(state, f"{prefix}{attn}.{proj}", bias=False) for proj in ("to_q", "to_k", "to_v")}
      block[attn]["to_out"] = linear(state, f"{prefix}{attn}.to_out.0")
    block["ff_proj"], block["ff_out"] = linear(state, f"{prefix}ff.net.0.proj"), linear(state, f"{prefix}ff.net.2")
    params[f"transformer_blocks_{i}"] = block
  return jax.tree.map(jnp.asarray, params)


def main():
  torch.manual_seed(0)
  channels = HEADS * HEAD_DIM
  reference = Transformer2DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=channels,
                                 num_layers=DEPTH, cross_attention_dim=CONTEXT_DIM, norm_num_groups=GROUPS,
                                 use_linear_projection=True).eval()
  with torch.no_grad():  # diffusers zero-initialises proj_out too: give it weights so the blocks show.
    reference.proj_out.weight.normal_(0, 0.1)
  state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, channels, 6, 6)).astype(np.float32)
  context = rng.normal(size=(2, 5, CONTEXT_DIM)).astype(np.float32)
  with torch.no_grad():
    want = reference(torch.tensor(x), encoder_hidden_states=torch.tensor(context)).sample.numpy()
  block = SpatialTransformer(num_heads=HEADS, depth=DEPTH, groups=GROUPS)
  got = block.apply({"params": jdiff_params(state)}, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(context))
  got = np.asarray(got).transpose(0, 3, 1, 2)
  print(f"max |jdiff - diffusers| = {np.abs(got - want).max():.2e} (outputs up to {np.abs(want).max():.2f}, "
        f"blocks change the input by up to {np.abs(want - x).max():.2f})")


if __name__ == "__main__":
  main()
