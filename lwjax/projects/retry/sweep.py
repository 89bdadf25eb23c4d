"""The retry sweep as one resumable command (Physics of LMs 2.2, arXiv 2408.16293, Results 2-8): every arm
of `experiments/igsm_retry.py` at one scale, each in its own workdir under `--root`, in subprocesses;
an arm with a `metrics.json` (in its workdir or in `--archive`) is skipped and an interrupted one resumes
from its checkpoints, so the command can be stopped and started again across sessions. Ends with the
report table.

  nohup python -m lwjax.projects.retry.sweep --scale cpu --root runs/igsm_retry_cpu \
      --archive results/igsm_retry_cpu --workers 2 > runs/igsm_retry_cpu.log 2>&1 &
  python -m lwjax.projects.retry.report results/igsm_retry_cpu

`--workers N` runs N arms at once, each pinned to its own share of the CPU cores (on 2 cores, two arms
pinned one core each train 1.5x more tokens/s in all than one arm on both: small matmuls do not scale
across XLA:CPU's threads). `--archive DIR` copies each finished arm's small result files (`metrics.json`,
`curve.jsonl`, `run.log`; not the checkpoints) to `DIR/<arm>/`, a folder meant to be
committed, so that a fresh checkout knows which arms are done. The finetuning arms (lora, full) start
from the r = 0 arm's checkpoint under `--root`; where it is missing (a fresh checkout) r0 is trained
again first.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import threading
import time

from lwjax.projects.retry import report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
# (run, seed) in priority order: the trend's arms, the finetuning arms (right after the r0 they start
# from), the second seeds, then the ablations and more rates.
ARMS = (("r0", 0), ("r0.5", 0), ("lora", 0), ("full", 0), ("r0.1", 0), ("r0", 1), ("r0.5", 1),
        ("mask0.5", 0), ("weak0.5", 0), ("r0.2", 0), ("r0.05", 0))
FINETUNE_RUNS = ("lora", "full")
ARCHIVED_FILES = ("metrics.json", "curve.jsonl", "run.log")


def arm_name(run: str, seed: int) -> str:
  return run if seed == 0 else f"{run}_s{seed}"


def parse_arm(name: str) -> tuple[str, int]:
  run, sep, seed = name.rpartition("_s")
  if sep and seed.isdigit():
    return run, int(seed)
  return name, 0


def _done(name: str, root: str, archive: str) -> bool:
  return any(d and os.path.isfile(os.path.join(d, name, "metrics.json")) for d in (root, archive))


def _has_checkpoint(workdir: str) -> bool:
  ckpt = os.path.join(workdir, "checkpoints")
  return os.path.isdir(ckpt) and any(entry.isdigit() for entry in os.listdir(ckpt))


def run_arm(scale: str, run: str, seed: int, root: str, extra: list[str], cpus: set[int] | None = None) -> int:
  workdir = os.path.join(root, arm_name(run, seed))
  arg = f"scale={scale},run={run},seed={seed},base={os.path.join(root, 'r0')}"
  command = [sys.executable, os.path.join(ROOT, "main.py"), "--config",
             os.path.join(ROOT, "experiments", "igsm_retry.py") + ":" + arg, "--workdir", workdir, *extra]
  os.makedirs(workdir, exist_ok=True)
  preexec = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
  with open(os.path.join(workdir, "run.log"), "a") as log:
    return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, preexec_fn=preexec).returncode


def archive_arm(name: str, root: str, archive: str) -> None:
  os.makedirs(os.path.join(archive, name), exist_ok=True)
  for filename in ARCHIVED_FILES:
    src = os.path.join(root, name, filename)
    if os.path.isfile(src):
      shutil.copyfile(src, os.path.join(archive, name, filename))


def plan(arms, root: str, archive: str) -> list[str]:
  """The arm names still to run, in order; r0 first when a finetuning arm needs its missing checkpoint."""
  todo = [arm_name(run, seed) for run, seed in arms if not _done(arm_name(run, seed), root, archive)]
  if any(name in FINETUNE_RUNS for name in todo) and not _has_checkpoint(os.path.join(root, "r0")):
    todo = ["r0"] + [name for name in todo if name != "r0"]
  return todo


def _cpu_shares(workers: int) -> list[set[int] | None]:
  if workers <= 1:
    return [None]
  cpus = sorted(os.sched_getaffinity(0))
  if len(cpus) < workers:
    raise ValueError(f"--workers {workers}: only {len(cpus)} CPUs available; use at most that many workers")
  return [set(cpus[i::workers]) for i in range(workers)]


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--scale", default="cpu", choices=("smoke", "cpu", "gpu", "paper"))
  parser.add_argument("--root", required=True, help="one workdir per arm below it")
  parser.add_argument("--archive", default="", help="copy each finished arm's result files to ARCHIVE/<arm>/")
  parser.add_argument("--arms", default="", help="comma-separated run[_sSEED] names (default: all, in order)")
  parser.add_argument("--workers", type=int, default=1, help="arms run at once, each pinned to its own cores")
  args, extra = parser.parse_known_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  arms = tuple(parse_arm(name) for name in args.arms.split(",")) if args.arms else ARMS
  todo = plan(arms, args.root, args.archive)
  logging.info("sweep: %d of %d arms to run: %s", len(todo), len(arms), ", ".join(todo) or "none")
  lock = threading.Lock()
  running: set[str] = set()
  failures: list[str] = []

  def next_arm() -> str | None:
    """The first runnable arm (a finetuning arm waits while r0 is still training); None when all are taken."""
    while True:
      with lock:
        if not todo or failures:
          return None
        for name in todo:
          if name in FINETUNE_RUNS and ("r0" in running or "r0" in todo):
            continue
          todo.remove(name)
          running.add(name)
          return name
      time.sleep(5)

  def worker(cpus: set[int] | None) -> None:
    while (name := next_arm()) is not None:
      run, seed = parse_arm(name)
      start = time.time()
      logging.info("%s: running on cpus %s (log: %s)", name, sorted(cpus) if cpus else "all",
                   os.path.join(args.root, name, "run.log"))
      code = run_arm(args.scale, run, seed, args.root, extra, cpus)
      logging.info("%s: exit %d after %.1f min", name, code, (time.time() - start) / 60)
      with lock:
        running.discard(name)
        if code:
          failures.append(name)
        elif args.archive:
          archive_arm(name, args.root, args.archive)

  threads = [threading.Thread(target=worker, args=(cpus,)) for cpus in _cpu_shares(args.workers)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  if failures:
    logging.error("sweep: %s failed; see its run.log", ", ".join(failures))
    return 1
  print(report.table(report.load_runs(args.archive or args.root)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
