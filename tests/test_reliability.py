"""Reliability: resume after SIGKILL/SIGTERM is bit-exact, unreadable checkpoints fall back, incompatible ones are
refused by name, non-finite steps stop or are skipped, and bad command-line values end in one clean line."""
import functools
import glob
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import ConfigDict, config_flags

import jdiff
from jdiff import checkpoint, data, sharding
from jdiff import generate as gen
from jdiff.cli import runtime
from jdiff.config import ConfigError, parse_config
from jdiff.configs import tiny
from jdiff.schedules import make_schedule
from jdiff.train import faults, train_and_evaluate
from jdiff.train.loop import mean_metrics
from jdiff.train.step import abstract_train_state, create_train_state, train_step
from tests.damage import flip_middle_of_largest_data_file, flip_stored_array, truncate_state_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("JDIFF_TEST_CACHE", os.path.join(ROOT, ".pytest_cache", "jax"))


def tiny_config(**training) -> ConfigDict:
  raw = tiny.get_config()
  raw.training.update(training)
  return raw


def script(name, *args, **popen):
  """Starts train.py/sample.py with the tests' devices, datasets and compilation cache."""
  env = dict(os.environ, JDIFF_COMPILATION_CACHE=CACHE)
  return subprocess.Popen([sys.executable, os.path.join(ROOT, name), *args], env=env, cwd=ROOT, text=True, **popen)


def run_script(name, *args):
  proc = script(name, *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  out, err = proc.communicate(timeout=300)
  return proc.returncode, out, err


def leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def restore_final(workdir, step):
  manager = checkpoint.make_manager(str(workdir), create=False)
  config = parse_config(checkpoint.restore_config(manager, step))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                    abstract_train_state(config))
  return checkpoint.restore_checked(manager, step, abstract)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 4-step tiny run with checkpoints at 2 and 4 (in-process: shares the compiled step with other tests)."""
  workdir = tmp_path_factory.mktemp("rel") / "run"
  state = train_and_evaluate(tiny_config(num_steps=4, checkpoint_every=2), str(workdir)).state
  return workdir, state


# ---------------------------------------------------------------- kill, preempt, resume

@pytest.mark.slow
def test_killed_and_preempted_train_py_resumes_bit_identically(tmp_path):
  """A real train.py is stopped by SIGTERM once and SIGKILLed twice, each a seeded random 0-1 s after the run's
  first new checkpoint (so mid-step or mid-save), and restarted each time; its final state equals an uninterrupted
  run's bit for bit, and no kill left an unreadable checkpoint behind."""
  num_steps, every = 20, 4
  reference = train_and_evaluate(tiny_config(num_steps=num_steps, checkpoint_every=num_steps, log_every=every),
                                 str(tmp_path / "reference")).state
  workdir = tmp_path / "interrupted"
  args = ["--config", "configs/tiny.py", "--workdir", str(workdir), f"--config.training.num_steps={num_steps}",
          f"--config.training.checkpoint_every={every}", f"--config.training.log_every={every}",
          "--cpu_devices=1"]  # the devices of this process (tests/conftest.py), not one per core
  rng = random.Random(5)
  logs = []
  for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGKILL):
    log_path, before = tmp_path / f"run{len(logs)}.log", latest_saved(workdir)
    with open(log_path, "w") as log:
      proc = script("train.py", *args, stdout=log, stderr=log)
      deadline = time.time() + 300
      while latest_saved(workdir) == before and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
      time.sleep(rng.uniform(0.0, 1.0))
      proc.send_signal(sig)
      returncode = proc.wait(timeout=120)
    logs.append(log_path.read_text())
    if sig == signal.SIGTERM:
      assert returncode == 0, logs[-1][-3000:]
      stopped_at = int(logs[-1].split("stopped by SIGTERM after step ")[1].split()[0])
      assert latest_saved(workdir) == stopped_at < num_steps
    else:
      assert returncode == -signal.SIGKILL, logs[-1][-3000:]  # killed mid-run, not finished
  returncode, _, err = run_script("train.py", *args)
  assert returncode == 0, err[-3000:]
  logs.append(err)
  assert not any("unreadable" in log or "Traceback" in log for log in logs)
  assert sum("resuming from checkpoint" in log for log in logs) == 3
  assert not glob.glob(str(workdir / "checkpoints" / "*.orbax-checkpoint-tmp*"))
  resumed = restore_final(workdir, num_steps)
  assert int(resumed.step) == num_steps
  for a, b in zip(leaves(reference), leaves(resumed)):
    np.testing.assert_array_equal(a, b)


def latest_saved(workdir) -> int:
  """The newest finished checkpoint step in workdir (0 if none), from the directory names alone."""
  names = os.listdir(workdir / "checkpoints") if (workdir / "checkpoints").is_dir() else []
  return max([int(name) for name in names if name.isdigit()], default=0)


def test_stop_request_turns_signals_into_a_flag_and_restores_handlers():
  # Python's own Ctrl-C handler, also where pytest was started in the background (with SIGINT ignored).
  inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    before = signal.getsignal(signal.SIGTERM)
    with faults.StopRequest() as stop:
      assert stop.requested is None
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.01)
      assert stop.requested == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C acts at once
      with faults.StopRequest() as stop:
        signal.raise_signal(signal.SIGINT)
        assert stop.requested == "SIGINT"
        signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, inherited)


# ---------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("damage, reason", [
    (truncate_state_files, r"ValueError: OUT_OF_RANGE: Error reading .*"),
    (flip_middle_of_largest_data_file,
     r"checksum mismatch: \S+ (differs|and \d+ other arrays differ) from what was saved"),
])
@pytest.mark.slow  # trains or compiles enough to crowd the fast tier
def test_unreadable_latest_checkpoint_falls_back_and_is_set_aside(trained, tmp_path, damage, reason):
  """Truncated files, and flipped bytes that leave every file's size as it was, found the same way."""
  source, straight = trained
  workdir = tmp_path / "run"
  shutil.copytree(source, workdir)
  damage(workdir / "checkpoints" / "4")
  # A save that crashed midway: orbax's temporary directory, never renamed to its step.
  shutil.copytree(workdir / "checkpoints" / "2", workdir / "checkpoints" / "6.orbax-checkpoint-tmp-1")
  assert checkpoint.latest_step(str(workdir)) == 4
  with pytest.raises(checkpoint.UnreadableCheckpointError,
                     match=rf"checkpoint {workdir}/checkpoints/4 is unreadable \({reason}\)"):
    restore_final(workdir, 4)

  resumed = train_and_evaluate(tiny_config(num_steps=4, checkpoint_every=2), str(workdir)).state
  names = sorted(os.listdir(workdir / "checkpoints"))
  assert names == ["2", "4", "4.unreadable"]  # the damaged step kept under another name, the tmp dir removed
  for a, b in zip(leaves(straight), leaves(resumed)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_sampling_falls_back_from_an_unreadable_checkpoint(tiny_run, tmp_path, damage):
  """jdiff.load (sample.py) reads only the EMA params: damage to them is found, named, and the step before used."""
  workdir = tmp_path / "run"
  shutil.copytree(tiny_run.workdir, workdir)
  if damage == "truncated":
    truncate_state_files(workdir / "checkpoints" / "20")
    reason = r"ValueError: OUT_OF_RANGE: Error reading .*"
  else:
    name = flip_stored_array(workdir / "checkpoints" / "20", "ema_params/")
    reason = rf"checksum mismatch: {name} differs from what was saved"
  with pytest.raises(checkpoint.UnreadableCheckpointError,
                     match=rf"checkpoint {workdir}/checkpoints/20 is unreadable \({reason}\)"):
    jdiff.load(str(workdir), step=20)
  assert jdiff.load(str(workdir)).step == 10  # the latest readable one


def test_no_readable_checkpoint_is_an_error_naming_each(trained, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(trained[0], workdir)
  for step in ("2", "4"):
    truncate_state_files(workdir / "checkpoints" / step)
  with pytest.raises(checkpoint.UnreadableCheckpointError, match=r"no readable checkpoint: .*/4 is unreadable.*/2 "):
    train_and_evaluate(tiny_config(num_steps=6, checkpoint_every=2), str(workdir))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]  # nothing moved or deleted


def test_restoring_another_models_state_names_the_mismatching_arrays(trained):
  workdir, _ = trained
  manager = checkpoint.make_manager(str(workdir), create=False)
  wider = tiny_config()
  wider.model.channels = 32
  with pytest.raises(checkpoint.IncompatibleCheckpointError,
                     match=r"params/conv_in/kernel: checkpoint has float32\[3, 3, 1, 16\], model has "
                           r"float32\[3, 3, 1, 32\]"):
    checkpoint.restore_checked(manager, 4, abstract_train_state(parse_config(wider)))
  # Orbax alone would cast a bfloat16 target silently; the check names the dtype.
  same = abstract_train_state(parse_config(tiny_config()))
  cast = same.replace(params=jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16),
                                                    same.params))
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match=r"checkpoint has float32\[16\], model has "
                                                                   r"bfloat16\[16\]"):
    checkpoint.restore_checked(manager, 4, cast)
  unconditional = tiny_config()
  unconditional.model.num_classes = 0
  unconditional.sampling.guidance_scale = 1.0
  with pytest.raises(checkpoint.IncompatibleCheckpointError,
                     match=r"params/label_embed/embedding: in the checkpoint float32\[11, 64\], not in the model"):
    checkpoint.restore_checked(manager, 4, abstract_train_state(parse_config(unconditional)))


# ---------------------------------------------------------------- non-finite steps

@pytest.fixture(scope="module")
def step_setup():
  config = parse_config(tiny_config())
  schedule = make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  state = jax.jit(functools.partial(create_train_state, config))(jax.random.key(0))
  return config, schedule, state


def digits_batch(nan=False):
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (16, 8, 8, 1)).astype(np.float32)
  if nan:
    images[3, 2, 2, 0] = np.nan
  return {"image": jnp.asarray(images), "label": jnp.asarray(np.arange(16) % 10, jnp.int32)}


@pytest.mark.slow  # trains or compiles enough to crowd the fast tier
def test_a_non_finite_step_is_not_applied(step_setup):
  config, schedule, state = step_setup
  step = jax.jit(functools.partial(train_step, config=config))
  bad, metrics = step(state, digits_batch(nan=True), jax.random.key(1), schedule)
  assert int(metrics["nonfinite_steps"]) == 1 and not np.isfinite(float(metrics["loss"]))
  assert int(bad.step) == int(state.step) + 1
  for a, b in zip(leaves((state.params, state.ema_params, state.opt_state)),
                  leaves((bad.params, bad.ema_params, bad.opt_state))):
    np.testing.assert_array_equal(a, b)
  good, metrics = step(state, digits_batch(), jax.random.key(1), schedule)
  assert int(metrics["nonfinite_steps"]) == 0
  # A finite step is applied: Adam's first update moves each parameter with a gradient by about the learning rate
  # (g / (|g| + eps)), and the EMA (decay 0.1 at step 0 with warmup) follows.
  moves = np.concatenate([np.abs(a - b).ravel() for a, b in zip(leaves(good.params), leaves(state.params))])
  assert moves.max() == pytest.approx(float(metrics["learning_rate"]), rel=1e-3)
  for e0, p1, e1 in zip(leaves(state.ema_params), leaves(good.params), leaves(good.ema_params)):
    np.testing.assert_allclose(e1, 0.1 * e0 + 0.9 * p1, rtol=1e-5, atol=1e-7)


def test_logged_metrics_average_applied_steps_and_count_skipped_ones():
  history = [{"loss": 1.0, "nonfinite_steps": 0}, {"loss": float("nan"), "nonfinite_steps": 1},
             {"loss": 3.0, "nonfinite_steps": 0}]
  assert mean_metrics(history) == {"loss": 2.0, "nonfinite_steps": 1.0}


def nan_at(index, monkeypatch):
  """Makes the training data's batch `index` (0-based step) hold a NaN pixel."""
  real = data.make_train_iterator

  def poisoned(*args, start_step=0, **kwargs):
    for step, batch in enumerate(real(*args, start_step=start_step, **kwargs), start=start_step):
      if step == index:
        batch = dict(batch, image=batch["image"].copy())
        batch["image"].flat[5] = np.nan
      yield batch

  monkeypatch.setattr(data, "make_train_iterator", poisoned)


def test_nonfinite_stop_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  nan_at(6, monkeypatch)
  with pytest.raises(faults.NonFiniteError, match=r"at step 7 \(loss=nan, grad_norm=nan\).*the last checkpoint, "
                                                  r"step 4, is kept.*nonfinite=skip"):
    train_and_evaluate(tiny_config(num_steps=8, checkpoint_every=4, log_every=4), str(tmp_path))
  assert checkpoint.make_manager(str(tmp_path), create=False).all_steps() == [4]


def test_nonfinite_skip_trains_on_with_finite_params(tmp_path, monkeypatch):
  nan_at(6, monkeypatch)
  state = train_and_evaluate(tiny_config(num_steps=8, checkpoint_every=4, log_every=4, nonfinite="skip"),
                             str(tmp_path)).state
  assert int(state.step) == 8 and all(np.isfinite(x).all() for x in leaves(state))
  assert checkpoint.make_manager(str(tmp_path), create=False).all_steps() == [4, 8]


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("key, value, message", [
    ("training.batch_size", 16.0, r"batch_size=16.0 has the wrong type: must be int"),
    ("training.learning_rate", float("inf"), r"learning_rate=inf has the wrong type: must be float"),
    ("model.channel_mults", ("1", "x"), r"channel_mults=\('1', 'x'\) has the wrong type: must be tuple\[int, ...\]"),
    ("training.nonfinite", "ignore", r"nonfinite='ignore' is not allowed: must be one of stop, skip"),
    ("seed", -1, r"config.seed=-1 is not allowed"),
    ("model.image_size", 9, r"image_size=9 .*divisible by 2\*\*\(len\(channel_mults\) - 1\) = 2"),
    ("diffusion.zero_terminal_snr", True, r"zero_terminal_snr=True is not allowed: must be False with prediction "
                                          r"'eps'.*predict 'v' or 'x0'"),
])
def test_config_values_of_the_wrong_type_or_range_name_the_field(key, value, message):
  raw = tiny_config().to_dict()
  *section, field = key.split(".")
  (raw[section[0]] if section else raw)[field] = value
  with pytest.raises(ConfigError, match=message):
    parse_config(raw)


def test_notebook_api_rejects_bad_inputs_before_sampling(trained):
  pipe = jdiff.load(str(trained[0]))
  with pytest.raises(ValueError, match=r"images must be uint8 \[N, 8, 8, 1\], got float32 \(2, 8, 8, 1\)"):
    pipe.invert(np.zeros((2, 8, 8, 1), np.float32))
  with pytest.raises(ValueError, match=r"images must be uint8 \[N, 8, 8, 1\], got uint8 \(8, 8, 1\)"):
    pipe.invert(np.zeros((8, 8, 1), np.uint8))
  with pytest.raises(ValueError, match=r"latents must be float \[2, 8, 8, 1\], got float32 \[2, 16, 16, 1\]"):
    pipe.generate(latents=np.zeros((2, 16, 16, 1), np.float32))
  with pytest.raises(ValueError, match="latents hold NaN"):
    pipe.generate(latents=np.full((1, 8, 8, 1), np.nan, np.float32))
  with pytest.raises(ValueError, match=r"seed 4294967296 is outside \[0, 2\*\*32\)"):
    pipe.generate(num=2, seed=2**32 - 1)
  with pytest.raises(ValueError, match=r"eta=-0.5 must be a finite number >= 0"):
    pipe.generate(num=2, eta=-0.5)
  with pytest.raises(TypeError, match=r"prompt must be a string or a list of strings, got 3; .* pass num=..."):
    pipe.generate(3)


# ---------------------------------------------------------------- fuzz

TRAIN_FIELDS = [f"{section}.{key}" for section, values in tiny.get_config().to_dict().items()
                if isinstance(values, dict)
                for key in values] + ["seed", "training.batchsize", "model.colour", "sampler.steps"]
VALUES = ["0", "1", "-1", "3", "7", "8", "12", "16", "64", "1000000", "2.5", "-0.5", "1e-3", "nan", "inf", "abc", "",
          "True", "False", "None", "(1, 2)", "(1,)", "()", "(8, 4)", "ddim", "karras", "skip", "stop", "train[:10]",
          "test", "validation", "float16", "bfloat16"]


def fuzz_cases(count, seed):
  rng = random.Random(seed)
  return [[f"--config.{rng.choice(TRAIN_FIELDS)}={rng.choice(VALUES)}" for _ in range(rng.choice((1, 1, 2)))]
          for _ in range(count)]


def parse_train_command_line(overrides):
  """train.py's parsing and up-front validation on a private FlagValues: the Config, or SystemExit(2)."""
  argv = ["train.py", "--config", os.path.join(ROOT, "configs", "tiny.py"), *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", argv[2], flag_values=flag_values, lock_config=True, sys_argv=argv)
  runtime.parse_flags(argv, flag_values)
  config = parse_config(flag_values.config)
  sharding.check_batch_divides(config.training.batch_size, sharding.make_mesh())
  return config


def test_fuzzed_train_command_lines_parse_or_fail_with_one_line(capsys):
  outcomes = {"ok": 0, "flag error": 0, "config error": 0}
  for overrides in fuzz_cases(60, seed=0):
    try:
      parse_train_command_line(overrides)
      outcomes["ok"] += 1
    except SystemExit as e:
      err = capsys.readouterr().err
      assert e.code == 2 and err.startswith("train.py: error: ") and err.count("\n") == 1, (overrides, err)
      outcomes["flag error"] += 1
    except ConfigError as e:
      assert "\n" not in str(e) and "config." in str(e), (overrides, str(e))
      outcomes["config error"] += 1
  assert min(outcomes.values()) >= 5, outcomes  # the fuzz reaches every outcome


SAMPLE_VALUES = {"sampler": ["ddim", "heun", "unipc", "ddmi", "", "DDIM"],
                 "steps": [1, 4, 0, -3, 1000, 1001], "num": [1, 3, 0, -2], "seed": [0, 5, -1, 2**32 - 1, 2**40],
                 "guidance_scale": [1.0, 3.0, 0.0, -1.0, float("nan"), float("inf")],
                 "label": [None, 0, 9, 10, -1],
                 "eta": [None, 0.0, 1.0, -0.1, float("nan")], "spacing": [None, "trailing", "karras", "cosine"],
                 "guidance_rescale": [0.0, 0.7, 1.5, -0.2], "negative_label": [None, 3, 10, -5],
                 "batch_size": [1, 2, 256, 0, -1]}


def test_fuzzed_notebook_sampling_options_run_or_raise_one_line_value_errors(trained, monkeypatch):
  """Pipeline.generate (what sample.py calls) with random option values, the compiled sampler replaced by a
  stand-in that checks it only ever receives validated options."""
  pipe = jdiff.load(str(trained[0]))

  def checked_sampler(model, params, schedule, noise, keys, *, labels, sampler, steps, spacing, eta,
                      guidance_scale, guidance_rescale, negative_labels, prediction, clip_x0):
    assert 1 <= steps <= 1000 and np.isfinite(guidance_scale) and guidance_scale >= 0 and eta >= 0
    assert clip_x0 is True  # a pixel model
    assert labels is None or ((0 <= labels) & (labels < 10)).all()
    return jnp.zeros(noise.shape)

  monkeypatch.setattr(gen, "sample_unet", checked_sampler)
  rng = random.Random(1)
  outcomes = {"ok": 0, "error": 0}
  for _ in range(60):
    options = {name: rng.choice(values) for name, values in SAMPLE_VALUES.items() if rng.random() < 0.4}
    num = options.pop("num", 2)
    try:
      samples = pipe.generate(num=num, **options)
      assert samples.images.shape == (num, 8, 8, 1)
      outcomes["ok"] += 1
    except ValueError as e:
      assert "\n" not in str(e), (options, str(e))
      outcomes["error"] += 1
  assert min(outcomes.values()) >= 10, outcomes


@pytest.mark.slow
@pytest.mark.parametrize("name, args", [
    ("train.py", ["--config.data.split=validation"]),
    ("sample.py", ["--steps=abc"]),
    ("sample.py", ["--guidance_scale=nan"]),
])
def test_bad_values_fail_in_a_real_process_with_one_line_and_write_nothing(trained, tmp_path, name, args):
  if name == "train.py":
    workdir = tmp_path / "run"
    code, _, err = run_script(name, "--config", "configs/tiny.py", "--workdir", str(workdir), *args)
    assert not workdir.exists()
  else:
    out = tmp_path / "out.png"
    code, _, err = run_script(name, "--workdir", str(trained[0]), "--num", "2", "--out", str(out), *args)
    assert not out.exists()
  assert code == 2 and err.count(f"{name}: error: ") == 1 and "Traceback" not in err, err[-2000:]


# ---------------------------------------------------------------- the VAE trainer, through the same loop

@pytest.mark.slow  # trains or compiles enough to crowd the fast tier
def test_vae_training_resumes_bit_identically_and_stops_on_a_non_finite_step(tmp_path, monkeypatch):
  from tests.test_vae import tiny_vae_config
  data_dir = os.environ["TFDS_DATA_DIR"]
  straight = train_and_evaluate(tiny_vae_config(data_dir, num_steps=4, checkpoint_every=2), str(tmp_path / "a")).state
  train_and_evaluate(tiny_vae_config(data_dir, num_steps=2, checkpoint_every=2), str(tmp_path / "b"))
  resumed = train_and_evaluate(tiny_vae_config(data_dir, num_steps=4, checkpoint_every=2), str(tmp_path / "b")).state
  for a, b in zip(leaves(straight), leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  nan_at(2, monkeypatch)
  with pytest.raises(faults.NonFiniteError, match=r"at step 3 \(loss=nan.*the last checkpoint, step 2, is kept"):
    train_and_evaluate(tiny_vae_config(data_dir, num_steps=4, checkpoint_every=2, log_every=2), str(tmp_path / "c"))
  assert checkpoint.make_manager(str(tmp_path / "c"), create=False).all_steps() == [2]


@pytest.mark.slow
def test_sigterm_stops_a_real_vae_run_with_a_checkpoint_and_a_rerun_finishes_it(tmp_path):
  from tests.test_vae import TINY_VAE, tiny_vae_config
  data_dir = os.environ["TFDS_DATA_DIR"]
  reference = train_and_evaluate(tiny_vae_config(data_dir, num_steps=12, checkpoint_every=12),
                                 str(tmp_path / "reference")).state
  workdir = tmp_path / "run"
  args = ["--config", "vae_digits", "--workdir", str(workdir), "--config.data.image_size=16",
          f"--config.data.data_dir={data_dir}", "--config.training.num_steps=12", "--config.training.batch_size=16",
          "--config.training.warmup_steps=1", "--config.training.checkpoint_every=2", "--config.training.log_every=2",
          "--config.training.sample_every=0", "--config.evaluation.num_images=40", "--cpu_devices=1"]
  args += [f"--config.vae.{key}={value}" for key, value in TINY_VAE.items()]
  with open(tmp_path / "log", "w") as log:
    proc = script("train.py", *args, stdout=log, stderr=log)
    deadline = time.time() + 300
    while latest_saved(workdir) == 0 and proc.poll() is None and time.time() < deadline:
      time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, (tmp_path / "log").read_text()[-3000:]
  stopped_at = latest_saved(workdir)
  assert f"stopped by SIGTERM after step {stopped_at}" in (tmp_path / "log").read_text() and stopped_at < 12
  code, _, err = run_script("train.py", *args)
  assert code == 0 and "resuming from checkpoint" in err, err[-3000:]
  manager = checkpoint.make_manager(str(workdir), create=False)
  from jdiff.config import parse_vae_config
  from jdiff.train.vae import create_vae_state
  config = parse_vae_config(checkpoint.restore_config(manager, 12))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                    jax.eval_shape(functools.partial(create_vae_state, config), jax.random.key(0)))
  for a, b in zip(leaves(reference), leaves(checkpoint.restore_checked(manager, 12, abstract))):
    np.testing.assert_array_equal(a, b)
