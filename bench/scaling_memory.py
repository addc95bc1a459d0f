"""Per-device memory of the train step under each scaling knob, from XLA's compiled memory analysis.

  python bench/scaling_memory.py --config configs/cifar10.py --devices 8
  python bench/scaling_memory.py --config configs/default.py --devices 8 --batch 64
  python bench/scaling_memory.py --config configs/cifar10.py --real_devices --layouts data,remat,bf16,bf16+remat

Compiles (does not run) the jitted train step on `--devices` fake CPU devices for each layout and prints a
Markdown table: the state (params, EMA, Adam moments) held per device, and XLA's temporary buffers per device
(activations kept for the backward pass, gradients, collectives' buffers). Memory numbers, not speed: the
fake CPU devices share one CPU, so their step times say nothing about a real mesh. With --real_devices the
step is compiled for the machine's own devices (a GPU, say), whose compiler's memory plan can differ from the CPU's.
"""
import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def apply_knob(raw, knob: str) -> None:
  if knob.startswith("fsdp"):
    raw.parallel.fsdp = int(knob[4:])
  elif knob.startswith("accum"):
    raw.training.grad_accum_steps = int(knob[5:])
  elif knob == "remat":
    raw.training.remat = True
  elif knob == "bf16":
    raw.model.dtype = "bfloat16"
  elif knob != "data":
    raise SystemExit(f"--layouts: unknown knob {knob!r} (data, fsdpN, accumN, remat, bf16)")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/default.py")
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--batch", type=int, default=None, help="global batch (default: the config's)")
  parser.add_argument("--layouts", default="data,fsdp2,fsdp8,accum4,remat,bf16",
                      help="comma-separated: data, fsdpN, accumN, remat, bf16, or several joined by + "
                           "(e.g. bf16+remat), each on top of the config")
  parser.add_argument("--real_devices", action="store_true",
                      help="compile for this machine's devices instead of --devices fake CPU ones")
  args = parser.parse_args()
  if not args.real_devices:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

  import importlib.util

  import jax
  from jdiff import sharding
  from jdiff.build import param_count
  from jdiff.config import parse_config
  from jdiff.schedules import make_schedule
  from jdiff.train.step import abstract_train_state, train_step

  spec = importlib.util.spec_from_file_location("config_module", args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)

  print(f"| {os.path.basename(args.config)} layout | mesh (data x fsdp) | state / device (MiB) | "
        "XLA temporaries / device (MiB) |")
  print("|---|---|---|---|")
  for layout in args.layouts.split(","):
    raw = module.get_config()
    if args.batch:
      raw.training.batch_size = args.batch
    for knob in layout.split("+"):
      apply_knob(raw, knob)
    config = parse_config(raw)
    mesh = sharding.make_mesh(fsdp=config.parallel.fsdp)
    abstract = abstract_train_state(config)
    state_sharding = sharding.state_sharding(abstract, mesh)
    mc, batch_size = config.model, config.training.batch_size
    batch = {"image": jax.ShapeDtypeStruct((batch_size, mc.image_size, mc.image_size, mc.in_channels), "float32",
                                           sharding=sharding.batch_sharded(mesh)),
             "label": jax.ShapeDtypeStruct((batch_size,), "int32", sharding=sharding.batch_sharded(mesh))}
    repl = sharding.replicated(mesh)
    step = jax.jit(functools.partial(train_step, config=config), donate_argnums=0,
                   in_shardings=(state_sharding, sharding.batch_sharded(mesh), repl, repl),
                   out_shardings=(state_sharding, repl))
    schedule = make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
    compiled = step.lower(sharding.abstract_with_sharding(abstract, state_sharding), batch, jax.random.key(0),
                          schedule).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    state_bytes = sharding.per_device_bytes(abstract, state_sharding)
    print(f"| {layout} (batch {batch_size}, {param_count(abstract.params) / 1e6:.1f}M params) | "
          f"{mesh.shape['data']} x {mesh.shape['fsdp']} | {state_bytes / 2**20:.1f} | {temp / 2**20:.1f} |",
          flush=True)


if __name__ == "__main__":
  main()
