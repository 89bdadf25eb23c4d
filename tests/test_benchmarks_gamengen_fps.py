"""benchmarks/gamengen_fps.py in its CPU smoke mode: the table, the ratio line and a JSON of positive timings."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_mode_writes_positive_timings(tmp_path):
  out = tmp_path / "fps.json"
  # The numbers are not the point here: XLA's cheapest CPU compilation keeps the run to seconds. The PyTorch
  # peer is off: where torch and diffusers import it would compile with inductor for minutes.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.gamengen_fps", "--unet", "unet_tiny", "--autoencoder", "ae_tiny",
       "--context", "2", "--downsample", "4", "--pad_multiple", "32", "--steps", "2", "--dtype", "float32",
       "--iters", "2", "--peer", "off", "--out", str(out)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "ratio" in result.stdout and "peer: skipped (--peer off)" in result.stdout, result.stdout
  results = json.loads(out.read_text())
  assert results["steps"] == [2] and results["context"] == 2 and results["unet_params"] > 0
  assert set(results["here"]) == {"frame k=2", "frame k=2 (args)", "unet b=2", "decode b=1"}
  for row in results["here"].values():
    assert row["median_ms"] > 0 and row["p90_ms"] >= row["median_ms"] and row["fps"] > 0
    assert row["flops"] > 0 and row["bytes"] > 0
  assert results["overhead"]["2"] > 0
  assert "skipped" in results["peer"]
