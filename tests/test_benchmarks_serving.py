"""benchmarks/serving.py: a trace or mesh it cannot use is one line and exit status 2; a Splitwise trace replayed at
its (scaled) times on two engine replicas reports the table."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu",
           XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")


def _run(*args, timeout=120):
  return subprocess.run([sys.executable, "-m", "benchmarks.serving", *args], cwd=ROOT, env=ENV, capture_output=True,
                        text=True, timeout=timeout)


@pytest.mark.parametrize("name,content,args,message", [
    ("trace.csv", "TIMESTAMP,ContextTokens\n0,5\n", (), "trace.csv: GeneratedTokens: missing column"),
    pytest.param("trace.json", "[]", (), "trace.json: conversations: no request in the trace", marks=pytest.mark.slow),
    pytest.param("trace.csv", "", ("--mesh", "tensor=2,pipeline=2"), "--mesh: 'pipeline=2'", marks=pytest.mark.slow),
])
def test_an_unusable_trace_or_mesh_is_one_line_and_exit_status_2(tmp_path, name, content, args, message):
  """(Each case starts the benchmark's process, ~9 s here: one in the default suite; the parsing itself is
  tests/serving/test_traces.py's.)"""
  (tmp_path / name).write_text(content)
  result = _run("--trace", str(tmp_path / name), *args)
  assert result.returncode == 2, result.stderr[-2000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("benchmarks.serving: ") and message in last, result.stderr[-2000:]


@pytest.mark.slow
def test_a_splitwise_trace_replays_on_two_replicas(tmp_path):
  trace = tmp_path / "AzureLLMInferenceTrace_conv.csv"
  trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
      f"2023-11-16 18:15:{46 + i // 2:02d}.{i * 1234567 % 10**7:07d},{200 + 90 * i},{30 + 41 * i % 200}\n"
      for i in range(8)))
  result = _run("--trace", str(trace), "--time_scale", "0.05", "--requests", "6", "--mesh", "data=2,tensor=1",
                timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "6 requests (0 rows skipped), lengths from recorded token counts x 0.0625" in out, out
  assert "arrivals: the trace's times x 0.05" in out and "the engine on mesh data=2 x tensor=1" in out, out
  rows = [line for line in out.splitlines() if line.startswith("splitwise trace")]
  assert len(rows) >= 3 and "XLA compilations in the timed (last) passes: " in out, out
