"""jdiff-evaluate (also python -m jdiff.cli.evaluate): sample quality and likelihood of a trained work dir.

  jdiff-evaluate --workdir runs/default --metric fd,kd --num 1000 --sampler dpmpp_2m --steps 10
  jdiff-evaluate --workdir runs/default --metric bpd,ode_bpd --split test
  jdiff-evaluate --workdir runs/cifar --metric fid,kid --inception pt_inception-2015-12-05-6726825d.pth \
    --reference cifar_train.npz --num 10000
  jdiff-evaluate --workdir runs/cifar --inception pt_inception.pth --write_reference cifar_train.npz

Metrics: fid, kid (the FID Inception network's features; --inception names its weights), fd, kd (the Fréchet and
kernel distances on the features of a network trained on the model's own dataset: jdiff/metrics/features.py),
bpd (the variational bound in bits per dimension) and ode_bpd (the probability-flow ODE likelihood). The distances
compare --num samples, conditioned like the --split images, with --reference statistics, by default those of the
model's training data (--reference_split). Sampling and feature extraction split their batches over all devices.
Flags are checked before the model loads.
"""
from __future__ import annotations

import json
import os

from absl import app, flags

from jdiff.cli import runtime

FLAGS = flags.FlagValues()
PROGRAM = "jdiff-evaluate"
DISTANCES = ("fid", "kid", "fd", "kd")
METRICS = DISTANCES + ("bpd", "ode_bpd")
NAMES = {"fid": "FID", "kid": "KID", "fd": "Fréchet distance on {features}", "kd": "kernel distance on {features}",
         "bpd": "bits/dim (variational bound)", "ode_bpd": "bits/dim (probability-flow ODE)"}

_WORKDIR = flags.DEFINE_string("workdir", None, "Work dir that train.py wrote.", required=True, flag_values=FLAGS)
_CHECKPOINT = flags.DEFINE_integer("checkpoint", None, "Checkpoint step (default: the latest).", flag_values=FLAGS)
_METRIC = flags.DEFINE_string("metric", "fd,kd", f"Comma-separated metrics: {', '.join(METRICS)}.", flag_values=FLAGS)
_NUM = flags.DEFINE_integer("num", 1000, "Samples for the distances.", flag_values=FLAGS)
_SPLIT = flags.DEFINE_string("split", "test", "Held-out split: the samples' conditions and the likelihood's images.",
                             flag_values=FLAGS)
_REFERENCE = flags.DEFINE_string("reference", None, "Reference statistics (.npz from --write_reference); default: "
                                 "computed from --reference_split.", flag_values=FLAGS)
_REFERENCE_SPLIT = flags.DEFINE_string("reference_split", "train", "Split whose statistics the distances compare "
                                       "with when no --reference is given.", flag_values=FLAGS)
_WRITE_REFERENCE = flags.DEFINE_string("write_reference", None, "Write the statistics of --reference_split to this "
                                       ".npz (Inception's with --inception, else the dataset features') and stop.",
                                       flag_values=FLAGS)
_INCEPTION = flags.DEFINE_string("inception", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth, or an .npz "
                                 "made from it (python -m jdiff.metrics.inception IN.pth OUT.npz).", flag_values=FLAGS)
_SAMPLER = flags.DEFINE_string("sampler", None, "Sampler (default: the config's).", flag_values=FLAGS)
_STEPS = flags.DEFINE_integer("steps", None, "Sampling steps (default: the config's).", flag_values=FLAGS)
_SPACING = flags.DEFINE_string("spacing", None, "Timestep spacing or karras (default: the config's).",
                               flag_values=FLAGS)
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "Guidance scale (default: the config's).", flag_values=FLAGS)
_ETA = flags.DEFINE_float("eta", None, "DDIM eta / ancestral noise (default: the config's).", flag_values=FLAGS)
_LIKELIHOOD_NUM = flags.DEFINE_integer("likelihood_num", 0, "Images of --split for the likelihood (0: all).",
                                       flag_values=FLAGS)
_CONDITIONAL = flags.DEFINE_bool("conditional", True, "Likelihood given each image's label or caption "
                                 "(--noconditional: under the null class or empty prompt).", flag_values=FLAGS)
_VLB_TIMESTEPS = flags.DEFINE_integer("vlb_timesteps", 100, "Stratified steps estimating the bound's sum (0: every "
                                      "step).", flag_values=FLAGS)
_VLB_VARIANCE = flags.DEFINE_enum("vlb_variance", "large", ["large", "small"], "Reverse variance: beta_t (large) or "
                                  "the posterior's (small).", flag_values=FLAGS)
_ODE_STEPS = flags.DEFINE_integer("ode_steps", 100, "Runge-Kutta steps of the ODE likelihood.", flag_values=FLAGS)
_SEED = flags.DEFINE_integer("seed", 0, "Sample i uses seed SEED + i; the likelihood's noise is drawn from SEED.",
                             flag_values=FLAGS)
_BATCH = flags.DEFINE_integer("batch_size", 250, "Images per compiled call.", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "Also write the results to this .json file.", flag_values=FLAGS)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --out or --write_reference if it exists.",
                               flag_values=FLAGS)
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0, "CPU backend only: split the cores into this many XLA "
                                    "devices (0: one per core that divides the batch).", flag_values=FLAGS)


def metrics() -> list[str]:
  names = [m.strip() for m in _METRIC.value.split(",") if m.strip()]
  unknown = [m for m in names if m not in METRICS]
  if unknown or not names:
    raise ValueError(f"--metric={_METRIC.value!r}: unknown {unknown[0] if unknown else 'empty'}; choose from "
                     f"{', '.join(METRICS)}")
  return names


def check_flags() -> list[str]:
  """Everything that can be judged without the model; returns the metrics."""
  from jdiff import samplers  # pylint: disable=import-outside-toplevel
  from jdiff.metrics import inception  # pylint: disable=import-outside-toplevel
  names = metrics()
  if _NUM.value < 2 or _BATCH.value < 1 or _LIKELIHOOD_NUM.value < 0:
    raise ValueError(f"--num={_NUM.value} must be at least 2, --batch_size={_BATCH.value} at least 1 and "
                     f"--likelihood_num={_LIKELIHOOD_NUM.value} at least 0")
  if _SAMPLER.value is not None and _SAMPLER.value not in samplers.SAMPLERS:
    raise ValueError(f"unknown sampler {_SAMPLER.value!r}; choose one of {', '.join(samplers.SAMPLERS)}")
  if _SPACING.value is not None and _SPACING.value not in samplers.SPACINGS:
    raise ValueError(f"unknown spacing {_SPACING.value!r}; choose one of {', '.join(samplers.SPACINGS)}")
  if _STEPS.value is not None and _STEPS.value < 1 or _ODE_STEPS.value < 1 or _VLB_TIMESTEPS.value < 0:
    raise ValueError("--steps and --ode_steps must be at least 1, --vlb_timesteps at least 0")
  if {"fid", "kid"} & set(names) and not _INCEPTION.value:
    raise ValueError(f"--metric={_METRIC.value} needs the Inception weights: pass --inception PATH to pytorch-fid's "
                     f"weights ({inception.WEIGHTS_URL}), or use fd,kd (features trained on the model's dataset)")
  if _INCEPTION.value and not os.path.isfile(_INCEPTION.value):
    raise ValueError(f"--inception: {inception.missing_weights_message(_INCEPTION.value)}")
  if _REFERENCE.value and not os.path.isfile(_REFERENCE.value):
    raise ValueError(f"--reference={_REFERENCE.value!r} does not exist; write one with --write_reference")
  for flag, suffix in ((_OUT, ".json"), (_WRITE_REFERENCE, ".npz")):
    if flag.value and not flag.value.endswith(suffix):
      raise ValueError(f"--{flag.name}={flag.value!r} must end in {suffix}")
    if flag.value and os.path.exists(flag.value) and not _OVERWRITE.value:
      raise ValueError(f"--{flag.name}={flag.value!r} exists; choose another path or pass --overwrite")
  return names


def sampling_options() -> dict:
  return dict(sampler=_SAMPLER.value, steps=_STEPS.value, spacing=_SPACING.value, guidance_scale=_GUIDANCE.value,
              eta=_ETA.value)


def evaluate(pipe, names: list[str]) -> dict:
  """The metrics' values (and the kernel distances' std over subsets) for the loaded pipeline."""
  from jdiff.metrics import fid, inception, quality  # pylint: disable=import-outside-toplevel
  results = {}
  held_out = quality.real_split(pipe, _SPLIT.value)
  spaces = {}
  if {"fid", "kid"} & set(names):
    spaces["inception"] = inception.InceptionFeatures(inception.load_params(_INCEPTION.value))
  if {"fd", "kd"} & set(names):
    spaces["own"] = quality.own_features(pipe)
  if spaces:
    images, seconds = quality.generate_like(pipe, held_out, _NUM.value, seed=_SEED.value, batch_size=_BATCH.value,
                                            progress=runtime.progress_bar("sampling"), **sampling_options())
    results["seconds_per_image"] = seconds
  for space, (fd, kd) in (("inception", ("fid", "kid")), ("own", ("fd", "kd"))):
    if space not in spaces:
      continue
    network = spaces[space]
    reference = (fid.FeatureStats.load(_REFERENCE.value) if _REFERENCE.value else
                 fid.FeatureStats.of(network(quality.real_split(pipe, _REFERENCE_SPLIT.value).images), network.space))
    out = quality.distances(network(images), reference, network.space, kid=kd in names,
                            kid_subset_size=min(quality.KID_SUBSET_SIZE, _NUM.value, reference.count))
    results[fd] = out["fd"]
    if kd in names:
      results[kd], results[f"{kd}_std"] = out["kd"], out["kd_std"]
    results[f"{space}_features"] = network.name
  for name, method in (("bpd", "vlb"), ("ode_bpd", "ode")):
    if name in names:
      num = _LIKELIHOOD_NUM.value or len(held_out.images)
      bpd = quality.bits_per_dim(pipe, held_out, method, num=num, conditional=_CONDITIONAL.value, seed=_SEED.value,
                                 batch_size=_BATCH.value, progress=runtime.progress_bar(name),
                                 vlb_timesteps=_VLB_TIMESTEPS.value or None, vlb_variance=_VLB_VARIANCE.value,
                                 ode_steps=_ODE_STEPS.value)
      results[name], results[f"{name}_standard_error"] = float(bpd.mean()), float(bpd.std(ddof=1) / len(bpd) ** 0.5)
  return results


def write_reference(pipe) -> str:
  from jdiff.metrics import fid, inception, quality  # pylint: disable=import-outside-toplevel
  network = (inception.InceptionFeatures(inception.load_params(_INCEPTION.value)) if _INCEPTION.value
             else quality.own_features(pipe))
  images = quality.real_split(pipe, _REFERENCE_SPLIT.value).images
  fid.FeatureStats.of(network(images), network.space).save(_WRITE_REFERENCE.value)
  return (f"wrote the statistics of {len(images)} {_REFERENCE_SPLIT.value!r} images on {network.name} to "
          f"{_WRITE_REFERENCE.value}")


def report(results: dict, pipe) -> str:
  features = results.get("own_features", "")
  lines = [f"{_WORKDIR.value} checkpoint {pipe.step}:"]
  for name in METRICS:
    if name in results:
      spread = (f" ± {results[name + '_std']:.4g} (std over subsets)" if name + "_std" in results else
                f" ± {results[name + '_standard_error']:.3g} (standard error)" if name + "_standard_error" in results
                else "")
      lines.append(f"  {name}: {results[name]:.4g}{spread}  [{NAMES[name].format(features=features)}]")
  return "\n".join(lines)


def main(argv):
  runtime.start_cli(argv)
  try:
    names = check_flags()
  except ValueError as e:
    runtime.fail(PROGRAM, e)
  runtime.tune_cpu_process(cpu_devices=_CPU_DEVICES.value, micro_batch=min(_NUM.value, _BATCH.value))
  import jdiff  # pylint: disable=import-outside-toplevel
  from jdiff.checkpoint import CheckpointError  # pylint: disable=import-outside-toplevel
  from jdiff.config import ConfigError  # pylint: disable=import-outside-toplevel
  from jdiff.data import DatasetUnavailableError  # pylint: disable=import-outside-toplevel
  try:
    pipe = jdiff.load(_WORKDIR.value, step=_CHECKPOINT.value)
    if _WRITE_REFERENCE.value:
      print(write_reference(pipe))
      return
    results = evaluate(pipe, names)
  except (ValueError, TypeError, FileNotFoundError, ImportError, ConfigError, CheckpointError,
          DatasetUnavailableError) as e:
    runtime.fail(PROGRAM, e)
  print(report(results, pipe))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(dict(results, workdir=_WORKDIR.value, step=pipe.step, metric=names, num=_NUM.value,
                     split=_SPLIT.value, **{k: v for k, v in sampling_options().items() if v is not None}), f, indent=2)


def run(argv: list[str] | None = None):
  """The console script's entry point (argv: the command line, default sys.argv); exits with main's status."""
  app.run(main, argv=argv, flags_parser=lambda args: runtime.parse_flags(args, FLAGS))


if __name__ == "__main__":
  run()
