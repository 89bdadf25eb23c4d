"""N ViZDoom games in worker processes behind one batched step: GameNGen's 8 parallel games (arXiv 2408.14837, 4.1).

`VectorDoomEnv(config, num_envs).step(actions [N]) -> (obs, reward [N], done [N], info)` with auto-reset:
when game i's episode ends, `info` holds the frames of its last step and `obs` already shows the first
frame of its next episode (`obs["first"][i]` is True).

Frames travel through shared memory (ctypes RawArrays handed to the workers at spawn), so only a few
numbers go through each worker's pipe. Workers are started with "spawn" (or "forkserver"): forking a
process that runs JAX is unsafe. ViZDoom runs its engine as a child process of the worker that outlives a
killed worker, so each worker leads its own process group and a restart kills the whole group.

A worker that dies (killed process, pipe EOF), raises, or does not answer within `step_timeout_s` is
restarted with a warning, under a new seed; its game reports `done` (an episode cut short, `info["restarted"]`)
with no frames for that step. A worker that fails `max_failures` times in a row raises RuntimeError
instead of looping.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback

import numpy as np

from lwjax.projects.gamengen.env import AUTOMAP_SHAPE, FRAME_SHAPE, NUM_ACTIONS, DoomEnv, EnvConfig, check_config
from lwjax.projects.gamengen.reward import REWARD_TERMS

_POLL_S = 0.2  # how often a waiting parent checks that the worker is alive


def _views(buffers, num_envs: int, tics: int) -> dict[str, np.ndarray]:
  """numpy views of the shared buffers: frames [N, tics, 240, 320, 3], frame [N, 240, 320, 3], automap."""
  return {"frames": np.frombuffer(buffers["frames"], np.uint8).reshape(num_envs, tics, *FRAME_SHAPE),
          "frame": np.frombuffer(buffers["frame"], np.uint8).reshape(num_envs, *FRAME_SHAPE),
          "automap": np.frombuffer(buffers["automap"], np.uint8).reshape(num_envs, *AUTOMAP_SHAPE)}


def _worker(conn, config_dict: dict, seed: int, buffers, num_envs: int, index: int) -> None:
  """Runs game `index`: answers ("reset",) and ("step", action) until ("close",) or a closed pipe."""
  os.setsid()  # own process group: the parent can kill the ViZDoom engine along with this worker
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwind so that the game (and engine) is closed
  config = EnvConfig.from_dict(config_dict)
  views = _views(buffers, num_envs, config.tics_per_action)
  env = None
  try:
    env = DoomEnv(config, seed)
    while True:
      command, *args = conn.recv()
      if command == "close":
        break
      if command == "reset":
        obs, reply = env.reset(), {}
      else:
        obs, reward, done, info = env.step(args[0], frames_out=views["frames"][index])
        reply = {"reward": reward, "done": done, "num_frames": info["num_frames"], "terms": info["terms"],
                 "timeout": info["timeout"], "kills": info["kills"], "cells": info["cells"]}
        if done:
          obs = env.reset()
      views["frame"][index], views["automap"][index] = obs["frame"], obs["automap"]
      conn.send(("ok", reply))
  except (EOFError, KeyboardInterrupt):
    pass
  except Exception:  # reported, then the parent restarts this worker
    conn.send(("error", traceback.format_exc()))
  finally:
    if env is not None:
      env.close()


class VectorDoomEnv:
  """`num_envs` DoomEnvs in worker processes; game i is seeded `config.seed + i` (then anew per restart).

  Call `reset()` first; `close()` (or use it as a context manager) ends the workers and their engines.
  """

  def __init__(self, config: EnvConfig, num_envs: int, *, step_timeout_s: float = 60.0,
               start_timeout_s: float = 180.0, max_failures: int = 3, start_method: str = "spawn"):
    self.config = check_config(config)
    self.num_envs, self.step_timeout_s, self.start_timeout_s = num_envs, step_timeout_s, start_timeout_s
    self.max_failures = max_failures
    self._ctx = mp.get_context(start_method)
    tics = self.config.tics_per_action
    sizes = {"frames": num_envs * tics * int(np.prod(FRAME_SHAPE)), "frame": num_envs * int(np.prod(FRAME_SHAPE)),
             "automap": num_envs * int(np.prod(AUTOMAP_SHAPE))}
    self._buffers = {k: self._ctx.RawArray("B", n) for k, n in sizes.items()}
    self._views = _views(self._buffers, num_envs, tics)
    self._processes: list = [None] * num_envs
    self._conns: list = [None] * num_envs
    self._starts = [0] * num_envs  # workers started per game, for fresh seeds
    self._failures = [0] * num_envs  # failures in a row
    self._first = np.ones(num_envs, bool)
    self._reset_done = False
    for i in range(num_envs):
      self._spawn(i)

  @property
  def worker_pids(self) -> list[int]:
    return [p.pid for p in self._processes]

  def _spawn(self, i: int) -> None:
    parent, child = self._ctx.Pipe()
    seed = self.config.seed + i + self.num_envs * self._starts[i]
    process = self._ctx.Process(target=_worker, name=f"doom-{i}", daemon=True,
                                args=(child, self.config.to_dict(), seed, self._buffers, self.num_envs, i))
    process.start()
    child.close()
    self._processes[i], self._conns[i] = process, parent
    self._starts[i] += 1

  def _kill(self, i: int) -> None:
    process = self._processes[i]
    try:
      os.killpg(process.pid, signal.SIGKILL)  # the worker and its ViZDoom engine
    except (ProcessLookupError, PermissionError):
      process.kill()
    process.join(timeout=10)
    self._conns[i].close()

  def _receive(self, i: int, timeout_s: float) -> dict | None:
    """Game i's reply, or None after restarting it (it died, timed out or raised); a new worker is reset."""
    conn, process = self._conns[i], self._processes[i]
    deadline = time.monotonic() + timeout_s
    try:
      # The ViZDoom engine inherits the worker's pipe ends (and its sentinel), so a killed worker gives no
      # EOF while the engine lives: its exit is polled for between short waits.
      while not conn.poll(min(_POLL_S, max(0.0, deadline - time.monotonic()))):
        if not process.is_alive():
          raise EOFError
        if time.monotonic() >= deadline:
          raise TimeoutError
      status, reply = conn.recv()
      if status == "ok":
        return reply
      why = f"raised:\n{reply}"
    except TimeoutError:
      why = f"gave no answer in {timeout_s:.0f} s"
    except (EOFError, OSError) as e:
      why = f"died ({type(e).__name__}, exit code {process.exitcode})"
    self._restart(i, why)
    return None

  def _restart(self, i: int, why: str) -> None:
    self._failures[i] += 1
    if self._failures[i] > self.max_failures:
      self.close()
      raise RuntimeError(f"Doom worker {i} failed {self._failures[i]} times in a row; last: it {why}")
    logging.warning("Doom worker %d (pid %d) %s; restarting it", i, self._processes[i].pid, why)
    self._kill(i)
    self._spawn(i)
    self._conns[i].send(("reset",))
    self._receive(i, self.start_timeout_s)  # a failure here restarts it again

  def reset(self) -> dict[str, np.ndarray]:
    """Starts a new episode in every game; returns the observation (see `step`)."""
    for conn in self._conns:
      conn.send(("reset",))
    for i in range(self.num_envs):
      self._receive(i, self.start_timeout_s)
    self._first[:] = True
    self._reset_done = True
    return self._observation()

  def _observation(self) -> dict[str, np.ndarray]:
    return {"frame": self._views["frame"].copy(), "automap": self._views["automap"].copy(),
            "first": self._first.copy()}

  def step(self, actions) -> tuple[dict, np.ndarray, np.ndarray, dict]:
    """Holds actions [N] (ids of env.ACTIONS) for `tics_per_action` tics in every game.

    Returns obs {"frame": uint8 [N, 240, 320, 3], "automap": uint8 [N, 120, 160, 3], "first": bool [N]}
    (the next episode's first observation where done), reward float32 [N], done bool [N], and info:
    "frames" uint8 [N, tics, 240, 320, 3], the frame after each tic of this step; "num_frames" int32 [N],
    how many of them are real (fewer when an episode ended mid-action, the rest repeating the last one;
    none for a restarted game);
    "terms" {term: float32 [N]}; "timeout" bool [N] (ended at the time limit); "restarted" bool [N];
    "kills" float32 [N] and "cells" int32 [N], kills and new-area cells of the episode so far.
    """
    if not self._reset_done:
      raise RuntimeError("VectorDoomEnv.step before reset()")
    actions = np.asarray(actions)
    if actions.shape != (self.num_envs,) or not np.all((actions >= 0) & (actions < NUM_ACTIONS)):
      raise ValueError(f"actions must be [{self.num_envs}] ids in [0, {NUM_ACTIONS}), got {actions!r}")
    for i, conn in enumerate(self._conns):
      with contextlib.suppress(OSError):  # a dead worker; its receive restarts it
        conn.send(("step", int(actions[i])))
    n = self.num_envs
    reward, done = np.zeros(n, np.float32), np.zeros(n, bool)
    info = {"num_frames": np.zeros(n, np.int32), "terms": {t: np.zeros(n, np.float32) for t in REWARD_TERMS},
            "timeout": np.zeros(n, bool), "restarted": np.zeros(n, bool), "kills": np.zeros(n, np.float32),
            "cells": np.zeros(n, np.int32)}
    for i in range(n):
      reply = self._receive(i, self.step_timeout_s)
      if reply is None:
        done[i] = info["restarted"][i] = True
        continue
      self._failures[i] = 0
      reward[i], done[i] = reply["reward"], reply["done"]
      for key in ("num_frames", "timeout", "kills", "cells"):
        info[key][i] = reply[key]
      for t in REWARD_TERMS:
        info["terms"][t][i] = reply["terms"][t]
    info["frames"] = self._views["frames"].copy()
    self._first = done.copy()
    return self._observation(), reward, done, info

  def close(self) -> None:
    for conn in self._conns:
      with contextlib.suppress(OSError):
        conn.send(("close",))
    for i, process in enumerate(self._processes):
      process.join(timeout=10)
      if process.exitcode is None:
        self._kill(i)
      else:
        self._conns[i].close()

  def __enter__(self) -> VectorDoomEnv:
    return self

  def __exit__(self, *exc) -> None:
    self.close()
