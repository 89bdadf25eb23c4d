"""benchmarks/maxtext_compare.py: rows by name, the table from a fake pair of reports (attention replaced by the
analytic count, the roofline and MFU), multi-line HLO instructions folded, and the skip path without MaxText."""

import os
import subprocess
import sys

import pytest
from absl import app

from benchmarks import maxtext_compare as mc
from lwjax.launch import compile as compile_lib, hlo_cost, hlo_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW = mc.ROWS["llama2_7b_v5p-8"]
SHAPE = {"n_layers": 32, "n_heads": 32, "head_dim": 128, "model_flops": 2.8e15}


def _report(matmul_flops: float, attention_flops: float, wall_s: float) -> dict:
  classes = {name: {"flops": 0.0, "transcendentals": 0.0, "bytes": 0.0, "hbm_bytes": 0.0, "ici_bytes": 0.0,
                    "count": 0.0} for name in hlo_cost.CLASSES}
  classes["matmul"].update(flops=matmul_flops, bytes=5e11, hbm_bytes=5e11, count=867)
  classes["attention"].update(flops=attention_flops, hbm_bytes=1e11, bytes=1e11, count=128)
  classes["collective"].update(bytes=5e10, hbm_bytes=4e10, ici_bytes=4e10, count=700)
  return {"bytes_per_chip": {"arguments": 20 * mc.GIB, "outputs": 20 * mc.GIB, "temporaries": 16 * mc.GIB,
                             "aliased": 20 * mc.GIB, "peak": 36 * mc.GIB, "hbm": 95 * mc.GIB},
          "hlo_cost": {"classes": classes, "lower_bound": False}, "wall_s": wall_s}


def test_rows_by_name_all_or_none():
  assert mc.parse_rows("all") == list(mc.ROWS.values()) and mc.parse_rows("none") == []
  assert mc.parse_rows("llama2_70b_v5p-128, llama2_7b_v6e-8") == [mc.ROWS["llama2_70b_v5p-128"],
                                                                   mc.ROWS["llama2_7b_v6e-8"]]
  with pytest.raises(app.UsageError, match="unknown llama3_8b_v5p-8; known: llama2_7b_v5p-8"):
    mc.parse_rows("llama3_8b_v5p-8")


def test_a_fake_pair_of_reports_gives_two_rows_with_the_same_attention_count():
  attention = mc.attention_flops_per_chip(ROW, SHAPE, 4)
  # 11 passes x 2 H d x T (T + 512) / 2 pairs x 32 layers x 16 sequences / 4 chips
  assert attention == pytest.approx(11 * 2 * 32 * 128 * 4096 * 4608 / 2 * 32 * 4)
  lwjax = mc.account(ROW, SHAPE, "lwjax", _report(8.15e14, 1.94e14, 220.0))  # its kernels' dense estimate
  maxtext = mc.account(ROW, SHAPE, "maxtext", _report(8.15e14, 0.0, 125.0))  # splash declares nothing
  for record, declared in ((lwjax, 1.94e14), (maxtext, 0.0)):
    assert record["attention_flops_declared_per_chip"] == declared
    assert record["flops_per_chip"] == pytest.approx(8.15e14 + attention)
    peak, _ = compile_lib.CHIP_PEAKS["v5p"]
    assert record["step_s_by_term"]["compute"] == pytest.approx(record["flops_per_chip"] / peak)
    assert record["roofline_mfu"] == pytest.approx(2.8e15 / (4 * peak * record["roofline_step_s"]))
  failed = mc.account(ROW, SHAPE, "maxtext", {"failed": "exit 1: RESOURCE_EXHAUSTED", "wall_s": 30.0})
  lines = mc.format_table([lwjax, maxtext, failed]).splitlines()
  assert len(lines) == 5 and all(line.count("|") == 11 for line in lines), lines
  assert lines[2].startswith("| llama2_7b_v5p-8 | lwjax | 36.0 (20.0 + 16.0) | 923.9 (108.9) | 0.600 | 40.0 |")
  assert lines[3].startswith("| llama2_7b_v5p-8 | maxtext | 36.0 (20.0 + 16.0) | 923.9 (108.9) |")
  assert lines[2].endswith("| 220 |") and "failed: exit 1: RESOURCE_EXHAUSTED" in lines[4], lines


def test_a_maxtext_model_of_another_shape_is_named():
  shape = {"n_layers": 32, "n_heads": 32, "n_kv_heads": 32, "head_dim": 128, "d_model": 4096, "d_ff": 11008,
           "vocab_size": 32000}
  config = {"num_decoder_layers": 32, "num_query_heads": 32, "num_kv_heads": 32, "head_dim": 128, "emb_dim": 4096,
            "mlp_dim": 11008, "vocab_size": 32000}
  assert mc.shape_differences(shape, config) == []
  assert mc.shape_differences(shape, {**config, "mlp_dim": 14336}) == ["d_ff 11008 vs mlp_dim 14336"]


def test_an_instruction_spanning_lines_is_folded_into_one():
  hlo = """HloModule m, num_partitions=4

%body (p: (s32[])) -> (s32[]) {
  %p = (s32[]) parameter(0)
  %k = s32[] custom-call(), custom_call_target="tpu_custom_call", frontend_attributes={kernel_metadata={
"xprof_metadata":"{\\"block_q\\": 512}"
}}, metadata={op_name="splash"}
  ROOT %t = (s32[]) tuple(%k)
}, execution_thread="main"

ENTRY %main (a: s32[]) -> s32[] {
  ROOT %a = s32[] parameter(0)
}
"""
  module = hlo_text.parse_module(mc.fold_instructions(hlo))
  assert [ins.name for ins in module.computations["body"]] == ["p", "k", "t"]
  assert hlo_text.root(module.computations["body"]).name == "t"
  assert 'op_name="splash"' in module.instructions["k"].attrs


def test_without_maxtext_the_run_says_why_and_exits_0(tmp_path):
  result = subprocess.run([sys.executable, "-m", "benchmarks.maxtext_compare", "--rows", "none", "--venv",
                           str(tmp_path / "absent"), "--json_out", str(tmp_path / "out.json")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"MaxText unavailable: no venv at {tmp_path / 'absent'} (run with --install)" in result.stdout
  assert '"available": false' in (tmp_path / "out.json").read_text()


def test_a_python_that_does_not_run_or_is_too_old_is_refused(tmp_path):
  assert mc.find_python(str(tmp_path / "python3.12"), str(tmp_path), install=False) == (
      None, f"--python {tmp_path / 'python3.12'} does not run")
  if sys.version_info < (3, 12):  # the project's own interpreter
    assert mc.find_python(sys.executable, str(tmp_path), install=False) == (
        None, f"--python {sys.executable} is Python 3.{sys.version_info[1]}; MaxText needs >= 3.12")


def test_a_compile_runs_in_the_starting_environment_and_is_reused_only_when_asked(tmp_path, monkeypatch):
  """Importing jax here sets TPU_LIBRARY_PATH to this venv's libtpu; MaxText's compile must not inherit it."""
  monkeypatch.setenv("TPU_LIBRARY_PATH", "/lwjax/libtpu.so")
  out = tmp_path / "out.txt"
  command = [sys.executable, "-c", f"import os; open({str(out)!r}, 'a').write(str(os.environ.get('TPU_LIBRARY_PATH')))"]
  log, started_with = str(tmp_path / "run.log"), str(mc.START_ENV.get("TPU_LIBRARY_PATH"))
  assert mc._run(command, log, 60)[1] == "" and out.read_text() == started_with
  assert mc._run(command, log, 60, reuse=True)[1] == "" and out.read_text() == started_with  # not run again
  assert mc._run(command, log, 60)[1] == "" and out.read_text() == 2 * started_with
  failed = mc._run([sys.executable, "-c", "raise SystemExit('no such model')"], str(tmp_path / "bad.log"), 60)[1]
  assert failed == "exit 1: no such model"
