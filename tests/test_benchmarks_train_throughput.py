"""benchmarks/train_throughput.py: the variants table and the Trainer / hand loop / PyTorch comparison run."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The numbers are not the point here: XLA's cheapest CPU compilation keeps the runs to seconds.
ENV = dict(os.environ, JAX_PLATFORMS="cpu",
           XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")


def _run(*args):
  result = subprocess.run([sys.executable, "-m", "benchmarks.train_throughput", "--steps", "2", "--warmup", "1",
                           *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_variants_give_one_row_each_and_a_ratio_line():
  out = _run("--variants", "model.remat=none;model.remat=full")
  assert "MFU against the measured fp32 matmul peak" in out
  assert "model.remat=full" in out and "ratio (tokens/s vs model.remat=none)" in out, out


def test_compare_reports_the_trainer_the_hand_loop_and_the_peer_or_its_skip():
  out = _run("--compare", "--rounds", "2", "--d_model", "32", "--n_layers", "1", "--batch", "2", "--seq_len", "16")
  assert "d_model 32, 1 layers, heads 2/1 x 16, d_ff 96" in out and "batch 2 x seq 16" in out, out
  assert "lwjax Trainer" in out and "hand-written optax loop" in out and "Trainer tokens/s vs hand" in out, out
  assert ("PyTorch (HF Llama + AdamW)" in out) != ("PyTorch peer skipped" in out), out
  trainer_row = next(line for line in out.splitlines() if line.startswith("lwjax Trainer"))
  assert "faults/step" in out and len(trainer_row.split()) == 8 + 2, trainer_row  # 8 columns, then the 2 rounds
