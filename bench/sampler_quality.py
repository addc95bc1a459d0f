"""Samplers x steps x guidance on a trained model: the Fréchet and kernel distances of its samples to the training
split, on the feature network trained on the model's own dataset, next to the time per image.

  python bench/sampler_quality.py --workdir runs/default --samplers ddim,dpmpp_2m --steps 5,10,20,50 --guidance_scale 3
  python bench/sampler_quality.py --workdir runs/shapes --num 500 --guidance_scale 1,3

Samples are conditioned like the held-out split (--split: its labels or captions, image i like real image i) and
compared with the statistics of the training split; the held-out images themselves give the first row, two real
sets of this size to compare with (a model's samples can match the training split more closely than held-out images
do). Every row uses the same seeds, so rows differ by the sampler alone. KD is the kernel distance (unbiased
polynomial-kernel MMD^2, x 1000) with its std over 100 subsets. ms/image is the wall time of generating the row's
images after compiling, divided by their number; the ratio column divides it by DDIM's at the same steps and
guidance in the same run. Prints a Markdown table; --out appends each row as JSON.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jdiff  # noqa: E402
from jdiff.metrics import fid, quality  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--checkpoint", type=int, default=None, help="checkpoint step (default: the latest)")
  parser.add_argument("--samplers", default="ddim,ddpm,heun,dpmpp_2m,dpmpp_2m_sde,unipc")
  parser.add_argument("--steps", default="5,10,20,50")
  parser.add_argument("--guidance_scale", default="3")
  parser.add_argument("--spacing", default=None, help="timestep spacing, karras or flow (default: the config's)")
  parser.add_argument("--num", type=int, default=None, help="samples per row (default: the held-out split's size)")
  parser.add_argument("--split", default="test", help="held-out split: conditions and the first row")
  parser.add_argument("--reference_split", default="train")
  parser.add_argument("--seed", type=int, default=10_000, help="first seed (training's sample grids use 0..)")
  parser.add_argument("--batch_size", type=int, default=250)
  parser.add_argument("--out", default=None, help="a .jsonl file to append each row to")
  args = parser.parse_args()

  pipe = jdiff.load(args.workdir, step=args.checkpoint)
  network = quality.own_features(pipe)
  held_out = quality.real_split(pipe, args.split)
  reference = fid.FeatureStats.of(network(quality.real_split(pipe, args.reference_split).images), network.space)
  num = args.num or len(held_out.images)
  kid_size = min(num, quality.KID_SUBSET_SIZE)
  print(f"{args.workdir} checkpoint {pipe.step}: {num} samples per row, Fréchet distance (FD) and kernel distance "
        f"(KD x 1000) on {network.name} (held-out accuracy {network.accuracy}) against {len(reference.features)} "
        f"'{args.reference_split}' images\n")
  print("| sampler | steps | guidance | FD | KD x 1000 | ms/image | time / DDIM's |")
  print("|---|---|---|---|---|---|---|")
  floor = quality.distances(network(held_out.images[:num]), reference, network.space, kid_subset_size=kid_size)
  print(f"| real '{args.split}' images | - | - | {floor['fd']:.2f} | {1e3 * floor['kd']:.2f} ± "
        f"{1e3 * floor['kd_std']:.2f} | - | - |", flush=True)
  ddim_time = {}
  for steps in map(int, args.steps.split(",")):
    for guidance in map(float, args.guidance_scale.split(",")):
      for sampler in args.samplers.split(","):
        images, seconds = quality.generate_like(pipe, held_out, num, seed=args.seed, batch_size=args.batch_size,
                                                sampler=sampler, steps=steps, guidance_scale=guidance,
                                                spacing=args.spacing)
        result = quality.distances(network(images), reference, network.space, kid_subset_size=kid_size)
        ddim_time.setdefault((steps, guidance), seconds if sampler == "ddim" else None)
        base = ddim_time[(steps, guidance)]
        ratio = f"{seconds / base:.2f}" if base else "-"
        print(f"| {sampler} | {steps} | {guidance:g} | {result['fd']:.2f} | {1e3 * result['kd']:.2f} ± "
              f"{1e3 * result['kd_std']:.2f} | {1e3 * seconds:.1f} | {ratio} |", flush=True)
        if args.out:
          with open(args.out, "a") as f:
            f.write(json.dumps(dict(result, workdir=args.workdir, step=pipe.step, sampler=sampler, steps=steps,
                                    guidance=guidance, num=num, seconds_per_image=seconds, floor=floor)) + "\n")


if __name__ == "__main__":
  main()
