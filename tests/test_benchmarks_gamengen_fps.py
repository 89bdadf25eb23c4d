"""benchmarks/gamengen_fps.py in its CPU smoke mode (the table, the ratio line and a JSON of positive timings) and
its TPU compile (slow)."""

import json
import os
import subprocess
import sys

import pytest

from lwjax.launch import aot

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


@pytest.mark.slow
@pytest.mark.skipif(not aot.libtpu_available()[0], reason="libtpu cannot load")
def test_the_frame_compiled_for_a_tpu_chip_runs_the_pallas_attention_in_its_loop(tmp_path):
  """The k DDIM steps as a loop, compiled for one v5e chip: the account reads the loop's k trips, and the UNet's
  and the decoder's attention are Mosaic kernels (the flash attention), not XLA's materialised scores."""
  out, hlo_dir = tmp_path / "fps.json", tmp_path / "hlo"
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.gamengen_fps", "--unet", "unet_tiny", "--autoencoder", "ae_tiny",
       "--context", "2", "--downsample", "4", "--pad_multiple", "32", "--steps", "3", "--nounroll", "--iters", "0",
       "--tpu_aot", "v5e:1x1", "--tpu_programs", "unet,frame", "--hlo_dir", str(hlo_dir), "--out", str(out)],
      cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.loads(out.read_text())["tpu_aot"]
  unet, frame = rows["unet b=2"], rows["frame k=3"]
  assert 3 in [loop["trip_count"] for loop in frame["hlo_cost"]["loops"]] and not frame["lower_bound"]
  for row in (unet, frame):
    assert row["hlo_cost"]["classes"]["attention"]["count"] > 0
  # Three UNet calls and a decode, where XLA counts the loop's body (one call) once: two calls apart.
  assert frame["flops"] - frame["xla_counted_once"]["flops"] == pytest.approx(2 * unet["flops"], rel=0.05)
  text = (hlo_dir / "v5e_1x1_frame_k=3.hlo").read_text()
  assert "tpu_custom_call" in text
