"""Sample quality of a trained model against real images: samples conditioned like a real split, their features,
and the Fréchet and kernel distances to a reference set's statistics.

A class model's samples take the split's labels and a text model's its captions, image i the condition of real
image i (cycled), so the samples and the real images answer the same conditions. Seeds are seed, seed + 1, ...:
two samplers evaluated with the same seed start from the same noises, so their difference is measured more
precisely than either distance alone.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import numpy as np

from jdiff.config import DataConfig
from jdiff.metrics import fid
from jdiff.metrics.features import Split, dataset_features, read_split

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000


def model_data(pipe) -> DataConfig:
  """The data config of the images `pipe` generates: its training data at the generated image size."""
  return dataclasses.replace(pipe.config.data, image_size=pipe.image_shape[0])


def own_features(pipe):
  """The feature network trained on `pipe`'s dataset at its image size (trained and cached on first use)."""
  return dataset_features(model_data(pipe))


def real_split(pipe, split: str) -> Split:
  return read_split(model_data(pipe), split)


def conditions(pipe, split: Split, num: int) -> dict:
  """generate()'s label or prompt arguments for `num` images conditioned like `split` (cycled)."""
  index = np.arange(num) % len(split.images)
  if pipe.is_text_model:
    return {"prompt": list(split.captions[index])}
  if pipe.config.model.num_classes:
    return {"label": split.labels["label"][index]}
  return {}


def generate_like(pipe, split: Split, num: int, *, seed: int = 0, batch_size: int = 250, progress=None,
                  warm_up: bool = True, **sampling) -> tuple[np.ndarray, float]:
  """(uint8 images [num, ...], seconds per image): `num` samples conditioned like `split`. With warm_up the first
  batch is generated once beforehand, so the time excludes compiling."""
  conds = conditions(pipe, split, num)
  if warm_up:
    first = {key: value[:min(batch_size, num)] for key, value in conds.items()}
    pipe.generate(num=min(batch_size, num), seed=seed, batch_size=batch_size, **first, **sampling)
  start = time.perf_counter()
  samples = pipe.generate(num=num, seed=seed, batch_size=batch_size, progress=progress, **conds, **sampling)
  return samples.images, (time.perf_counter() - start) / num


def distances(features: np.ndarray, reference: fid.FeatureStats, space: str, *, kid: bool = True,
              kid_subset_size: int = KID_SUBSET_SIZE, kid_subsets: int = KID_SUBSETS, seed: int = 0) -> dict:
  """{"fd": Fréchet distance, and with kid "kd", "kd_std": kernel distance and its std over subsets} of features
  [N, D] from `space` against the reference statistics."""
  stats = fid.FeatureStats.of(features, space, keep_features=kid)
  out = {"fd": fid.stats_distance(stats, reference)}
  if kid:
    if reference.features is None:
      raise ValueError("the kernel distance needs the reference's features; the reference statistics file has none "
                       "(write it again with them kept)")
    out["kd"], out["kd_std"] = fid.kernel_distance(features, reference.features, num_subsets=kid_subsets,
                                                   subset_size=kid_subset_size, seed=seed)
  return out


def likelihood_conditions(pipe, split: Split, num: int, conditional: bool):
  """The model's condition for each of the first `num` images of `split`: their labels or captions' token ids, or
  with conditional=False the null class or the empty prompt; None for an unconditional model."""
  if pipe.is_text_model:
    captions = list(split.captions[:num]) if conditional else [""] * num
    return pipe.config.text.tokenizer().encode(captions)
  if pipe.config.model.num_classes:
    return split.labels["label"][:num] if conditional else np.full(num, pipe.config.model.num_classes, np.int32)
  return None


def bits_per_dim(pipe, split: Split, method: str, *, num: int, conditional: bool = True, seed: int = 0,
                 batch_size: int = 250, progress=None, vlb_timesteps: int | None = 100,
                 vlb_variance: str = "large", ode_steps: int = 100) -> np.ndarray:
  """Bits per dimension [num] of the first `num` images of `split` under a pixel model: method "vlb" (the
  variational bound) or "ode" (the probability-flow ODE on dequantised images, Hutchinson's estimator); each batch
  is split over the devices holding the model's parameters."""
  import jax  # pylint: disable=import-outside-toplevel
  from jdiff import generate  # pylint: disable=import-outside-toplevel
  from jdiff.metrics import likelihood  # pylint: disable=import-outside-toplevel
  if pipe.codec:
    raise ValueError("bits per dimension are defined here for pixel models; this one samples a VAE's latents")
  if pipe.config.diffusion.prediction == "flow":
    raise ValueError("bits per dimension are computed on the variance-preserving process; this is a flow model "
                     "(prediction 'flow'): measure its Fréchet and kernel distances (--metric fd,kd)")
  images, conds = split.images[:num], likelihood_conditions(pipe, split, num, conditional)
  model_fn = jax.tree_util.Partial(functools.partial(_apply, pipe.model), pipe.params)
  prediction = pipe.config.diffusion.prediction
  out = []
  for start in range(0, len(images), batch_size):
    part = slice(start, start + batch_size)
    rng = jax.random.fold_in(jax.random.key(seed), start)
    batch, cond = images[part], None if conds is None else conds[part]
    x, cond = generate.spread_batch(pipe.params, batch, batch if cond is None else cond)
    cond = None if conds is None else cond
    if method == "vlb":
      out.append(likelihood.vlb_bits_per_dim(model_fn, pipe.schedule, x, cond, rng=rng, prediction=prediction,
                                             variance=vlb_variance, timesteps=vlb_timesteps))
    elif method == "ode":
      out.append(likelihood.ode_bits_per_dim(model_fn, pipe.schedule, x, cond, rng=rng, prediction=prediction,
                                             steps=ode_steps))
    else:
      raise ValueError(f"unknown likelihood method {method!r}; choose vlb or ode")
    if progress:
      progress(min(part.stop, len(images)), len(images))
  return np.concatenate(out)


def _apply(model, params, x_t, t, cond):
  return model.apply({"params": params}, x_t, t, cond)
