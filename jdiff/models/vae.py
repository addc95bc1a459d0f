"""An AutoencoderKL-style VAE (Flax Linen, NHWC): ResBlock encoder and decoder around a diagonal Gaussian latent.

`AutoencoderKL(VAEConfig(...))` maps images [B, S, S, C] in [-1, 1] to a posterior over latents
[B, S/f, S/f, latent_channels] with f = 2**(len(block_out_channels) - 1), and latents back to images.

    posterior = model.apply(variables, x, method=AutoencoderKL.encode)   # DiagonalGaussian
    x_hat = model.apply(variables, posterior.mode(), method=AutoencoderKL.decode)

The layout follows the latent-diffusion autoencoder: conv_in, per level `layers_per_block` residual blocks and a
stride-2 downsample (not after the last level), a middle of ResBlock / self-attention / ResBlock, then GroupNorm,
SiLU and a conv to 2 * latent_channels (mean and log-variance), and a 1x1 "quant" conv; the decoder mirrors it with
`layers_per_block + 1` blocks per level and nearest-neighbour upsampling. With `downsample_padding="end"` the
downsampling convs pad the bottom and right only, as diffusers' AutoencoderKL does, so that its weights give its
outputs. With Stable Diffusion 1.5's settings (configs/vae_sd15.py) it has the same 83,653,863 parameters as that
model's autoencoder.
"""
from __future__ import annotations

import dataclasses

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from jdiff.models.layers import AttentionBlock, Conv1x1, Downsample, Upsample, conv3x3, group_norm

DTYPES = ("float32", "bfloat16", "float16")  # float16: inference only
LOGVAR_RANGE = (-30.0, 20.0)  # Clipped as in latent diffusion, so exp(logvar) neither underflows nor explodes.


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Architecture of the autoencoder; `VAEConfig(**config.vae)` from an ml_collections config."""
  image_size: int = 32  # The size it is trained at; being convolutional it encodes any multiple of the factor.
  in_channels: int = 3
  latent_channels: int = 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  norm_groups: int = 32
  mid_attention: bool = True
  dtype: str = "float32"
  # How the encoder's stride-2 convs pad: "end" (bottom and right, as diffusers' AutoencoderKL, whose weights then
  # give its outputs; jdiff's configs use it) or "all" (one on every side: the default, so that a checkpoint whose
  # stored config predates the field encodes as it was trained).
  downsample_padding: str = "all"

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
    for name in ("image_size", "in_channels", "latent_channels", "layers_per_block", "norm_groups"):
      _require(getattr(self, name) > 0, name, getattr(self, name), "a positive integer")
    _require(len(self.block_out_channels) > 0 and all(c > 0 for c in self.block_out_channels),
             "block_out_channels", self.block_out_channels, "a non-empty tuple of positive integers")
    _require(self.dtype in DTYPES, "dtype", self.dtype, f"one of {DTYPES}")
    _require(isinstance(self.mid_attention, bool), "mid_attention", self.mid_attention, "True or False")
    _require(self.downsample_padding in ("all", "end"), "downsample_padding", self.downsample_padding,
             "'end' (diffusers' layout) or 'all'")
    for width in self.block_out_channels:
      _require(width % self.norm_groups == 0, "norm_groups", self.norm_groups,
               f"a divisor of every level's channel count {self.block_out_channels}")
    _require(self.image_size % self.downsample_factor == 0, "image_size", self.image_size,
             f"divisible by the downsampling factor 2**(len(block_out_channels) - 1) = {self.downsample_factor}")

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @property
  def latent_size(self) -> int:
    return self.image_size // self.downsample_factor


def _require(ok: bool, field: str, value, allowed: str):
  if not ok:
    raise ValueError(f"VAEConfig.{field}={value!r} is invalid: expected {allowed}.")


@flax.struct.dataclass
class DiagonalGaussian:
  """N(mean, exp(logvar)) per latent element; logvar is clipped to LOGVAR_RANGE. All in fp32."""
  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
    """From the encoder's [..., 2 * L] output: the first L channels are the mean, the last L the log-variance."""
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return cls(mean=mean, logvar=jnp.clip(logvar, *LOGVAR_RANGE))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  def sample(self, rng: jax.Array) -> jax.Array:
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, jnp.float32)

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self) -> jax.Array:
    """KL(q || N(0, I)) per example [B]: 0.5 * sum(mean^2 + var - 1 - logvar) over the latent elements."""
    per_element = 0.5 * (jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar)
    return jnp.sum(per_element, axis=tuple(range(1, self.mean.ndim)))


class VAEResBlock(nn.Module):
  """Pre-activation residual block without a time embedding: (norm, SiLU, conv) twice, 1x1 shortcut if widths differ."""
  features: int
  groups: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.silu(group_norm(x, self.groups, "norm1")).astype(self.dtype)
    h = conv3x3(self.features, self.dtype, "conv1")(h)
    h = nn.silu(group_norm(h, self.groups, "norm2")).astype(self.dtype)
    h = conv3x3(self.features, self.dtype, "conv2", zero=True)(h)
    if x.shape[-1] != self.features:
      x = Conv1x1(self.features, self.dtype, name="shortcut")(x)
    return x + h


class MidBlock(nn.Module):
  """ResBlock, single-head self-attention (optional), ResBlock at the lowest resolution."""
  groups: int
  attention: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    width = h.shape[-1]
    h = VAEResBlock(width, self.groups, self.dtype, name="res0")(h)
    if self.attention:
      h = AttentionBlock(1, self.groups, self.dtype, name="attn")(h)
    return VAEResBlock(width, self.groups, self.dtype, name="res1")(h)


class Encoder(nn.Module):
  """Images [B, S, S, C] -> posterior moments [B, S/f, S/f, 2 * latent_channels] (fp32)."""
  config: VAEConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    h = conv3x3(cfg.block_out_channels[0], dtype, "conv_in")(x.astype(dtype))
    last = len(cfg.block_out_channels) - 1
    for level, features in enumerate(cfg.block_out_channels):
      for i in range(cfg.layers_per_block):
        h = VAEResBlock(features, cfg.norm_groups, dtype, name=f"down{level}_res{i}")(h)
      if level != last:
        h = Downsample(dtype, pad_end=cfg.downsample_padding == "end", name=f"down{level}_downsample")(h)
    h = MidBlock(cfg.norm_groups, cfg.mid_attention, dtype, name="mid")(h)
    h = nn.silu(group_norm(h, cfg.norm_groups, "norm_out")).astype(dtype)
    h = conv3x3(2 * cfg.latent_channels, dtype, "conv_out")(h)
    return Conv1x1(2 * cfg.latent_channels, jnp.float32, name="quant_conv")(h)


class Decoder(nn.Module):
  """Latents [B, s, s, latent_channels] -> images [B, s*f, s*f, in_channels] (fp32)."""
  config: VAEConfig

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    z = Conv1x1(cfg.latent_channels, jnp.float32, name="post_quant_conv")(z)
    h = conv3x3(cfg.block_out_channels[-1], dtype, "conv_in")(z.astype(dtype))
    h = MidBlock(cfg.norm_groups, cfg.mid_attention, dtype, name="mid")(h)
    for level, features in reversed(list(enumerate(cfg.block_out_channels))):
      for i in range(cfg.layers_per_block + 1):
        h = VAEResBlock(features, cfg.norm_groups, dtype, name=f"up{level}_res{i}")(h)
      if level != 0:
        h = Upsample(dtype, name=f"up{level}_upsample")(h)
    h = nn.silu(group_norm(h, cfg.norm_groups, "norm_out"))
    return conv3x3(cfg.in_channels, jnp.float32, "conv_out")(h)


class AutoencoderKL(nn.Module):
  """The VAE. `__call__(x, rng)` reconstructs x through a posterior sample (rng) or the posterior mean (rng=None)."""
  config: VAEConfig

  def setup(self):
    self.encoder = Encoder(self.config)
    self.decoder = Decoder(self.config)

  def encode(self, x: jax.Array) -> DiagonalGaussian:
    return DiagonalGaussian.from_moments(self.encoder(x))

  def decode(self, z: jax.Array) -> jax.Array:
    return self.decoder(z)

  def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> tuple[jax.Array, DiagonalGaussian]:
    posterior = self.encode(x)
    z = posterior.mode() if rng is None else posterior.sample(rng)
    return self.decode(z), posterior


def init_vae_params(model: AutoencoderKL, rng: jax.Array):
  cfg = model.config
  x = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.in_channels), jnp.float32)
  return model.init({"params": rng}, x)["params"]


def vae_param_count(config: VAEConfig) -> int:
  """Number of parameters, from shapes alone (jax.eval_shape allocates nothing)."""
  shapes = jax.eval_shape(lambda: init_vae_params(AutoencoderKL(config), jax.random.key(0)))
  return sum(x.size for x in jax.tree_util.tree_leaves(shapes))
