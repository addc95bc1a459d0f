"""LMS's accuracy on an exact denoiser: jdiff's and diffusers' LMSDiscreteScheduler against the probability-flow
ODE's closed-form solution at sigma 0. Gaussian data in 3 dimensions (tests/test_samplers.py's), Stable
Diffusion's scaled_linear schedule, 256 samples; prints the RMS error per step count. Needs torch and diffusers.

  python bench/lms_accuracy.py
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import diffusers  # noqa: E402
import jax  # noqa: E402
import torch  # noqa: E402

from jdiff import samplers, schedules  # noqa: E402
from tests import exact_denoisers as ed  # noqa: E402
from tests.test_samplers import COV, MEAN  # noqa: E402

STEPS = (10, 25, 50)
SCHEDULE = schedules.make_schedule("scaled_linear", 1000)
NOISE = np.asarray(jax.random.normal(jax.random.key(6), (256, 3)), np.float64)


def exact(x, sigma_from):
  return ed.gaussian_ode_solution(x, sigma_from=sigma_from, sigma_to=0.0, mean=MEAN, cov=COV)


def rms(a, b):
  return float(np.sqrt(np.mean((np.asarray(a, np.float64) - b) ** 2)))


def jdiff_error(steps, spacing):
  model = ed.as_model_fn(lambda x, sigma, c: ed.gaussian_x0(x, sigma, mean=MEAN, cov=COV), SCHEDULE, "eps")
  out = samplers.sample(model, SCHEDULE, NOISE.astype(np.float32), sampler="lms", steps=steps, spacing=spacing,
                        clip_x0=False)
  sigma_max = float(samplers.noise_levels(SCHEDULE, steps=steps, spacing=spacing)[0][0])
  return rms(out, exact(NOISE * np.sqrt(1 + sigma_max**2), sigma_max))


def diffusers_error(steps):
  """Diffusers' LMS as Stable Diffusion's pipeline drives it; the model is the exact denoiser at its sigma."""
  scheduler = diffusers.LMSDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
  scheduler.set_timesteps(steps)
  sigmas = scheduler.sigmas.double().numpy()
  x = torch.tensor(NOISE) * float(scheduler.init_noise_sigma)
  start = x.numpy().copy()
  for i, t in enumerate(scheduler.timesteps):
    x_in = scheduler.scale_model_input(x, t).double().numpy()
    x_ve = x_in * np.sqrt(1 + sigmas[i] ** 2)
    eps = (x_ve - ed.gaussian_x0(x_ve, np.full((len(x_ve), 1), sigmas[i]), mean=MEAN, cov=COV)) / sigmas[i]
    x = scheduler.step(torch.tensor(eps), t, x).prev_sample
  return rms(x.numpy(), exact(start, sigmas[0]))


def main():
  print("RMS error against the ODE's solution at sigma 0 (lower is better)")
  print(f"{'steps':>5} {'jdiff linspace':>15} {'jdiff trailing':>15} {'jdiff karras':>13} {'diffusers':>10}")
  for n in STEPS:
    errors = [jdiff_error(n, s) for s in ("linspace", "trailing", "karras")] + [diffusers_error(n)]
    print(f"{n:5d} " + " ".join(f"{e:{w}.2e}" for e, w in zip(errors, (15, 15, 13, 10))))


if __name__ == "__main__":
  main()
