"""Rollouts of GameNGen's agent in the vector env, episode statistics, and policy evaluation (arXiv 2408.14837, 4.1).

`RolloutCollector` plays the behaviour policy in a `VectorDoomEnv` for `rollout_steps` steps and returns the
time-major rollout `ppo.Learner.update` takes, optionally writing every frame to a `TrajectoryWriter` (the
paper trains its diffusion model on the agent's trajectories over the whole of its training).

Time limits are truncations, not terminal states: the episode's last state is valued and bootstrapped
from. The vector env has already reset such a game, so that state is rebuilt: the last frame the step
rendered, the automap seen when the action was chosen (the env returns no automap for a finished
episode; it changes little in one step), and the history including that action. A game whose worker
was restarted is treated the same way with the frame seen when the action was chosen.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from lwjax.projects.gamengen import agent as agent_lib
from lwjax.projects.gamengen.record import TrajectoryWriter
from lwjax.projects.gamengen.reward import REWARD_TERMS
from lwjax.projects.gamengen.vector_env import VectorDoomEnv

EPISODE_KEYS = ("return", "length", "kills", "cells", "timeout", *(f"term/{t}" for t in REWARD_TERMS))


class EpisodeStats:
  """Per-game running sums of the current episodes; `finished` holds one dict per ended episode."""

  def __init__(self, num_envs: int):
    self.sums = {k: np.zeros(num_envs) for k in ("return", "length", *(f"term/{t}" for t in REWARD_TERMS))}
    self.finished: list[dict[str, float]] = []  # EPISODE_KEYS and "env"

  def add(self, reward, done, info) -> None:
    self.sums["return"] += reward
    self.sums["length"] += 1
    for t in REWARD_TERMS:
      self.sums[f"term/{t}"] += info["terms"][t]
    for i in np.flatnonzero(done):
      episode = {k: float(v[i]) for k, v in self.sums.items()}
      episode.update(env=int(i), kills=float(info["kills"][i]), cells=float(info["cells"][i]),
                     timeout=float(info["timeout"][i]))
      self.finished.append(episode)
      for v in self.sums.values():
        v[i] = 0.0

  def pop_means(self) -> dict[str, float]:
    """Means over the episodes finished since the last call ({} if none), plus their count."""
    episodes, self.finished = self.finished, []
    if not episodes:
      return {}
    return {"episodes": float(len(episodes)), **{k: float(np.mean([e[k] for e in episodes])) for k in EPISODE_KEYS}}


class RolloutCollector:
  """Plays `learner`'s behaviour policy in `env`; `collect(params, rng)` returns one rollout (see ppo.py)."""

  def __init__(self, env: VectorDoomEnv, learner, *, reward_scale: float, writer: TrajectoryWriter | None = None):
    self.env, self.learner, self.reward_scale, self.writer = env, learner, reward_scale, writer
    self.cfg = learner.model_cfg
    self.history = agent_lib.ActionHistory(env.num_envs, self.cfg.history)
    self.stats = EpisodeStats(env.num_envs)
    self.obs = env.reset()
    if writer is not None:
      writer.begin(self.obs)

  def _images(self, obs) -> tuple[np.ndarray, np.ndarray]:
    return agent_lib.preprocess(obs["frame"], obs["automap"], self.cfg.image_pool)

  def collect(self, params, rng: jax.Array) -> dict[str, np.ndarray]:
    t_steps, n = self.learner.ppo.rollout_steps, self.env.num_envs
    h, w = self.cfg.image_hw
    rollout = {"frame": np.empty((t_steps, n, h, w, 3), np.uint8),
               "automap": np.empty((t_steps, n, h, w, 3), np.uint8),
               "history": np.empty((t_steps, n, self.cfg.history), np.int32)}
    for k, dtype in (("action", np.int32), ("log_prob", np.float32), ("value", np.float32),
                     ("reward", np.float32), ("next_value", np.float32), ("terminal", bool), ("done", bool)):
      rollout[k] = np.zeros((t_steps, n), dtype)
    bootstrap = np.zeros((t_steps, n), bool)  # steps whose next_value is filled here (truncations)
    for t, step_rng in enumerate(jax.random.split(rng, t_steps + 1)[:-1]):
      self.history.reset(self.obs["first"])
      frame, automap = self._images(self.obs)
      actions, log_probs, values = self.learner.act(params, frame, automap, self.history.actions_nk, step_rng)
      obs, reward, done, info = self.env.step(actions)
      if self.writer is not None:
        self.writer.add(actions, reward, done, info, obs)
      self.stats.add(reward, done, info)
      terminal = done & ~info["timeout"] & ~info["restarted"]
      truncated = done & ~terminal
      for k, v in (("frame", frame), ("automap", automap), ("history", self.history.actions_nk),
                   ("action", actions), ("log_prob", log_probs), ("value", values),
                   ("reward", reward * self.reward_scale), ("terminal", terminal), ("done", done)):
        rollout[k][t] = v
      self.history.push(actions)
      if truncated.any():
        rollout["next_value"][t] = self._last_state_values(params, self.obs, frame, info, step_rng)
        bootstrap[t] = truncated
      self.obs = obs
    self.history.reset(self.obs["first"])
    frame, automap = self._images(self.obs)
    last_values = self.learner.act(params, frame, automap, self.history.actions_nk, rng)[2]
    following = np.concatenate([rollout["value"][1:], last_values[None]])
    rollout["next_value"] = np.where(bootstrap, rollout["next_value"], following)
    return rollout

  def _last_state_values(self, params, obs, frame, info, rng: jax.Array) -> np.ndarray:
    """Values [N] of the states this step ended in, before the env's auto-reset (`obs` is the step's start)."""
    last_raw = info["frames"][np.arange(self.env.num_envs), np.maximum(info["num_frames"] - 1, 0)]
    last_frame, automap = self._images({"frame": last_raw, "automap": obs["automap"]})
    last_frame = np.where((info["num_frames"] > 0)[:, None, None, None], last_frame, frame)
    return self.learner.act(params, last_frame, automap, self.history.actions_nk, rng)[2]


def evaluate(env: VectorDoomEnv, policy: Callable[[dict], np.ndarray], episodes_per_env: int) -> dict[str, float]:
  """Plays `policy` from fresh episodes until every game finished `episodes_per_env`; returns the means over
  the first `episodes_per_env` of each game (so short episodes are not over-represented), and for each
  key `<key>_se`, the standard error of that mean."""
  stats, obs = EpisodeStats(env.num_envs), env.reset()
  while min(sum(e["env"] == i for e in stats.finished) for i in range(env.num_envs)) < episodes_per_env:
    obs, reward, done, info = env.step(policy(obs))
    stats.add(reward, done, info)
  kept = [e for i in range(env.num_envs) for e in [e for e in stats.finished if e["env"] == i][:episodes_per_env]]
  result = {"episodes": float(len(kept))}
  for key in EPISODE_KEYS:
    values = np.asarray([e[key] for e in kept], np.float64)
    result[key] = float(values.mean())
    result[f"{key}_se"] = float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
  return result
