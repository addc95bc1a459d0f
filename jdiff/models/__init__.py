"""Flax Linen networks: the U-Net and its building blocks."""
from jdiff.models.layers import (AttentionBlock, Downsample, ResBlock, TimeEmbedding, Upsample,
                                 timestep_embedding)
from jdiff.models.unet import UNet, UNetConfig

__all__ = ["AttentionBlock", "Downsample", "ResBlock", "TimeEmbedding", "UNet", "UNetConfig", "Upsample",
           "timestep_embedding"]
