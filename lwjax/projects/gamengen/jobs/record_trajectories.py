"""The `gamengen_record` job: plays a policy in ViZDoom and writes every frame to ArrayRecord (arXiv 2408.14837, 3.1).

Policies (`policy.kind`): `random` (uniform, repeating the previous action with `policy.repeat_prob`),
`scripted` (the action ids of `policy.actions` in turn), `agent` (the latest checkpoint of a
`gamengen_agent` run in `policy.checkpoint`, acting with its behaviour policy and `policy.repeat_prob`).
Shards and `index.json` go to `record.out_dir` (default `<workdir>/trajectories`); see `record.py`.
"""

from __future__ import annotations

import logging
import os

from lwjax.config import ConfigError, Field, positive_int, validate as validate_schema
from lwjax.projects.gamengen import agent as agent_lib, env as env_lib, record

POLICIES = ("random", "scripted", "agent")


def _check_actions(actions) -> str | None:
  if not all(isinstance(a, int) and 0 <= a < env_lib.NUM_ACTIONS for a in actions):
    return f"{list(actions)!r} holds ids outside [0, {env_lib.NUM_ACTIONS})"
  return None


SCHEMA = {
    "job": Field(str), "seed": Field(int, min=0), "env": env_lib.SCHEMA,
    "policy": {
        "kind": Field(str, choices=POLICIES),
        "repeat_prob": Field(float, min=0.0, max=0.99, doc="chance to repeat the previous action (random, agent)"),
        "actions": Field((list, tuple), check=_check_actions, doc="action ids played in turn (scripted)"),
        "checkpoint": Field(str, doc="workdir of a gamengen_agent run (agent)"),
    },
    "record": {
        "num_envs": positive_int("games played in parallel"),
        "num_frames": positive_int("frames to write (at least)"),
        "shard_frames": positive_int("frames per ArrayRecord shard"),
        "out_dir": Field(str, doc="output directory; empty = <workdir>/trajectories"),
    },
}


def validate(config) -> None:
  """Schema, the env's WAD and map, and what the policy needs; raises ConfigError naming the key."""
  validate_schema(config, SCHEMA)
  env_lib.check_config(config.env.to_dict(), prefix="env.")
  policy = config.policy
  if policy.kind == "scripted" and not policy.actions:
    raise ConfigError("policy.actions", "empty for a scripted policy", "a list of action ids")
  if policy.kind == "agent" and not os.path.isdir(os.path.join(policy.checkpoint, "checkpoints")):
    raise ConfigError("policy.checkpoint", f"{policy.checkpoint!r} holds no checkpoints/",
                      "the workdir of a gamengen_agent run")


def make_policy(config) -> record.Policy:
  policy = config.policy
  if policy.kind == "random":
    return record.RandomPolicy(config.seed, repeat_prob=policy.repeat_prob)
  if policy.kind == "scripted":
    return record.ScriptedPolicy(list(policy.actions))
  try:
    model, _, step = agent_lib.load_agent(policy.checkpoint)
  except FileNotFoundError as e:
    raise ConfigError("policy.checkpoint", str(e), "the workdir of a gamengen_agent run") from None
  logging.info("recording with the agent of %s at update %d", policy.checkpoint, step)
  return agent_lib.AgentPolicy(model, policy.repeat_prob, seed=config.seed)


def run(config, workdir: str) -> dict:
  """Records `record.num_frames` frames; returns the index (also written as index.json)."""
  out_dir = config.record.out_dir or os.path.join(workdir, "trajectories")
  index = record.record(env_lib.check_config(config.env.to_dict(), prefix="env."), make_policy(config),
                        config.record.num_frames, out_dir, num_envs=config.record.num_envs,
                        shard_frames=config.record.shard_frames)
  logging.info("recorded %d frames of %d episodes in %d shards to %s", index["num_frames"], len(index["episodes"]),
               len(index["shards"]), out_dir)
  return index
