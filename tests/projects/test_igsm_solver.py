"""The CPU reasoning testbed's solvers (`experiments/igsm_solver.py`; its smoke scale runs end to end in
tests/projects/retry/test_retry.py): (slow) a small solver learns to write fully correct solutions of
held-out problems."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _main(tmp_path, workdir, arg, *overrides):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, "main.py"), "--config",
       os.path.join(ROOT, "experiments/igsm_solver.py") + f":{arg}", "--workdir", workdir, *overrides],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=2400)


@pytest.mark.slow
def test_a_small_solver_learns_held_out_problems(tmp_path):
  """~8 min on 2 cores: the weaker solver's shape on op-1 problems for 600 steps (~50k problems), then greedy
  solutions of 100 held-out op-1 problems (test-split templates), checked step by step. The baseline, measured
  on the same problems: answering their most frequent answer."""
  result = _main(tmp_path, "run", "scale=cpu,size=weak", "--config.data.train_ops=1", "--config.eval.ops=1",
                 "--config.eval.curve_ops=", "--config.train.steps=600", "--config.train.eval_every=600",
                 "--config.train.checkpoint_every=600", "--config.optim.warmup_steps=50")
  assert result.returncode == 0, result.stderr[-3000:]
  m = json.loads((tmp_path / "run" / "metrics.json").read_text())["eval"]["op1"]
  assert m["n"] == 100 and m["accuracy"] >= 0.1, m
  assert m["answer_accuracy"] > m["constant_answer_accuracy"] + 0.15, m
