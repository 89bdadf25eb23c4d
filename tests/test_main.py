"""main.py: config errors exit 2 with one line naming the key; every experiment config validates."""

import glob
import importlib
import os
import re
import subprocess
import sys

import pytest

from lwjax import jobs
from lwjax.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "experiments", "*.py")))


def _main(*args, timeout=120):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


@pytest.mark.parametrize("override,key", [
    ("--config.train.stepz=3", "train.stepz: unknown key"),
    ("--config.trainn.steps=3", "trainn.steps: unknown key"),
    ("--config.train.steps=abc", "--config.train.steps=abc"),
    ("--config.optim.name=sgd", "optim.name: 'sgd' is not a valid choice (valid: 'adamw', 'adafactor')"),
    ("--config.train.steps=0", "train.steps: 0 is below the minimum"),
    ("--config.model.n_kv_heads=3", "model: n_heads (4) must be a multiple of n_kv_heads (3)"),
    ("--config.data.seq_len=4096", "data.seq_len: 4096 exceeds model.max_seq_len"),
    ("--config.mesh.shape.data=3", "mesh.shape: product 3 != 8 devices"),
])
def test_config_errors_exit_2_with_one_line(override, key, tmp_path):
  result = _main("--config", "experiments/lm_pretrain.py:scale=smoke", "--workdir", str(tmp_path), override)
  assert result.returncode == 2, result.stderr[-2000:]
  errors = [line for line in result.stderr.splitlines() if line.startswith("config error:")]
  assert len(errors) == 1 and key in errors[0], result.stderr[-2000:]
  assert "Traceback" not in result.stderr


@pytest.mark.parametrize("config,why", [
    ("experiments/nope.py", "No such file"),
    ("experiments/lm_pretrain.py:scale=huge", "scale='huge': expected one of smoke, cpu, gpu, paper"),
])
def test_bad_config_file_or_argument_exits_2(config, why, tmp_path):
  result = _main("--config", config, "--workdir", str(tmp_path))
  assert result.returncode == 2 and why in result.stderr and "Traceback" not in result.stderr, result.stderr


# Experiments on a finished run validate that the run exists; test_gamengen_pipeline.py runs them on one.
NEED_A_RUN = {"gamengen_eval": "diffusion_workdir", "gamengen_play": "diffusion_workdir",
              "mamba_distill": "teacher.workdir"}
# Scales that explain downloaded checkpoints need their paths (nothing is downloaded here).
NEED_FILES = {("lrp4rag", "gpu"): "model.pretrained", ("lrp4rag", "paper"): "model.pretrained",
              ("wim", "gpu"): "model.pretrained", ("wim", "paper"): "model.pretrained"}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_config_validates_at_every_scale(name):
  module = importlib.import_module(f"experiments.{name}")
  for scale in getattr(module, "SCALES", (None,)):
    config = module.get_config(f"scale={scale}" if scale else None)
    if name in NEED_A_RUN:  # valid once the default run exists in this checkout, else the one-line error
      try:
        jobs.get(config)
      except ConfigError as e:
        assert re.match(f"^{NEED_A_RUN[name]}: .* holds no checkpoints", str(e)), str(e)
    elif (name, scale) in NEED_FILES:
      with pytest.raises(ConfigError, match=f"^{NEED_FILES[name, scale]}: "):
        jobs.get(config)
    else:
      jobs.get(config)


def test_validation_names_nested_unknown_and_missing_keys():
  config = importlib.import_module("experiments.lm_pretrain").get_config("scale=smoke")
  config.unlock()
  config.optim.momentum = 0.9
  with pytest.raises(ConfigError, match=r"^optim.momentum: unknown key \(valid: b1, b2,"):
    jobs.get(config)
  del config.optim["momentum"]
  del config.train["steps"]
  with pytest.raises(ConfigError, match="^train.steps: missing"):
    jobs.get(config)
  config.job = "lm_pretrian"
  with pytest.raises(ConfigError, match=r"^job: unknown job 'lm_pretrian' \(valid: .*\blm_pretrain\b"):
    jobs.get(config)
