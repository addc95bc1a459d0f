"""jdiff's U-Net against the same net in diffusers (UNet2DModel, PyTorch), side by side on one device.

  pip install -e '.[bench]'        # torch 2.13 (CPU wheel) and diffusers, for this script only
  python bench/unet_vs_diffusers.py --preset quick   # ~2 min on 2 CPU cores
  python bench/unet_vs_diffusers.py                  # the 6.5M-parameter net at batch 32

Builds a jdiff UNetConfig and the equivalent UNet2DModel, asserts equal parameter counts, then measures, with the
two frameworks interleaved (A, B, A, B, ...) so that load from other processes hits both alike:
  - the training step at equal batch (eps-MSE loss, global-norm clipping, AdamW, EMA; median after warm-up);
  - the first step (jdiff: trace + XLA compile + run; diffusers: eager first run);
  - 50-step DDIM sampling of a batch (jdiff: one compiled lax.scan; diffusers: its DDIMScheduler loop);
  - achieved FLOP/s (jdiff: XLA's cost analysis of the step lowered for the CPU; torch: its FlopCounterMode)
    against the measured matmul peak (fp32, or bf16 with --bf16) of the same framework on the same device.
On a GPU both sides use TF32 for fp32 matmuls and convolutions (JAX's default there; --fp32_matmuls for full fp32).
Runs on the first GPU of each framework when there is one, else on the CPU. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

from jdiff import samplers, sharding  # noqa: E402
from jdiff.build import make_model, param_count  # noqa: E402
from jdiff.cli import runtime  # noqa: E402
from jdiff.config import parse_config  # noqa: E402
from jdiff.configs import default as default_config  # noqa: E402
from jdiff.generate import spread_batch, unet_model_fn  # noqa: E402
from jdiff.models.unet import UNetConfig  # noqa: E402
from jdiff.schedules import make_schedule  # noqa: E402
from jdiff.train.step import abstract_train_state, create_train_state, train_step  # noqa: E402

PRESETS = {
    # 6.49M parameters, 32x32x3, four levels, attention at 16x16 and in the middle.
    "medium": dict(image_size=32, in_channels=3, channels=64, channel_mults="1,2,2,2", num_res_blocks=1,
                  attention_resolutions="16", norm_groups=32, batch=32),
    # jdiff's default digits net (1.19M parameters, 16x16x1): a quick run.
    "quick": dict(image_size=16, in_channels=1, channels=32, channel_mults="1,2,2", num_res_blocks=1,
                  attention_resolutions="8", norm_groups=8, batch=32),
    # The DDPM CIFAR-10 layout (38.3M parameters with FiLM scale-shift) at batch 128: a GPU-sized step.
    "large": dict(image_size=32, in_channels=3, channels=128, channel_mults="1,2,2,2", num_res_blocks=2,
                  attention_resolutions="16", norm_groups=32, batch=128),
}


def load() -> str:
  return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def torch_device() -> torch.device:
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def torch_sync(device: torch.device) -> None:
  if device.type == "cuda":
    torch.cuda.synchronize()


def timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


# The two nets.

def diffusers_unet(cfg: UNetConfig):
  """UNet2DModel with jdiff's layout: same widths, blocks, attention levels, groups, FiLM and class embedding."""
  from diffusers import UNet2DModel
  attn = lambda res: res in cfg.attention_resolutions
  if cfg.num_heads != 1:
    raise SystemExit("--num_heads: only 1 maps onto UNet2DModel (its head width is global, jdiff's per level)")
  return UNet2DModel(
      sample_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=cfg.output_channels,
      block_out_channels=cfg.level_channels, layers_per_block=cfg.num_res_blocks,
      down_block_types=tuple("AttnDownBlock2D" if attn(r) else "DownBlock2D" for r in cfg.resolutions),
      up_block_types=tuple("AttnUpBlock2D" if attn(r) else "UpBlock2D" for r in reversed(cfg.resolutions)),
      attention_head_dim=None, norm_num_groups=cfg.norm_groups, attn_norm_num_groups=cfg.norm_groups,
      resnet_time_scale_shift="scale_shift" if cfg.scale_shift else "default", dropout=cfg.dropout,
      num_class_embeds=cfg.num_classes + 1 if cfg.num_classes else None)


def jdiff_config(args):
  raw = default_config.get_config()
  raw.data.image_size = args.image_size
  raw.model.update(image_size=args.image_size, in_channels=args.in_channels, channels=args.channels,
                   channel_mults=args.channel_mults, num_res_blocks=args.num_res_blocks,
                   attention_resolutions=args.attention_resolutions, num_heads=1, dropout=0.0,
                   num_classes=args.num_classes, norm_groups=args.norm_groups,
                   dtype="bfloat16" if args.bf16 else "float32")
  raw.diffusion.update(schedule="linear", prediction="eps", label_dropout=0.0)
  raw.sampling.update(guidance_scale=1.0)
  raw.training.update(batch_size=args.batch, warmup_steps=0, weight_decay=1e-2, grad_clip=1.0)
  return parse_config(raw)


# Matmul peaks.

def jax_matmul_peak(n: int, dtype, repeats: int = 5) -> float:
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  return 2 * n**3 / min(timed(lambda: dot(a, b).block_until_ready()) for _ in range(repeats))


def torch_matmul_peak(n: int, device, dtype, repeats: int = 5) -> float:
  a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
  torch.mm(a, b)
  torch_sync(device)
  def run():
    torch.mm(a, b)
    torch_sync(device)
  return 2 * n**3 / min(timed(run) for _ in range(repeats))


# Training steps.

def cpu_flops(fn, *args) -> float:
  """XLA's FLOP count of fn(*args) lowered for the CPU, whatever the device: the same count on every platform (a
  GPU lowering has no cost analysis, and its compiled program hides convolutions in cuDNN calls)."""
  cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu), args)
  analysis = jax.jit(fn).lower(*abstract).cost_analysis()
  return float(analysis["flops"]) if analysis else float("nan")


class JdiffTrainer:
  """train.py's step: jitted over the (data, fsdp) mesh of every device, the batch split over it."""

  def __init__(self, config, seed: int = 0):
    self.config = config
    mc = config.model
    self.mesh = sharding.make_mesh(fsdp=config.parallel.fsdp)
    state_sharding = sharding.state_sharding(abstract_train_state(config), self.mesh)
    batch_sharding, repl = sharding.batch_sharded(self.mesh), sharding.replicated(self.mesh)
    self.schedule = make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
    self.state = jax.jit(functools.partial(create_train_state, config),
                         out_shardings=state_sharding)(jax.random.key(seed))
    shape = (config.training.batch_size, mc.image_size, mc.image_size, mc.in_channels)
    self.batch = jax.device_put({"image": jax.random.uniform(jax.random.key(1), shape, jnp.float32, -1, 1),
                                 "label": jnp.zeros(shape[:1], jnp.int32)}, batch_sharding)
    self.rng = jax.random.key(2)
    self.params = param_count(self.state.params)
    step = jax.jit(functools.partial(train_step, config=config), donate_argnums=0,
                   in_shardings=(state_sharding, batch_sharding, repl, repl), out_shardings=(state_sharding, repl))
    start = time.perf_counter()
    self.step_fn = step.lower(self.state, self.batch, self.rng, self.schedule).compile()
    self.compile_s = time.perf_counter() - start
    self.flops = cpu_flops(functools.partial(train_step, config=config), self.state, self.batch, self.rng,
                           self.schedule)
    self.first_s = self.compile_s + self.step()

  def step(self) -> float:
    def run():
      self.state, metrics = self.step_fn(self.state, self.batch, self.rng, self.schedule)
      jax.block_until_ready(metrics)
    return timed(run)


class TorchTrainer:
  def __init__(self, config, device, channels_last: bool, compile_model: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    mc, tc = config.model, config.training
    self.device = device
    self.model = diffusers_unet(mc).to(device)
    if channels_last:
      self.model = self.model.to(memory_format=torch.channels_last)
    self.forward = torch.compile(self.model) if compile_model else self.model
    # jdiff's model.dtype=bfloat16 keeps fp32 params and computes in bf16: torch's autocast is the same recipe.
    self.autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=mc.dtype == "bfloat16")
    self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
    self.params = sum(p.numel() for p in self.model.parameters())
    self.ema = [p.detach().clone() for p in self.model.parameters()]
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=tc.learning_rate, weight_decay=tc.weight_decay)
    self.clip = tc.grad_clip
    self.ema_decay = tc.ema_decay
    betas = torch.linspace(1e-4, 0.02, config.diffusion.num_timesteps, dtype=torch.float64)
    self.alpha_bar = torch.cumprod(1 - betas, 0).float().to(device)
    shape = (tc.batch_size, mc.in_channels, mc.image_size, mc.image_size)
    self.x0 = (torch.rand(shape, device=device) * 2 - 1).contiguous(memory_format=self.memory_format)
    self.labels = torch.zeros(shape[0], dtype=torch.long, device=device) if mc.num_classes else None
    self.first_s = self.step()

  def loss(self) -> torch.Tensor:
    t = torch.randint(0, len(self.alpha_bar), (self.x0.shape[0],), device=self.device)
    noise = torch.randn_like(self.x0)
    ab = self.alpha_bar[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * self.x0 + (1 - ab).sqrt() * noise
    with self.autocast:
      pred = self.forward(x_t, t, class_labels=self.labels).sample
    return torch.nn.functional.mse_loss(pred.float(), noise)

  def update(self) -> None:
    self.opt.zero_grad(set_to_none=True)
    self.loss().backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
    self.opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(self.ema, list(self.model.parameters()), 1 - self.ema_decay)

  def step(self) -> float:
    def run():
      self.update()
      torch_sync(self.device)
    return timed(run)

  def flops(self) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    forward, self.forward = self.forward, self.model  # counted eagerly: a compiled graph hides its operations
    with counter:
      self.update()
    self.forward = forward
    torch_sync(self.device)
    return float(counter.get_total_flops())


# Sampling.

def jdiff_sampler(trainer: JdiffTrainer, batch: int, steps: int):
  mc = trainer.config.model
  # The batch split over the devices holding the params, as in train.py's sample grids and jdiff.load.
  params = sharding.local_replica(trainer.state.params, trainer.mesh)
  model_fn = unet_model_fn(make_model(trainer.config), params)
  noise = jax.random.normal(jax.random.key(3), (batch, mc.image_size, mc.image_size, mc.in_channels))
  (noise,) = spread_batch(params, noise)
  labels = jnp.full((batch,), mc.num_classes, jnp.int32) if mc.num_classes else None
  return lambda: samplers.sample(model_fn, trainer.schedule, noise, labels, sampler="ddim", steps=steps,
                                 prediction="eps", spacing="leading").block_until_ready()


def torch_sampler(trainer: TorchTrainer, batch: int, steps: int):
  from diffusers import DDIMScheduler
  scheduler = DDIMScheduler(num_train_timesteps=len(trainer.alpha_bar), beta_schedule="linear",
                            timestep_spacing="leading", clip_sample=True)
  mc = trainer.model.config
  labels = None if trainer.labels is None else torch.full((batch,), mc.num_class_embeds - 1, device=trainer.device)

  @torch.inference_mode()
  def run():
    scheduler.set_timesteps(steps)
    x = torch.randn(batch, mc.in_channels, mc.sample_size, mc.sample_size, device=trainer.device)
    x = x.contiguous(memory_format=trainer.memory_format)
    for t in scheduler.timesteps:
      with trainer.autocast:
        eps = trainer.forward(x, t, class_labels=labels).sample
      x = scheduler.step(eps.float(), t, x, eta=0.0).prev_sample
    torch_sync(trainer.device)
  return run


def interleaved(fn_a, fn_b, repeats: int, pause_s: float) -> tuple[list[float], list[float]]:
  """A, B, A, B, ...; each call after `pause_s` of rest, so that the other framework's worker threads, which
  spin for a while after their last task (OpenMP's and Eigen's both do), have gone to sleep and take no core."""
  times_a, times_b = [], []
  for _ in range(repeats):
    time.sleep(pause_s)
    times_a.append(fn_a())
    time.sleep(pause_s)
    times_b.append(fn_b())
  return times_a, times_b


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", choices=sorted(PRESETS), default="medium",
                      help="net and batch; the flags below override single fields")
  for name, kind in [("image_size", int), ("in_channels", int), ("channels", int), ("channel_mults", str),
                     ("num_res_blocks", int), ("attention_resolutions", str), ("norm_groups", int), ("batch", int)]:
    parser.add_argument(f"--{name}", type=kind)
  parser.add_argument("--num_classes", type=int, default=0, help="0: unconditional; else a class embedding")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each after the first")
  parser.add_argument("--repeats", type=int, default=7, help="timed training steps of each (median)")
  parser.add_argument("--sample_batch", type=int, default=8)
  parser.add_argument("--sample_steps", type=int, default=50)
  parser.add_argument("--sample_repeats", type=int, default=2, help="timed sampling runs of each; 0 skips")
  parser.add_argument("--matmul_size", type=int, default=0, help="matmul peak size; 0: 2048 on CPU, 8192 on GPU")
  parser.add_argument("--threads", type=int, default=0,
                      help="pin the process to this many CPU cores and torch to as many threads (0: all)")
  parser.add_argument("--pause", type=float, default=1.0,
                      help="seconds of rest before each timed call (lets the other side's threads go idle)")
  parser.add_argument("--cpu_devices", type=int, default=0,
                      help="jdiff on the CPU: XLA devices to split the cores into, as train.py's --cpu_devices "
                           "(0: one per core dividing the batch; 1: one device)")
  parser.add_argument("--nokeep_host_memory", action="store_true",
                      help="skip train.py's host-memory tuning (jdiff/cli/host_memory.py; both frameworks get it)")
  parser.add_argument("--torch_channels_last", action="store_true", help="run diffusers in NHWC memory format")
  parser.add_argument("--torch_compile", action="store_true", help="wrap diffusers' net in torch.compile")
  parser.add_argument("--bf16", action="store_true",
                      help="bf16 compute with fp32 params on both sides (jdiff model.dtype, torch autocast)")
  parser.add_argument("--fp32_matmuls", action="store_true",
                      help="on GPU, full fp32 matmuls and convolutions on both sides (default: TF32 on both, "
                           "JAX's default there)")
  args = parser.parse_args()
  for name, value in PRESETS[args.preset].items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  args.channel_mults = tuple(int(m) for m in args.channel_mults.split(","))
  args.attention_resolutions = tuple(int(r) for r in args.attention_resolutions.split(",") if r)
  return args


def main():
  args = parse_args()
  if args.threads:  # before JAX's and torch's thread pools exist, so both size themselves to the pinned cores
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
    torch.set_num_threads(args.threads)
  load_before = load()
  config = jdiff_config(args)
  # What train.py does on the CPU, before JAX starts its backends (the malloc tuning serves both frameworks).
  runtime.tune_cpu_process(cpu_devices=args.cpu_devices, micro_batch=args.batch,
                           keep_host_memory=not args.nokeep_host_memory)
  device = torch_device()
  on_gpu = device.type == "cuda"
  if on_gpu:  # the same matmul precision on both sides: TF32 is JAX's default for fp32 on NVIDIA GPUs
    jax.config.update("jax_default_matmul_precision", "highest" if args.fp32_matmuls else "default")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not args.fp32_matmuls
  n = args.matmul_size or (8192 if on_gpu else 2048)
  print(f"# jdiff vs diffusers: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}, "
        f"torch {torch.__version__} on {device} "
        f"({torch.get_num_threads()} threads)", flush=True)
  print(f"load before: {load_before}", flush=True)
  jax_peak = jax_matmul_peak(n, jnp.bfloat16 if args.bf16 else jnp.float32)
  torch_peak = torch_matmul_peak(n, device, torch.bfloat16 if args.bf16 else torch.float32)

  jd = JdiffTrainer(config)
  th = TorchTrainer(config, device, args.torch_channels_last, args.torch_compile)
  print(f"net: {config.model}\nparameters: jdiff {jd.params:,}, diffusers {th.params:,}", flush=True)
  if jd.params != th.params:
    raise SystemExit(f"parameter counts differ: jdiff {jd.params:,} vs diffusers {th.params:,}")
  torch_flops = th.flops()
  interleaved(jd.step, th.step, args.warmup, args.pause)
  jd_times, th_times = interleaved(jd.step, th.step, args.repeats, args.pause)
  jd_step, th_step = statistics.median(jd_times), statistics.median(th_times)

  rows = [("training step, median (s)", f"{jd_step:.3f}", f"{th_step:.3f}", f"{th_step / jd_step:.2f}x"),
          ("training step, min / max (s)", f"{min(jd_times):.3f} / {max(jd_times):.3f}",
           f"{min(th_times):.3f} / {max(th_times):.3f}", ""),
          ("first step incl. compile (s)", f"{jd.first_s:.2f} (compile {jd.compile_s:.2f})", f"{th.first_s:.2f}",
           "")]
  if args.sample_repeats:
    jd_sample, th_sample = (jdiff_sampler(jd, args.sample_batch, args.sample_steps),
                            torch_sampler(th, args.sample_batch, args.sample_steps))
    jd_first = timed(jd_sample)
    th_first = timed(th_sample)
    jd_s, th_s = map(statistics.median, interleaved(lambda: timed(jd_sample), lambda: timed(th_sample),
                                                   args.sample_repeats, args.pause))
    rows += [(f"{args.sample_steps}-step DDIM, batch {args.sample_batch} (s)", f"{jd_s:.2f}", f"{th_s:.2f}",
              f"{th_s / jd_s:.2f}x"),
             ("first sampling call incl. compile (s)", f"{jd_first:.2f}", f"{th_first:.2f}", "")]
  jd_rate, th_rate = jd.flops / jd_step, torch_flops / th_step
  rows += [("GFLOP per step (XLA cost analysis / torch FlopCounter)", f"{jd.flops / 1e9:.1f}",
            f"{torch_flops / 1e9:.1f}", ""),
           ("achieved GFLOP/s", f"{jd_rate / 1e9:.1f}", f"{th_rate / 1e9:.1f}", ""),
           (f"{'bf16' if args.bf16 else 'fp32'} matmul peak {n}x{n} (GFLOP/s)", f"{jax_peak / 1e9:.1f}",
            f"{torch_peak / 1e9:.1f}", ""),
           ("achieved / own matmul peak" + (" (MFU)" if on_gpu else ""), f"{jd_rate / jax_peak:.0%}",
            f"{th_rate / torch_peak:.0%}", "")]
  print(f"\n| batch {args.batch}, {jd.params / 1e6:.2f}M parameters | jdiff | diffusers | jdiff speed-up |")
  print("|---|---|---|---|")
  for row in rows:
    print("| " + " | ".join(row) + " |")
  print(f"\nload after: {load()}")
  print("jdiff step times:", " ".join(f"{t:.3f}" for t in jd_times))
  print("diffusers step times:", " ".join(f"{t:.3f}" for t in th_times))


if __name__ == "__main__":
  main()
