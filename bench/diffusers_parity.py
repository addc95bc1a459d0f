"""jdiff against diffusers and transformers on the committed tiny Stable Diffusion fixtures (tests/fixtures/diffusers,
written by tests/fixtures/make_diffusers_fixtures.py): prints the largest errors as Markdown tables. No torch needed.

  python bench/diffusers_parity.py

Components: max |jdiff - reference| / max |reference| in fp32. Text to image: max |jdiff - diffusers| of the final
images in [0, 1], 10 steps at guidance 7.5 from the same initial latents, per scheduler config: the ones whose
directory's shipped one (PNDM, steps_offset 1, set_alpha_to_one false) as generate reads it by default and read
as each other class, and configs with jdiff's own conventions.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jdiff  # noqa: E402
from jdiff import schedulers  # noqa: E402
from jdiff.interop import configs, names, pretrained  # noqa: E402
from jdiff.models.text import TextEncoder  # noqa: E402
from jdiff.models.unet import UNet  # noqa: E402
from jdiff.models.vae import AutoencoderKL  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "diffusers")
REFS = np.load(os.path.join(FIXTURES, "references.npz"))
LABELS = {"sd1": "SD-1-like (conv projections, 2 heads, quick_gelu, eps)",
          "sd2": "SD-2-like (linear projections, heads 2/4/4, upcast, gelu, v)",
          "inpaint": "SD-1-like, 9 input channels", "export_class": "jdiff class U-Net, exported",
          "export_text": "jdiff text U-Net, text encoder and VAE, exported"}


def nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)


def rel(got, want) -> float:
  return float(np.abs(np.asarray(got).transpose(0, 3, 1, 2) - want).max() / np.abs(want).max()) if np.ndim(got) == 4 \
      else float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def components(kind, unet_config, unet_params, text=None, text_params=None, vae=None, vae_params=None, labels=None):
  rows = []
  if text is not None:
    hidden = jax.jit(lambda p, i: TextEncoder(text).apply({"params": p}, i))(text_params, REFS[f"{kind}/text/ids"])
    rows.append(("text encoder hidden states", rel(hidden, REFS[f"{kind}/text/hidden"])))
  context = REFS.get(f"{kind}/unet/context", REFS.get(f"{kind}/text/hidden"))
  run = jax.jit(lambda p, x, t, c, l: UNet(unet_config).apply({"params": p}, x, t, l, context=c))
  out = run(unet_params, nhwc(REFS[f"{kind}/unet/x"]), REFS[f"{kind}/unet/t"],
            context if unet_config.context_dim else None, labels)
  rows.append(("U-Net noise prediction", rel(out, REFS[f"{kind}/unet/out"])))
  if vae is not None:
    def coded(p, images, latents):
      model = AutoencoderKL(vae)
      posterior = model.apply({"params": p}, images, method=AutoencoderKL.encode)
      return posterior.mean, posterior.logvar, model.apply({"params": p}, latents, method=AutoencoderKL.decode)
    mean, logvar, decoded = jax.jit(coded)(vae_params, nhwc(REFS[f"{kind}/vae/images"]), nhwc(REFS[f"{kind}/vae/mean"]))
    rows += [("VAE encode (posterior mean)", rel(mean, REFS[f"{kind}/vae/mean"])),
             ("VAE encode (log-variance)", rel(logvar, REFS[f"{kind}/vae/logvar"])),
             ("VAE decode", rel(decoded, REFS[f"{kind}/vae/decoded"]))]
  return [(name, LABELS[kind], error) for name, error in rows]


def main():
  rows, runs = [], []
  for kind in ("sd1", "sd2"):
    pipe = jdiff.load(os.path.join(FIXTURES, kind))
    rows += components(kind, pipe.config.model, pipe.params["unet"], pipe.model.text, pipe.params["text_encoder"],
                       pipe.codec.vae, pipe.codec.params)
    for case in ("sd_plms", "sd_ddim", "sd_euler", "sd_dpmpp_2m", "jdiff_ddim", "jdiff_euler", "jdiff_dpmpp_2m"):
      scheduler = json.loads(str(REFS[f"{kind}/pipeline/{case}/scheduler"]))
      if case.startswith("sd_"):  # the directory's own config, read as this sampler's class
        options = {} if case == "sd_plms" else dict(sampler=case.removeprefix("sd_"))
      else:
        _, options = schedulers.sampler_options_from_diffusers(scheduler)
        options = dict(sampler=options["sampler"], spacing=options["spacing"])
      samples = pipe.generate(list(map(str, REFS[f"{kind}/pipeline/prompts"])),
                              negative_prompt=str(REFS[f"{kind}/pipeline/negative"]),
                              latents=nhwc(REFS[f"{kind}/pipeline/latents"]), steps=10, guidance_scale=7.5, **options)
      images = np.clip(np.asarray(pipe.codec.decode(samples.latents)) / 2 + 0.5, 0, 1)
      error = float(np.abs(images - REFS[f"{kind}/pipeline/{case}/images"]).max())
      conventions = {k: scheduler.get(k) for k in ("timestep_spacing", "steps_offset", "set_alpha_to_one")
                     if k in scheduler}
      runs.append((kind, scheduler["_class_name"], json.dumps(conventions), options.get("sampler", "plms"), error))
  path = os.path.join(FIXTURES, "inpaint_unet")
  config = configs.unet_config(pretrained.read_config(path, "unet"))
  params = pretrained.read_params(path, "unet", pretrained.abstract_unet_params(config),
                                  names.unet_module_name(2, True), "float32", None, jax.devices()[0])
  rows += components("inpaint", config, params)
  pipe = jdiff.load(os.path.join(FIXTURES, "export_class"))
  rows += components("export_class", pipe.config.model, pipe.params,
                     labels=REFS["export_class/unet/labels"].astype(np.int32))
  pipe = jdiff.load(os.path.join(FIXTURES, "export_text"))
  rows += components("export_text", pipe.config.model, pipe.params["unet"], pipe.model.text,
                     pipe.params["text_encoder"], pipe.codec.vae, pipe.codec.params)
  print("| component | configuration | max relative error |\n|---|---|---|")
  for name, label, error in rows:
    print(f"| {name} | {label} | {error:.1e} |")
  print("\n| fixture | diffusers scheduler | its conventions | jdiff sampler | max image error |")
  print("|---|---|---|---|---|")
  for kind, scheduler, conventions, sampler, error in runs:
    print(f"| {kind} | {scheduler} | {conventions} | {sampler} | {error:.1e} |")


if __name__ == "__main__":
  main()
