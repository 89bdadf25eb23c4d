"""The `gamengen_agent` job: trains GameNGen's PPO agent in ViZDoom, recording its play (arXiv 2408.14837, 4.1).

Each update collects `rollout_steps` steps of `num_envs` games, then runs PPO on them (`ppo.Learner`).
Checkpoints go to `<workdir>/checkpoints` every `train.checkpoint_every` updates and at the end; a run
restarted with the same workdir resumes from the latest (parameters, optimizer, update count; the games
start new episodes, seeded anew). With `record.enabled` every frame played is written to ArrayRecord
under `<workdir>/trajectories/from_update_<u>/` (one directory per start).

TensorBoard (`<workdir>/tensorboard`, x axis = env steps over all games) and `metrics.jsonl`:
`train/*` PPO losses, `episode/*` means over the episodes finished since the last log line (return in the
paper's points, each reward term, kills, new-area cells, length), `perf/env_steps_per_s`. At the end,
with `eval.episodes_per_env > 0`, the agent (its behaviour policy) and the uniform random policy (same
repeat probability) play fresh episodes; the means go to `<workdir>/eval.json` and the log.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax
from flax import nnx

from lwjax.config import ConfigError, Field, non_negative_int, positive_int, validate as validate_schema
from lwjax.projects.gamengen import agent as agent_lib, env as env_lib, ppo
from lwjax.projects.gamengen.record import RandomPolicy, TrajectoryWriter
from lwjax.projects.gamengen.rollout import RolloutCollector, evaluate
from lwjax.projects.gamengen.vector_env import VectorDoomEnv
from lwjax.training import checkpoint, mesh as mesh_lib, optim, progress, sharding

SCHEMA = {
    "job": Field(str), "seed": Field(int, min=0),
    "env": env_lib.SCHEMA, "model": agent_lib.SCHEMA, "ppo": ppo.SCHEMA, "optim": optim.SCHEMA,
    "train": {
        "log_every": positive_int("updates between log lines"),
        "checkpoint_every": positive_int("updates between checkpoints"),
        "keep_checkpoints": positive_int(),
        "async_checkpointing": Field(bool),
    },
    "record": {
        "enabled": Field(bool, doc="write every frame played in training to <workdir>/trajectories"),
        "shard_frames": positive_int("frames per ArrayRecord shard"),
    },
    "eval": {"episodes_per_env": non_negative_int("episodes per game for the final agent-vs-random "
                                                  "evaluation; 0 skips it")},
    "mesh": mesh_lib.SCHEMA,
}


def validate(config) -> None:
  """Schema, the env's WAD and map, and the rollout arithmetic; raises ConfigError naming the key."""
  validate_schema(config, SCHEMA)
  env_lib.check_config(config.env.to_dict(), prefix="env.")
  p = config.ppo
  samples = p.num_envs * p.rollout_steps
  if samples % p.batch_size:
    raise ConfigError("ppo.batch_size", f"{p.batch_size} does not divide a rollout's {samples} samples",
                      f"a divisor of ppo.num_envs * ppo.rollout_steps = {samples}")
  if p.total_env_steps < samples:
    raise ConfigError("ppo.total_env_steps", f"{p.total_env_steps} is less than one rollout",
                      f">= ppo.num_envs * ppo.rollout_steps = {samples}")


class _Log:
  """Log lines with env steps/s and ETA; TensorBoard scalars and metrics.jsonl rows, step = env steps.

  The first update (XLA compiles the policy and the PPO update) is timed on its own and left out of the
  rates; a live status bar runs between log lines where `progress.live_bar_enabled()`.
  """

  def __init__(self, workdir: str, *, total_updates: int, start_update: int, steps_per_update: int):
    from tensorboardX import SummaryWriter
    os.makedirs(workdir, exist_ok=True)
    self.total, self.steps_per_update = total_updates, steps_per_update
    self._writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115  writer held open, closed in close()
    self._last_update, self._last_time = start_update, time.perf_counter()
    self._compiles = progress.CompileWatch().__enter__()
    self._first = start_update < total_updates
    self._bar = progress.StatusBar(total_updates * steps_per_update, start_update * steps_per_update,
                                   "env step", "agent")
    if self._first:
      logging.info("update %d/%d: compiling the policy and the PPO update (XLA), then training",
                   start_update + 1, total_updates)

  def updated(self, update: int) -> None:
    """After every update: the first one's time and compilation are logged, and the bar moves."""
    if self._first:
      self._first = False
      seconds = time.perf_counter() - self._last_time
      logging.info("update %d: first update took %.1f s%s", update, seconds,
                   progress.compile_note(*self._compiles.since_last()))
      self._first_seconds = seconds
      self._last_update, self._last_time = update, time.perf_counter()
    self._bar.update(self.steps_per_update)

  def write(self, split: str, update: int, metrics: dict) -> None:
    step = update * self.steps_per_update
    for k, v in metrics.items():
      self._writer.add_scalar(f"{split}/{k}", v, step)
    self._jsonl.write(json.dumps({"split": split, "step": step, "update": update, **metrics}) + "\n")
    self._jsonl.flush()

  def update(self, update: int, train: dict, episodes: dict) -> None:
    now = time.perf_counter()
    if update == self._last_update:  # only the first update since the start: its time, compile included
      rate = self.steps_per_update / max(self._first_seconds, 1e-9)
    else:
      rate = (update - self._last_update) * self.steps_per_update / max(now - self._last_time, 1e-9)
    self._last_update, self._last_time = update, now
    self.write("train", update, train)
    if episodes:
      self.write("episode", update, episodes)
    self.write("perf", update, {"env_steps_per_s": rate})
    eta = int((self.total - update) * self.steps_per_update / max(rate, 1e-9))
    played = (f"return {episodes['return']:.0f} kills {episodes['kills']:.2f} cells {episodes['cells']:.1f} "
              f"({episodes['episodes']:.0f} episodes)" if episodes else "no episode finished")
    logging.info("update %d/%d env steps %d | %s | loss %.4f entropy %.3f kl %.4f | %.0f env steps/s | "
                 "eta %d:%02d:%02d%s", update, self.total, update * self.steps_per_update, played, train["loss"],
                 train["entropy"], train["approx_kl"], rate, eta // 3600, eta % 3600 // 60, eta % 60,
                 progress.compile_note(*self._compiles.since_last()))

  def close(self) -> None:
    self._bar.close()
    self._compiles.__exit__(None, None, None)
    self._writer.close()
    self._jsonl.close()


def run(config, workdir: str) -> dict:
  """Trains to `ppo.total_env_steps` (resuming from `workdir`), then evaluates; returns the evaluation."""
  env_cfg = env_lib.check_config(config.env.to_dict(), prefix="env.")
  model_cfg = agent_lib.AgentConfig.from_dict(config.model)
  mesh = mesh_lib.make_mesh(config.mesh.shape)
  learner = ppo.Learner(model_cfg, config.ppo, config.optim, mesh, sharding.rules_from_config(config.mesh.rules))
  p, train = config.ppo, config.train
  steps_per_update = p.num_envs * p.rollout_steps
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=train.keep_checkpoints,
                                 save_every=train.checkpoint_every, async_save=train.async_checkpointing)
  if ckpt.latest_step() is not None:
    update, state = ckpt.restore(learner.abstract_state)
  else:
    update, state = 0, learner.init_state(jax.random.key(config.seed))
  logging.info("gamengen agent: %s parameters, %d updates of %d env steps, from update %d",
               f"{sum(x.size for x in jax.tree.leaves(state['params'])):,}", learner.num_updates,
               steps_per_update, update)
  log = _Log(workdir, total_updates=learner.num_updates, start_update=update, steps_per_update=steps_per_update)
  # A resumed run plays new games: the engines' states are not checkpointed.
  env = VectorDoomEnv(dataclasses.replace(env_cfg, seed=env_cfg.seed + update * p.num_envs), p.num_envs)
  writer = None
  if config.record.enabled and update < learner.num_updates:
    writer = TrajectoryWriter(os.path.join(workdir, "trajectories", f"from_update_{update:06d}"), env_cfg,
                              p.num_envs, shard_frames=config.record.shard_frames)
  try:
    collector = RolloutCollector(env, learner, reward_scale=p.reward_scale, writer=writer)
    while update < learner.num_updates:
      collect_rng, update_rng = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), update))
      rollout = collector.collect(state["params"], collect_rng)
      state, metrics = learner.update(state, rollout, update_rng)
      update += 1
      log.updated(update)
      if update % train.log_every == 0 or update == learner.num_updates:
        log.update(update, metrics, collector.stats.pop_means())
      ckpt.save(update, state, config=config, force=update == learner.num_updates)
    ckpt.wait()
    if writer is not None:
      index, writer = writer.close(), None
      logging.info("recorded %d frames of %d episodes", index["num_frames"], len(index["episodes"]))
    result = {"update": update, "env_steps": update * steps_per_update}
    if config.eval.episodes_per_env:
      policies = {"agent": agent_lib.AgentPolicy(nnx.merge(learner.graphdef, state["params"]), p.repeat_prob,
                                                 seed=config.seed),
                  "random": RandomPolicy(config.seed, repeat_prob=p.repeat_prob)}
      for name, policy in policies.items():
        result[name] = evaluate(env, policy, config.eval.episodes_per_env)
        log.write(f"eval/{name}", update, result[name])
        logging.info("eval %s: return %.1f kills %.3f cells %.2f length %.1f over %d episodes", name,
                     result[name]["return"], result[name]["kills"], result[name]["cells"], result[name]["length"],
                     result[name]["episodes"])
      with open(os.path.join(workdir, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
  finally:
    if writer is not None:
      writer.close()
    env.close()
    ckpt.close()
    log.close()
  return result
