"""ViZDoom environment throughput (frames/s) of GameNGen's E1M1 game with 1, 2 and 8 worker processes.

  python -m benchmarks.doom_env
  python -m benchmarks.doom_env --workers 1,2,4,8,16 --steps 400

Times `VectorDoomEnv.step` with uniform random actions (after `--warmup` steps, worker start-up excluded):
frames/s counts every rendered tic frame of every game (4 per game per step), the frames a recorder keeps,
as they arrive in the parent process (shared memory, copied out). The ratio line compares each worker
count with 1 worker measured in the same run; throughput can only grow with workers up to the CPU cores
this process may use, which the header prints. The row `in-proc` is one DoomEnv stepped in this process, a
reference for the cost of the workers' pipes and copies.
"""

import os
import sys
import time

import numpy as np
from absl import app, flags

from lwjax.projects.gamengen.env import NUM_ACTIONS, DoomEnv, EnvConfig
from lwjax.projects.gamengen.vector_env import VectorDoomEnv

_WORKERS = flags.DEFINE_string("workers", "1,2,8", "Comma-separated worker counts.")
_STEPS = flags.DEFINE_integer("steps", 200, "Timed vector steps per worker count.")
_WARMUP = flags.DEFINE_integer("warmup", 10, "Untimed vector steps per worker count.")


def measure_in_process() -> dict:
  """One DoomEnv in this process: the game alone, no pipes or shared memory."""
  rng, env = np.random.default_rng(0), DoomEnv(EnvConfig())
  env.reset()
  frames, start = 0, time.perf_counter()
  for _ in range(_STEPS.value):
    _, _, done, info = env.step(int(rng.integers(0, NUM_ACTIONS)))
    frames += info["num_frames"]
    if done:
      env.reset()
  seconds = time.perf_counter() - start
  env.close()
  return {"frames_per_s": frames / seconds, "step_ms": seconds / _STEPS.value * 1e3}


def measure(num_envs: int) -> dict:
  rng = np.random.default_rng(0)
  with VectorDoomEnv(EnvConfig(), num_envs) as env:
    env.reset()
    for _ in range(_WARMUP.value):
      env.step(rng.integers(0, NUM_ACTIONS, num_envs))
    frames, start = 0, time.perf_counter()
    for _ in range(_STEPS.value):
      _, _, _, info = env.step(rng.integers(0, NUM_ACTIONS, num_envs))
      frames += int(info["num_frames"].sum())
    seconds = time.perf_counter() - start
  return {"frames_per_s": frames / seconds, "step_ms": seconds / _STEPS.value * 1e3}


def main(argv):
  del argv
  counts = [int(w) for w in _WORKERS.value.split(",")]
  cores = len(os.sched_getaffinity(0))
  print(f"host: {cores} CPU cores usable ({os.cpu_count()} in the machine), load average "
        f"{os.getloadavg()[0]:.1f} at start; E1M1 320x240, 4 tics per step; {_STEPS.value} timed steps"
        + (f"; more workers than {cores} cores share them" if max(counts) > cores else ""))
  print(f"{'workers':>8} {'frames/s':>10} {'per worker':>11} {'step ms':>9}")
  results = {}
  for n in counts:
    r = results[n] = measure(n)
    print(f"{n:>8} {r['frames_per_s']:>10,.0f} {r['frames_per_s'] / n:>11,.0f} {r['step_ms']:>9.2f}")
  r = measure_in_process()
  print(f"{'in-proc':>8} {r['frames_per_s']:>10,.0f} {r['frames_per_s']:>11,.0f} "
        f"{r['step_ms']:>9.2f}")
  if len(counts) > 1:
    base = counts[0]
    ratios = ", ".join(f"{n}: {results[n]['frames_per_s'] / results[base]['frames_per_s']:.2f}x" for n in counts[1:])
    print(f"ratio (frames/s vs {base} worker{'s' if base > 1 else ''}): {ratios}")
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
