"""diffusers' and transformers' config.json files <-> jdiff's typed model configs, in both directions.

Every field a file may hold is either mapped onto jdiff's config, checked against the one value jdiff computes
(e.g. act_fn 'silu'), or ignored as bookkeeping (names starting with '_'). Anything else, or a value jdiff would
compute differently, raises UnsupportedConfigError naming the file, the field and what jdiff supports: a model
either loads and computes what diffusers computes, or does not load. Absent fields take diffusers' defaults.
"""
from __future__ import annotations

from typing import Any

from jdiff import schedulers
from jdiff.models.text import TextEncoderConfig
from jdiff.models.unet import UNetConfig
from jdiff.models.vae import VAEConfig
from jdiff.schedules import SCHEDULE_NAMES


class UnsupportedConfigError(ValueError):
  """A diffusers or transformers config describes something jdiff's models do not compute."""


class _Fields:
  """A config dict read field by field, so that the fields nobody read can be reported."""

  def __init__(self, raw: dict, where: str):
    self.raw, self.where, self.read = dict(raw), where, set()

  def get(self, name: str, default: Any = None) -> Any:
    self.read.add(name)
    return self.raw.get(name, default)

  def expect(self, name: str, default: Any, *allowed: Any) -> Any:
    """The field's value, which must be one of `allowed` (default: only the default)."""
    value = self.get(name, default)
    allowed = allowed or (default,)
    if _normalised(value) not in [_normalised(a) for a in allowed]:
      self.fail(name, value, " or ".join(repr(a) for a in allowed))
    return value

  def fail(self, name: str, value: Any, supported: str):
    raise UnsupportedConfigError(f"{self.where}: {name}={value!r} is not supported by jdiff (supported: {supported})")

  def done(self) -> None:
    for name, value in self.raw.items():
      if name not in self.read and not name.startswith("_"):
        self.fail(name, value, "a config without this field")


def _normalised(value: Any) -> Any:
  return tuple(value) if isinstance(value, list) else value


def _per_level(fields: _Fields, name: str, value: Any, levels: int) -> tuple:
  values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * levels
  if len(values) != levels:
    fields.fail(name, value, f"one value, or one per block ({levels})")
  return values


# U-Nets.

CROSS_ATTENTION_BLOCKS = {"down": ("CrossAttnDownBlock2D", "DownBlock2D"), "up": ("CrossAttnUpBlock2D", "UpBlock2D")}
ATTENTION_BLOCKS = {"down": ("AttnDownBlock2D", "DownBlock2D"), "up": ("AttnUpBlock2D", "UpBlock2D")}


def unet_config(raw: dict, dtype: str = "float32", where: str = "unet/config.json") -> UNetConfig:
  """The UNetConfig of a UNet2DConditionModel (Stable Diffusion 1.x / 2.x) or UNet2DModel config."""
  fields = _Fields(raw, where)
  text = raw.get("_class_name", "UNet2DConditionModel") == "UNet2DConditionModel"
  blocks = CROSS_ATTENTION_BLOCKS if text else ATTENTION_BLOCKS
  channels = tuple(fields.get("block_out_channels", (320, 640, 1280, 1280) if text else (224, 448, 672, 896)))
  levels = len(channels)
  if any(c % channels[0] for c in channels):
    fields.fail("block_out_channels", list(channels), "multiples of the first entry")
  down = fields.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",) if text else
                    ("DownBlock2D",) + ("AttnDownBlock2D",) * 3)
  up = fields.get("up_block_types", ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3 if text else
                  ("AttnUpBlock2D",) * 3 + ("UpBlock2D",))
  for name, types, kind in (("down_block_types", down, "down"), ("up_block_types", up, "up")):
    if len(types) != levels or any(t not in blocks[kind] for t in types):
      fields.fail(name, list(types), f"{levels} of {' / '.join(blocks[kind])}")
  attends = tuple(t == blocks["down"][0] for t in down)
  if attends != tuple(t == blocks["up"][0] for t in reversed(up)):
    fields.fail("up_block_types", list(up), "the attention blocks of down_block_types, mirrored")
  sample_size = fields.get("sample_size") or 64
  if isinstance(sample_size, (list, tuple)):
    sample_size = sample_size[0]
  resolutions = [sample_size // 2**level for level in range(levels)]
  norm_groups = fields.get("norm_num_groups", 32)
  common = dict(
      image_size=sample_size, in_channels=fields.get("in_channels", 4 if text else 3),
      out_channels=fields.get("out_channels", 4 if text else 3), channels=channels[0],
      channel_mults=tuple(c // channels[0] for c in channels), num_res_blocks=fields.get("layers_per_block", 2),
      attention_resolutions=tuple(r for r, a in zip(resolutions, attends) if a), dropout=fields.get("dropout", 0.0),
      norm_groups=norm_groups, norm_eps=fields.get("norm_eps", 1e-5),
      flip_sin_to_cos=fields.get("flip_sin_to_cos", True), freq_shift=fields.get("freq_shift", 0), dtype=dtype)
  for name, default in (("center_input_sample", False), ("act_fn", "silu"), ("downsample_padding", 1),
                        ("mid_block_scale_factor", 1), ("time_embedding_type", "positional"),
                        ("time_embedding_dim", None), ("class_embed_type", None)):
    fields.expect(name, default)
  if text:
    config = UNetConfig(**common, **_cross_attention_fields(fields, levels))
  else:
    config = UNetConfig(**common, **_attention_fields(fields, channels, attends, norm_groups))
  fields.done()
  return config


CONTROLNET_FIELDS = ("conditioning_channels", "conditioning_embedding_out_channels",
                     "controlnet_conditioning_channel_order", "global_pool_conditions")


def controlnet_config(raw: dict, image_size: int, dtype: str = "float32",
                      where: str = "controlnet/config.json") -> tuple[UNetConfig, int, tuple[int, ...]]:
  """(the U-Net config its encoder copies, conditioning_channels, conditioning_embedding_out_channels) of a
  diffusers ControlNetModel config, for its base's image_size (which a ControlNet's config does not hold)."""
  fields = _Fields({k: v for k, v in raw.items() if k in CONTROLNET_FIELDS}, where)
  fields.expect("controlnet_conditioning_channel_order", "rgb")
  fields.expect("global_pool_conditions", False)
  channels = fields.get("conditioning_channels", 3)
  embedding = tuple(fields.get("conditioning_embedding_out_channels", (16, 32, 96, 256)))
  fields.done()
  unet = {k: v for k, v in raw.items() if k not in CONTROLNET_FIELDS}
  down = unet.get("down_block_types", ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",))
  mirror = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}
  unet.update(_class_name="UNet2DConditionModel", up_block_types=[mirror.get(t, t) for t in reversed(down)],
              out_channels=unet.get("in_channels", 4), sample_size=image_size)
  return unet_config(unet, dtype, where), channels, embedding


def _cross_attention_fields(fields: _Fields, levels: int) -> dict:
  """The UNet2DConditionModel fields of Stable Diffusion's text U-Net."""
  fields.expect("mid_block_type", "UNetMidBlock2DCrossAttn")
  shift = fields.expect("resnet_time_scale_shift", "default", "default", "scale_shift")
  if fields.get("num_attention_heads") is not None:  # diffusers itself refuses it for this class
    fields.fail("num_attention_heads", fields.raw["num_attention_heads"], "None (the heads are attention_head_dim)")
  head_counts = fields.get("attention_head_dim", 8)  # diffusers' name for the number of heads of this class
  depth = set(_per_level(fields, "transformer_layers_per_block", fields.get("transformer_layers_per_block", 1), levels))
  if len(depth) != 1:
    fields.fail("transformer_layers_per_block", fields.raw["transformer_layers_per_block"], "one depth for every block")
  only_cross = fields.get("only_cross_attention", False)
  if any(_per_level(fields, "only_cross_attention", only_cross, levels)):
    fields.fail("only_cross_attention", only_cross, "False")
  fields.get("upcast_attention")  # jdiff always forms attention logits and softmax in fp32
  for name, default in (("dual_cross_attention", False), ("addition_embed_type", None),
                        ("addition_time_embed_dim", None), ("num_class_embeds", None), ("resnet_skip_time_act", False),
                        ("resnet_out_scale_factor", 1.0), ("time_embedding_act_fn", None), ("timestep_post_act", None),
                        ("time_cond_proj_dim", None), ("conv_in_kernel", 3), ("conv_out_kernel", 3),
                        ("projection_class_embeddings_input_dim", None), ("attention_type", "default"),
                        ("class_embeddings_concat", False), ("mid_block_only_cross_attention", None),
                        ("cross_attention_norm", None), ("encoder_hid_dim", None), ("encoder_hid_dim_type", None),
                        ("reverse_transformer_layers_per_block", None)):
    fields.expect(name, default)
  fields.get("addition_embed_type_num_heads")  # read only with an addition_embed_type
  return dict(num_heads=_per_level(fields, "attention_head_dim", head_counts, levels),
              context_dim=fields.get("cross_attention_dim", 1280), transformer_depth=depth.pop(),
              linear_projection=bool(fields.get("use_linear_projection", False)), scale_shift=shift == "scale_shift")


def _attention_fields(fields: _Fields, channels: tuple[int, ...], attends: tuple[bool, ...], norm_groups: int) -> dict:
  """The UNet2DModel fields of a class-conditional or unconditional U-Net."""
  fields.expect("mid_block_type", "UNetMidBlock2D")
  fields.expect("add_attention", True)
  fields.expect("downsample_type", "conv")
  fields.expect("upsample_type", "conv")
  fields.get("num_train_timesteps")  # read only with time_embedding_type 'learned'
  shift = fields.expect("resnet_time_scale_shift", "default", "default", "scale_shift")
  if fields.get("attn_norm_num_groups") not in (None, norm_groups) or (
      shift == "scale_shift" and fields.get("attn_norm_num_groups") is None):
    fields.fail("attn_norm_num_groups", fields.raw.get("attn_norm_num_groups"), f"norm_num_groups ({norm_groups})")
  head_dim = fields.get("attention_head_dim", 8)  # this class's attention_head_dim is the width of a head
  attending = [c for c, a in zip(channels, attends) if a] + [channels[-1]]  # the middle block attends too
  if head_dim is not None and any(c % head_dim for c in attending):
    fields.fail("attention_head_dim", head_dim, f"a divisor of the attending blocks' channels {attending}")
  heads = tuple(1 if head_dim is None or not (a or i == len(channels) - 1) else c // head_dim
                for i, (c, a) in enumerate(zip(channels, attends)))
  classes = fields.get("num_class_embeds")
  return dict(num_heads=heads, num_classes=0 if classes is None else classes - 1, scale_shift=shift == "scale_shift")


def diffusers_unet_config(config: UNetConfig) -> dict:
  """The UNet2DConditionModel (text) or UNet2DModel (class or unconditional) config of a jdiff U-Net."""
  text = bool(config.context_dim)
  blocks = CROSS_ATTENTION_BLOCKS if text else ATTENTION_BLOCKS
  attends = config.level_attends
  raw = dict(
      _class_name="UNet2DConditionModel" if text else "UNet2DModel", sample_size=config.image_size,
      in_channels=config.in_channels, out_channels=config.output_channels,
      block_out_channels=list(config.level_channels), layers_per_block=config.num_res_blocks,
      down_block_types=[blocks["down"][0 if a else 1] for a in attends],
      up_block_types=[blocks["up"][0 if a else 1] for a in reversed(attends)], norm_num_groups=config.norm_groups,
      norm_eps=config.norm_eps, flip_sin_to_cos=config.flip_sin_to_cos, freq_shift=config.freq_shift,
      dropout=config.dropout, act_fn="silu", downsample_padding=1, center_input_sample=False,
      resnet_time_scale_shift="scale_shift" if config.scale_shift else "default")
  if config.channel_mults[0] != 1:
    raise UnsupportedConfigError(f"channel_mults={config.channel_mults}: diffusers' U-Nets start at their first "
                                 "block's width, so the first multiplier must be 1")
  if text:
    raw.update(mid_block_type="UNetMidBlock2DCrossAttn", attention_head_dim=list(config.level_heads),
               cross_attention_dim=config.context_dim, transformer_layers_per_block=config.transformer_depth,
               use_linear_projection=config.linear_projection, upcast_attention=True)
    return raw
  attending = [(c, h) for c, h, a in zip(config.level_channels, config.level_heads, attends) if a]
  attending.append((config.level_channels[-1], config.level_heads[-1]))  # the middle block
  head_dims = {c // h for c, h in attending}
  if {h for _, h in attending} != {1} and len(head_dims) != 1:
    raise UnsupportedConfigError(f"num_heads={config.num_heads}: UNet2DModel needs one head width in every attention "
                                 f"block (got {sorted(head_dims)})")
  raw.update(mid_block_type="UNetMidBlock2D", add_attention=True,
             attention_head_dim=None if {h for _, h in attending} == {1} else head_dims.pop(),
             attn_norm_num_groups=config.norm_groups,
             num_class_embeds=config.num_classes + 1 if config.num_classes else None)
  return raw


# The autoencoder.

def vae_config(raw: dict, dtype: str = "float32", where: str = "vae/config.json") -> tuple[VAEConfig, float]:
  """(VAEConfig, scaling_factor) of an AutoencoderKL config."""
  fields = _Fields(raw, where)
  channels = tuple(fields.get("block_out_channels", (64,)))
  fields.expect("down_block_types", ("DownEncoderBlock2D",), ("DownEncoderBlock2D",) * len(channels))
  fields.expect("up_block_types", ("UpDecoderBlock2D",), ("UpDecoderBlock2D",) * len(channels))
  in_channels = fields.get("in_channels", 3)
  fields.expect("out_channels", 3, in_channels)
  for name, default in (("act_fn", "silu"), ("shift_factor", None), ("latents_mean", None), ("latents_std", None),
                        ("use_quant_conv", True), ("use_post_quant_conv", True)):
    fields.expect(name, default)
  fields.get("force_upcast")  # diffusers' fp16 advice; jdiff's group norms always run in fp32
  sample_size = fields.get("sample_size", 32)
  sample_size = sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size
  config = VAEConfig(image_size=sample_size, in_channels=in_channels, latent_channels=fields.get("latent_channels", 4),
                     block_out_channels=channels, layers_per_block=fields.get("layers_per_block", 1),
                     norm_groups=fields.get("norm_num_groups", 32),
                     mid_attention=fields.get("mid_block_add_attention", True), dtype=dtype,
                     downsample_padding="end")
  scaling_factor = float(fields.get("scaling_factor", 0.18215))
  fields.done()
  return config, scaling_factor


def diffusers_vae_config(config: VAEConfig, scaling_factor: float) -> dict:
  if config.downsample_padding != "end":
    raise ValueError(f"this VAE pads its downsampling convs on every side (downsample_padding="
                     f"{config.downsample_padding!r}), which diffusers' AutoencoderKL cannot express: export a VAE "
                     "trained with downsample_padding='end', as configs/vae_*.py set it")
  levels = len(config.block_out_channels)
  return dict(_class_name="AutoencoderKL", in_channels=config.in_channels, out_channels=config.in_channels,
              down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
              block_out_channels=list(config.block_out_channels), layers_per_block=config.layers_per_block,
              act_fn="silu", latent_channels=config.latent_channels, norm_num_groups=config.norm_groups,
              sample_size=config.image_size, scaling_factor=scaling_factor,
              mid_block_add_attention=config.mid_attention, force_upcast=True)


# The text encoder.

def text_config(raw: dict, dtype: str = "float32", where: str = "text_encoder/config.json") -> TextEncoderConfig:
  """The TextEncoderConfig of a transformers CLIPTextModel config."""
  fields = _Fields(raw, where)
  fields.expect("architectures", ["CLIPTextModel"], None, ["CLIPTextModel"])
  fields.expect("model_type", "clip_text_model")
  activation = fields.expect("hidden_act", "quick_gelu", "quick_gelu", "gelu")
  fields.expect("layer_norm_eps", 1e-5)
  for name in ("attention_dropout", "dropout", "initializer_range", "initializer_factor", "projection_dim",
               "pad_token_id", "bos_token_id", "eos_token_id", "torch_dtype", "dtype", "transformers_version"):
    fields.get(name)  # training or bookkeeping: no effect on the hidden states
  config = TextEncoderConfig(vocab_size=fields.get("vocab_size", 49408),
                             max_length=fields.get("max_position_embeddings", 77),
                             width=fields.get("hidden_size", 512), depth=fields.get("num_hidden_layers", 12),
                             num_heads=fields.get("num_attention_heads", 8),
                             mlp_dim=fields.get("intermediate_size", 2048), causal=True, activation=activation,
                             dtype=dtype)
  fields.done()
  return config


def diffusers_text_config(config: TextEncoderConfig) -> dict:
  if not config.causal:
    raise UnsupportedConfigError("causal=False: CLIPTextModel's attention is causal; train the text encoder with "
                                 "causal=True to export it")
  return dict(architectures=["CLIPTextModel"], model_type="clip_text_model", vocab_size=config.vocab_size,
              max_position_embeddings=config.max_length, hidden_size=config.width, num_hidden_layers=config.depth,
              num_attention_heads=config.num_heads, intermediate_size=config.mlp_dim, hidden_act=config.activation,
              layer_norm_eps=1e-5, attention_dropout=0.0, dropout=0.0, initializer_range=0.02, initializer_factor=1.0,
              projection_dim=config.width, pad_token_id=1, bos_token_id=0, eos_token_id=2)


# The scheduler: a directory's scheduler_config.json is read by jdiff.schedulers; an export writes jdiff's own
# sampling defaults as one.

BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
DEFAULT_BETAS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012)}


def schedule_name(raw: dict) -> str:
  """jdiff's name for a scheduler config's beta_schedule (the schedule itself comes from jdiff.schedulers)."""
  return {v: k for k, v in BETA_SCHEDULES.items()}.get(raw.get("beta_schedule", "linear"), "linear")


def diffusers_scheduler_config(*, schedule: str, num_timesteps: int, prediction: str, sampler: str, spacing: str,
                               clip_x0: bool, zero_terminal_snr: bool = False) -> dict:
  """The scheduler config of jdiff's sampling defaults: its sampler's scheduler class on jdiff's schedule, with the
  conventions jdiff samples with (no steps offset, the last step to alphas_cumprod 1). DDIM, DDPM and PNDM have no
  Karras sigmas in diffusers: their 'karras' spacing is written as 'trailing'."""
  if schedule not in SCHEDULE_NAMES:
    raise UnsupportedConfigError(f"schedule {schedule!r} has no diffusers beta_schedule")
  if prediction not in schedulers.PREDICTIONS.values():
    raise UnsupportedConfigError(f"prediction {prediction!r} has no diffusers prediction_type in the classes "
                                 "jdiff writes (a flow model's FlowMatchEulerDiscreteScheduler config is not exported)")
  cls = schedulers.CLASS_OF_SAMPLER.get(sampler, "DPMSolverMultistepScheduler")
  if spacing == "karras" and "use_karras_sigmas" not in schedulers.CLASS_DEFAULTS[cls]:
    spacing = "trailing"
  raw = dict(_class_name=cls,
             num_train_timesteps=num_timesteps, beta_schedule=BETA_SCHEDULES[schedule],
             prediction_type={v: k for k, v in schedulers.PREDICTIONS.items()}[prediction],
             timestep_spacing="leading" if spacing == "karras" else spacing, steps_offset=0, set_alpha_to_one=True,
             clip_sample=clip_x0, rescale_betas_zero_snr=zero_terminal_snr)
  if spacing == "karras":
    raw["use_karras_sigmas"] = True
  if sampler == "dpmpp_2m_sde":
    raw["algorithm_type"] = "sde-dpmsolver++"
  if sampler == "plms":
    raw["skip_prk_steps"] = True
  if schedule in DEFAULT_BETAS:
    raw.update(beta_start=DEFAULT_BETAS[schedule][0], beta_end=DEFAULT_BETAS[schedule][1])
  return raw
