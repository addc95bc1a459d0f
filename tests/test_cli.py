"""train.py and sample.py: in this process for their outputs and error paths (the same code a real process runs,
on the shared tiny work dir), and as real processes in the slow tier (start-up, quiet output, console scripts)."""
import os
import subprocess
import sys

import numpy as np
import pytest

import jdiff
from jdiff import configs
from jdiff.cli import sample as sample_cli
from jdiff.cli import train as train_cli
from jdiff.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(module, capsys, *args):
  """Runs a CLI's entry point in this process: (exit status, stdout, stderr)."""
  with pytest.raises(SystemExit) as exit_:
    module.run([f"{module.PROGRAM}", *map(str, args)])
  out, err = capsys.readouterr()
  return exit_.value.code or 0, out, err


def test_sample_cli_writes_what_the_notebook_api_generates(tiny_workdir, tmp_path, capsys):
  npz = tmp_path / "sevens.npz"
  code, out, err = cli(sample_cli, capsys, "--workdir", tiny_workdir, "--num", 6, "--steps", 4, "--label", 7,
                       "--seed", 3, "--guidance_scale", 2.5, "--sampler", "dpmpp_2m", "--out", npz)
  assert code == 0, err
  assert f"wrote 6 images from checkpoint 20 of {tiny_workdir} to {npz}" in out
  arrays = np.load(npz)
  assert arrays["labels"].tolist() == [7] * 6 and arrays["seeds"].tolist() == list(range(3, 9))
  same = jdiff.load(tiny_workdir).generate(num=6, seed=3, label=7, steps=4, guidance_scale=2.5, sampler="dpmpp_2m")
  np.testing.assert_array_equal(same.images, arrays["images"])


def test_sample_cli_writes_an_interpolation_strip_as_one_row(tiny_workdir, tmp_path, capsys):
  out = tmp_path / "strip.png"
  code, _, err = cli(sample_cli, capsys, "--workdir", tiny_workdir, "--interpolate", 6, "--label", 3, "--label_end", 8,
                     "--steps", 4, "--out", out)
  assert code == 0, err
  from PIL import Image
  width, height = Image.open(out).size
  assert width == 6 * height - 5 * 2 * (width // (6 * 10 + 2))  # six 8x8 tiles in a row, 2-pixel gaps, upscaled


@pytest.mark.parametrize("args, message", [
    (["--sampler", "ddmi"], "unknown sampler 'ddmi'; choose one of ddpm, ddim, euler"),
    (["--label", "10"], "label 10 is outside this model's classes: use 0..9"),
    (["--out", "grid.jpg"], "must end in .png (a grid) or .npz"),
    (["--prompt", "a red square"], "this model takes no text"),
    (["--steps", "0"], "--steps=0 must be at least 1"),
    (["--guidance_scale", "nan"], "guidance_scale=nan must be a finite number >= 0"),
    (["--steps=abc"], "flag --steps=abc: invalid literal for int() with base 10: 'abc'"),
    (["--bogus"], "Unknown command line flag 'bogus'"),
])
def test_sample_cli_rejects_bad_options_with_one_line(tiny_workdir, tmp_path, capsys, args, message):
  code, _, err = cli(sample_cli, capsys, "--workdir", tiny_workdir, "--num", 2, "--out", tmp_path / "x.png", *args)
  assert code == 2 and err.startswith("sample.py: error: ") and err.count("\n") == 1, err
  assert message in err
  assert not os.path.exists(tmp_path / "x.png")


def test_sample_cli_never_overwrites_unless_asked(tiny_workdir, tmp_path, capsys):
  out = tmp_path / "keep.png"
  out.write_bytes(b"precious")
  code, _, err = cli(sample_cli, capsys, "--workdir", tiny_workdir, "--num", 2, "--steps", 2, "--out", out)
  assert code == 2 and "pass --overwrite" in err
  assert out.read_bytes() == b"precious"
  code, _, _ = cli(sample_cli, capsys, "--workdir", tiny_workdir, "--num", 2, "--steps", 2, "--out", out,
                   "--overwrite")
  assert code == 0 and out.read_bytes().startswith(b"\x89PNG")


def test_train_cli_reports_an_undownloadable_dataset_and_writes_nothing(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(sources, "internet_reachable", lambda: False)
  workdir = tmp_path / "run"
  code, _, err = cli(train_cli, capsys, "--config", "tiny", "--workdir", workdir, "--config.data.name=mnist",
                     f"--config.data.data_dir={tmp_path / 'tfds'}")
  assert code == 2 and err.startswith("train.py: error: ") and err.count("\n") == 1
  assert "tfds build mnist" in err and not workdir.exists()


@pytest.mark.parametrize("args, message", [
    (["--config", "nope"], "--config='nope': no such file, and no bundled config of that name"),
    (["--config", "tiny", "--config.training.batchsize=3"],
     "unknown config field config.training.batchsize in --config.training.batchsize=3"),
    (["--config", "tiny", "--config.sampling.steps=5000"], "config.sampling.steps (5000) exceeds"),
    (["--config", "tiny", "--workdir", "FILE"], "is a file, not a directory; choose another --workdir"),
])
def test_train_cli_refuses_bad_input_up_front_with_one_line(tmp_path, capsys, args, message):
  (tmp_path / "FILE").write_text("not a directory")
  args = [str(tmp_path / "FILE") if a == "FILE" else a for a in args]
  if "--workdir" not in args:
    args += ["--workdir", str(tmp_path / "run")]
  code, _, err = cli(train_cli, capsys, *args)
  assert code == 2 and err.startswith("train.py: error: ") and err.count("\n") == 1, err
  assert message in err
  assert not (tmp_path / "run").exists()


def test_bundled_configs_resolve_by_name_path_or_file(tmp_path):
  assert configs.resolve("default") == os.path.join(configs.HERE, "default.py")
  assert configs.resolve("configs/shapes.py") == "configs/shapes.py"  # a file as given, from the repository root
  assert configs.resolve("elsewhere/shapes.py:x") == os.path.join(configs.HERE, "shapes.py") + ":x"
  own = tmp_path / "mine.py"
  own.write_text("")
  assert configs.resolve(str(own)) == str(own)
  assert configs.get("tiny").training.num_steps == 20 and "vae_shapes" in configs.names()


# Real processes: the slow tier.

def run(program, *args):
  return subprocess.run([sys.executable, os.path.join(ROOT, program), *map(str, args)], capture_output=True,
                        text=True, cwd=ROOT, timeout=600)


@pytest.mark.slow
def test_train_and_sample_as_real_processes_say_only_what_matters(tmp_path):
  workdir = tmp_path / "run"
  trained = run("train.py", "--config", "configs/tiny.py", "--workdir", workdir, "--config.training.num_steps=10")
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10"]
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
  assert f"next: python sample.py --workdir {workdir}" in trained.stdout
  sampled = run("sample.py", "--workdir", workdir, "--num", 4, "--steps", 2, "--out", tmp_path / "grid.png")
  assert sampled.returncode == 0, sampled.stderr[-3000:]
  for result in (trained, sampled):  # jdiff's own lines only: no library start-up noise, warnings or tracebacks
    lines = result.stderr.splitlines()
    assert not [line for line in lines if "oneDNN" in line or "Traceback" in line or "cpu_feature_guard" in line
                or line.startswith(("W0", "I0", "warning:"))], result.stderr
  assert "step 10/10: loss" in trained.stderr and "sampling: 4/4" in sampled.stderr


@pytest.mark.slow
def test_console_scripts_are_installed():
  for script in ("jdiff-train", "jdiff-sample"):
    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--workdir" in result.stdout
