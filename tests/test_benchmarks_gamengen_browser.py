"""benchmarks/gamengen_browser.py at the smoke scale: headless Chromium plays a random-weight world model through
the play server; the JSON has the frame rate, a key-to-frame latency and the timings, and --record its frames."""

import json
import os
import subprocess
import sys

import pytest

from lwjax.projects.gamengen import play_browser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # ~24 s on the loaded 2-core machine (load 6), most of it compiling
def test_smoke_preset_plays_in_chromium_and_writes_the_json(tmp_path):
  why = play_browser.unavailable()
  if why:
    pytest.skip(why)
  out, record = tmp_path / "browser.json", tmp_path / "frames"
  # XLA's cheapest CPU compilation keeps the run to seconds; the numbers are not the point here.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.gamengen_browser", "--preset", "smoke", "--steps", "1", "--frames", "10",
       "--hold", "4", "--out", str(out), "--record", str(record)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "the weights are random" in result.stdout and "uptime after:" in result.stdout, result.stdout
  results = json.loads(out.read_text())
  assert results["cores"] >= 1 and "load average" in results["uptime_before"]
  assert "HeadlessChrome" in results["user_agent"]
  [row] = results["rows"]
  assert row["source"] == "smoke (random weights)" and row["steps"] == 1 and row["context"] == 4
  assert row["frames"] >= 10 and row["fps_session"] > 0
  assert row["latency_events"] >= 2 and row["latency_ms_p90"] >= row["latency_ms_p50"] > 0
  assert row["server_ms_p50"] >= row["engine_ms_p50"] > 0 and row["engine_alone_ms_p50"] > 0
  assert len(row["loadavg_before"]) == len(row["loadavg_after"]) == 3
  # Each key event waits for at least the engine step of the request that carries it.
  assert min(row["samples"]["latency_ms"]) >= min(row["samples"]["engine_ms"])
  assert os.path.getsize(row["recording"]["gif"]) > 0 and os.path.getsize(row["recording"]["strip"]) > 0
