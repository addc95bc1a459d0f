"""The notebook face of jdiff: load a trained work dir, then generate images.

    import jdiff
    pipe = jdiff.load("runs/default")
    samples = pipe.generate(num=20, label=3, sampler="ddim", steps=20, guidance=3.0, seed=0)
    samples.images  # uint8 [20, 16, 16, 1]
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

import jax
import numpy as np

from jdiff import generate as gen
from jdiff import samplers
from jdiff.config import Config, parse_config
from jdiff.data import model_range_to_uint8
from jdiff.models.unet import UNet
from jdiff.schedules import Schedule, make_schedule
from jdiff.train import checkpoint
from jdiff.train.state import abstract_train_state, make_model


@dataclasses.dataclass(frozen=True)
class Samples:
  images: np.ndarray  # uint8 [N, H, W, C]
  labels: np.ndarray | None  # int32 [N], or None for an unconditional model
  seeds: np.ndarray  # the seed of each image: image i is reproduced by its seed alone


@dataclasses.dataclass
class Pipeline:
  config: Config
  params: dict
  step: int

  @property
  def model(self) -> UNet:
    return make_model(self.config)

  @property
  def schedule(self) -> Schedule:
    return make_schedule(self.config.diffusion.schedule, self.config.diffusion.num_timesteps)

  def generate(self, num: int = 16, *, seed: int = 0, label: int | Sequence[int] | None = None,
               sampler: str | None = None, steps: int | None = None, guidance: float | None = None,
               eta: float | None = None, batch_size: int = 256,
               progress: Callable[[int, int], None] | None = None) -> Samples:
    """Generates `num` images with seeds seed, seed+1, ...; unset options come from the config's sampling.

    label: one class for every image, one per image, or None to cycle through the classes.
    """
    sc = self.config.sampling
    sampler, steps = sampler or sc.sampler, steps or sc.num_steps
    eta = sc.eta if eta is None else eta
    guidance = self._check_guidance(sc.guidance_scale if guidance is None else guidance)
    self._check_sampler(sampler, steps)
    seeds = np.arange(seed, seed + num, dtype=np.int64)
    labels = self._labels(label, num)
    size = min(batch_size, num)
    chunks = []
    for start in range(0, num, size):
      chunk = slice(start, min(start + size, num))
      chunks.append(self._generate_padded(seeds[chunk], None if labels is None else labels[chunk], size,
                                          sampler=sampler, num_steps=steps, guidance_scale=guidance, eta=eta))
      if progress:
        progress(chunk.stop, num)
    return Samples(images=np.concatenate(chunks), labels=labels, seeds=seeds)

  def _generate_padded(self, seeds, labels, size: int, **options):
    """Pads a short last chunk to `size`, so every chunk reuses one compiled program."""
    n = len(seeds)
    pad = lambda a: np.concatenate([a, np.repeat(a[-1:], size - n, axis=0)])
    images = gen.generate(self.model, self.params, self.schedule, seeds=pad(seeds),
                          labels=None if labels is None else pad(labels),
                          prediction=self.config.diffusion.prediction, **options)
    return model_range_to_uint8(images)[:n]

  def _labels(self, label, num: int) -> np.ndarray | None:
    num_classes = self.config.model.num_classes
    if not num_classes:
      if label is not None:
        raise ValueError(f"label={label!r} given, but this model is unconditional (config.model.num_classes=0)")
      return None
    labels = np.arange(num) % num_classes if label is None else np.broadcast_to(np.asarray(label), (num,))
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
      raise ValueError(f"label {int(bad[0])} is outside this model's classes: use 0..{num_classes - 1}")
    return labels.astype(np.int32)

  def _check_guidance(self, guidance: float) -> float:
    if guidance < 0:
      raise ValueError(f"guidance={guidance} must be >= 0 (1 = no guidance)")
    if guidance != 1.0 and not self.config.model.num_classes:
      raise ValueError(f"guidance={guidance} needs a class-conditional model; this one is unconditional: "
                       "use guidance=1")
    return float(guidance) if self.config.model.num_classes else 1.0

  def _check_sampler(self, sampler: str, steps: int) -> None:
    if sampler not in samplers.SAMPLERS:
      raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(samplers.SAMPLERS)}")
    if not 1 <= steps <= self.config.diffusion.num_timesteps:
      raise ValueError(f"steps={steps} must be between 1 and the model's "
                       f"{self.config.diffusion.num_timesteps} diffusion timesteps")


def load(workdir: str, step: int | None = None, ema: bool = True) -> Pipeline:
  """Restores a trained model from a work dir (its latest checkpoint, or `step`), EMA params by default."""
  ckpt_dir = checkpoint.checkpoint_dir(workdir)
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"no checkpoints in work dir {workdir!r} (looked for {ckpt_dir}): train one with "
                            f"`python train.py --workdir {workdir}`, or pass the --workdir you trained into")
  manager = checkpoint.make_manager(workdir, create=False)
  steps = manager.all_steps()
  if not steps:
    raise FileNotFoundError(f"work dir {workdir!r} has no finished checkpoint in {ckpt_dir}")
  step = max(steps) if step is None else step
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint at step {step} in {ckpt_dir}; available steps: "
                            f"{', '.join(map(str, sorted(steps)))}")
  config = parse_config(checkpoint.restore_config(manager, step))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                    abstract_train_state(config))
  state = checkpoint.restore_state(manager, step, abstract)
  return Pipeline(config=config, params=state.ema_params if ema else state.params, step=step)
