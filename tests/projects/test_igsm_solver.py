"""The CPU reasoning testbed's solvers (`experiments/igsm_solver.py`): the smoke scale end to end through
main.py (compact iGSM, accuracy curve, checker metrics, a checkpoint `load_model` reads back), and (slow)
a small solver that learns to write fully correct solutions of held-out problems."""

import json
import os
import subprocess
import sys

import pytest
from flax import nnx

from lwjax.models.gpt import GPT, GPTConfig
from lwjax.training import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _main(tmp_path, workdir, arg, *overrides):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, "main.py"), "--config",
       os.path.join(ROOT, "experiments/igsm_solver.py") + f":{arg}", "--workdir", workdir, *overrides],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)


def test_smoke_solver_trains_logs_its_curve_and_loads_back(tmp_path):
  result = _main(tmp_path, "weak", "scale=smoke,size=weak")
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = json.loads((tmp_path / "weak" / "metrics.json").read_text())
  assert metrics["retry_rate"] == 0.0 and set(metrics["eval"]) == {"op1", "op3", "all"}
  curve = [json.loads(line) for line in (tmp_path / "weak" / "curve.jsonl").read_text().splitlines()]
  assert [c["step"] for c in curve] == [6] and curve[0]["eval"]["op1"]["n"] == 2
  model, config, step = checkpoint.load_model(str(tmp_path / "weak" / "checkpoints"),
                                              lambda c: GPT(GPTConfig.from_dict(c["model"]), rngs=nnx.Rngs(0)))
  assert step == 6 and config["data"]["fmt"] == "compact" and model.cfg.vocab_size >= 162


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
