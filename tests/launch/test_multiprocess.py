"""Multi-process runs: 2 processes x 4 CPU devices (jax.distributed, gloo) train as 1 process x 8 devices.

Each test starts `main.py` (or a small script) in subprocesses on localhost, so the processes hold their
own JAX runtime; every subprocess is killed in a `finally` and has a deadline, so a lost peer fails the
test with all the outputs instead of hanging it.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240
# fp32 throughout; the runs differ only in the order of the reductions (an all-reduce over gloo
# across 2 processes vs within 1), so the losses agree to a few ulps, not bit for bit.
LOSS_RTOL = 1e-5
STEPS = 6
SMOKE = ["main.py", "--config", "experiments/lm_pretrain.py:scale=smoke", "--config.train.log_every=1",
         f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=3", "--config.data.num_shards=2"]

# Each process feeds 4 rows holding its index; the gathered global batch shows where they landed.
_LAYOUT_SCRIPT = """
import json, sys
import numpy as np
from jax.experimental import multihost_utils
from configs import common, mesh as mesh_presets
from lwjax.data import pipeline
from lwjax.launch import distributed
from lwjax.training import mesh, sharding

process_id = int(sys.argv[2])
distributed.initialize(common.distributed(coordinator_address=sys.argv[1], num_processes=2, process_id=process_id))
for shape in [(8, 1, 1), (2, 2, 2), (1, 4, 2)]:
  preset = mesh_presets.get(*shape)
  batch_sharding = sharding.batch_sharding(mesh.make_mesh(preset.shape), sharding.rules_from_config(preset.rules))
  rows = pipeline.global_batch({"rows": np.full((4, 3), process_id, np.int32)}, batch_sharding)["rows"]
  print("LAYOUT", json.dumps([shape, multihost_utils.process_allgather(rows, tiled=True)[:, 0].tolist()]))
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _distributed_flags(port: int, process_id: int) -> list[str]:
  return ["--config.distributed.initialize=True", f"--config.distributed.coordinator_address=localhost:{port}",
          "--config.distributed.num_processes=2", f"--config.distributed.process_id={process_id}"]


def _run_together(commands: list[list[str]], devices: int, log_dir: Path) -> list[str]:
  """Runs `sys.executable *command` for each command at once from the repo root; returns their outputs.

  Fails, printing every output, when one exits non-zero or they do not all finish within TIMEOUT_S.
  """
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  log_dir.mkdir(parents=True, exist_ok=True)
  logs = [log_dir / f"process_{i}.log" for i in range(len(commands))]
  procs = []
  try:
    for command, log in zip(commands, logs, strict=True):
      with open(log, "w") as out:  # a file, not a pipe: a full pipe would block one peer and hang both
        procs.append(subprocess.Popen([sys.executable, *command], cwd=ROOT, env=env, stdout=out,
                                      stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT_S
    for proc in procs:
      proc.wait(timeout=max(deadline - time.monotonic(), 1))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  outputs = [log.read_text() for log in logs]
  codes = [proc.returncode for proc in procs]
  if any(codes):
    report = "\n".join(f"===== process {i}: exit code {c} (-9: killed after {TIMEOUT_S} s) =====\n{o}"
                       for i, (c, o) in enumerate(zip(codes, outputs, strict=True)))
    pytest.fail(f"subprocesses failed: {' '.join(commands[0])}\n{report}", pytrace=False)
  return outputs


def _train_records(workdir: Path) -> list[dict]:
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  return [r for r in map(json.loads, lines) if r["split"] == "train"]


def _data_state(workdir: Path, step: int, process: int, count: int) -> dict:
  return json.loads((workdir / "checkpoints" / str(step) / "data" / f"process_{process}-of-{count}.json").read_text())


def test_process_local_batches_fill_the_global_batch_in_process_order(tmp_path):
  """Process p's local rows are global rows [4p, 4p + 4): the order `make_lm_dataset` concatenates shards."""
  port = _free_port()
  outputs = _run_together([["-c", _LAYOUT_SCRIPT, f"localhost:{port}", str(i)] for i in range(2)], devices=4,
                          log_dir=tmp_path)
  for output in outputs:
    layouts = [json.loads(line.split(" ", 1)[1]) for line in output.splitlines() if line.startswith("LAYOUT ")]
    assert len(layouts) == 3, output
    for shape, rows in layouts:
      assert rows == [0] * 4 + [1] * 4, f"mesh {shape}: global rows came from processes {rows}"


def test_two_processes_train_like_one_and_resume_exactly(tmp_path):
  multi, single = tmp_path / "two_processes", tmp_path / "one_process"
  port = _free_port()
  _run_together([[*SMOKE, f"--workdir={multi}", *_distributed_flags(port, i)] for i in range(2)], devices=4,
                log_dir=tmp_path / "logs_two")
  _run_together([[*SMOKE, f"--workdir={single}"]], devices=8, log_dir=tmp_path / "logs_one")

  multi_train, single_train = _train_records(multi), _train_records(single)
  # Each step once: only process 0 writes metrics.jsonl (and TensorBoard, metrics.json).
  assert [r["step"] for r in multi_train] == [r["step"] for r in single_train] == list(range(1, STEPS + 1))
  np.testing.assert_allclose([r["loss"] for r in multi_train], [r["loss"] for r in single_train], rtol=LOSS_RTOL)
  assert len(os.listdir(multi / "tensorboard")) == 1
  assert json.loads((multi / "metrics.json").read_text())["step"] == STEPS

  # Orbax wrote one shared checkpoint, the data position once per process; 1 process with 2 shards
  # stands at the same place in both shards.
  for step in (3, STEPS):
    assert (multi / "checkpoints" / str(step) / "state").is_dir()
    assert _data_state(single, step, 0, 1) == {"shards": [_data_state(multi, step, i, 2) for i in range(2)]}

  # Resume both processes from the step-3 checkpoint: steps 4..6 repeat exactly.
  shutil.rmtree(multi / "checkpoints" / str(STEPS))
  port = _free_port()
  _run_together([[*SMOKE, f"--workdir={multi}", *_distributed_flags(port, i)] for i in range(2)], devices=4,
                log_dir=tmp_path / "logs_resumed")
  resumed = _train_records(multi)[STEPS:]
  assert [r["step"] for r in resumed] == list(range(4, STEPS + 1))
  assert [r["loss"] for r in resumed] == [r["loss"] for r in multi_train[3:]]
