"""The retry sweep as one resumable command (Physics of LMs 2.2, arXiv 2408.16293, Results 2-8): every arm
of `experiments/igsm_retry.py` at one scale, each in its own workdir under `--root`, one after another in
subprocesses; an arm with a `metrics.json` is skipped and an interrupted one resumes from its checkpoints,
so the command can be stopped and started again across sessions. Ends with the report table.

  nohup python -m lwjax.projects.retry.sweep --scale cpu --root runs/igsm_retry_cpu > sweep.log 2>&1 &
  python -m lwjax.projects.retry.report runs/igsm_retry_cpu
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time

from lwjax.projects.retry import report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
# (run, seed) in priority order: the trend's arms with two seeds first, then the ablations, then more rates.
ARMS = (("r0", 0), ("r0.5", 0), ("r0.1", 0), ("r0", 1), ("r0.5", 1), ("mask0.5", 0), ("weak0.5", 0),
        ("lora", 0), ("full", 0), ("r0.2", 0), ("r0.05", 0))


def arm_name(run: str, seed: int) -> str:
  return run if seed == 0 else f"{run}_s{seed}"


def run_arm(scale: str, run: str, seed: int, root: str, extra: list[str]) -> int:
  workdir = os.path.join(root, arm_name(run, seed))
  arg = f"scale={scale},run={run},seed={seed},base={os.path.join(root, 'r0')}"
  command = [sys.executable, os.path.join(ROOT, "main.py"), "--config",
             os.path.join(ROOT, "experiments", "igsm_retry.py") + ":" + arg, "--workdir", workdir, *extra]
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "run.log"), "a") as log:
    return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--scale", default="cpu", choices=("smoke", "cpu", "gpu", "paper"))
  parser.add_argument("--root", required=True, help="one workdir per arm below it")
  parser.add_argument("--arms", default="", help="comma-separated run[_sSEED] names (default: all, in order)")
  args, extra = parser.parse_known_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  arms = ARMS
  if args.arms:
    wanted = args.arms.split(",")
    arms = tuple((name.split("_s")[0], int(name.split("_s")[1]) if "_s" in name else 0) for name in wanted)
  for i, (run, seed) in enumerate(arms):
    name = arm_name(run, seed)
    if os.path.isfile(os.path.join(args.root, name, "metrics.json")):
      logging.info("[%d/%d] %s: done, skipped", i + 1, len(arms), name)
      continue
    start = time.time()
    logging.info("[%d/%d] %s: running (log: %s)", i + 1, len(arms), name, os.path.join(args.root, name, "run.log"))
    code = run_arm(args.scale, run, seed, args.root, extra)
    logging.info("[%d/%d] %s: exit %d after %.1f min", i + 1, len(arms), name, code, (time.time() - start) / 60)
    if code:
      return code
  print(report.table(report.load_runs(args.root)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
