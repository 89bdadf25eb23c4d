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
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_a_small_solver_learns_held_out_problems(tmp_path):
  """~12 min on 2 cores: the weaker solver's shape on ops 1-2 for 1,000 steps. Baseline in the same test: the
  most frequent answer of the same held-out problems (answer accuracy)."""
  result = _main(tmp_path, "run", "scale=cpu,size=weak", "--config.data.train_ops=1-2",
                 "--config.eval.ops=1,2", "--config.eval.num_per_op=64", "--config.eval.batch_size=64",
                 "--config.eval.curve_ops=", "--config.train.steps=1000", "--config.train.eval_every=1000",
                 "--config.train.checkpoint_every=1000")
  assert result.returncode == 0, result.stderr[-3000:]
  m = json.loads((tmp_path / "run" / "metrics.json").read_text())["eval"]
  assert m["op1"]["accuracy"] >= 0.5, m["op1"]
  assert m["all"]["answer_accuracy"] > m["all"]["constant_answer_accuracy"] + 0.3, m["all"]
