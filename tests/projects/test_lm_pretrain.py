"""The LM pretraining experiment end to end through main.py: it learns, and reports against a baseline."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_smoke_scale_runs_end_to_end_and_beats_the_unigram_baseline(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  # Run from another directory with a relative workdir, as users do.
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "main.py"), "--config",
       os.path.join(ROOT, "experiments/lm_pretrain.py") + ":scale=smoke", "--workdir", "run",
       "--config.train.steps=60", "--config.train.eval_every=60", "--config.train.checkpoint_every=30"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
  tmp_path = tmp_path / "run"
  assert result.returncode == 0, result.stderr[-3000:]
  assert "unigram cross-entropy" in result.stderr and "steps/s" in result.stderr and "eta" in result.stderr
  metrics = json.loads((tmp_path / "metrics.json").read_text())
  assert metrics["step"] == 60
  # The baseline is measured in the same run on the same held-out tokens.
  assert metrics["eval_loss"] < 0.9 * metrics["unigram_cross_entropy"], metrics
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["30", "60"]
  assert os.listdir(tmp_path / "tensorboard")
