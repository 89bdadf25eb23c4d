"""GameNGen data: play a policy in DOOM and record every frame to ArrayRecord (arXiv 2408.14837, sec. 3.1).

  python main.py --config experiments/gamengen_record.py:scale=smoke --workdir runs/record_smoke    # seconds
  python main.py --config experiments/gamengen_record.py:scale=cpu --workdir runs/record_random
  python main.py --config experiments/gamengen_record.py:scale=cpu,policy=agent --workdir runs/record_agent \
      --config.policy.checkpoint=runs/agent_e1m1
  python main.py --config experiments/gamengen_record.py:scale=paper,policy=agent --workdir runs/record_paper \
      --config.policy.checkpoint=runs/agent_paper

Arguments: `scale` in smoke|cpu|paper; `policy` in random|scripted|agent (agent: a gamengen_agent run's
workdir in `policy.checkpoint`); `env` in e1m1|basic. The agent's training run records its own play too
(`record.enabled` of experiments/gamengen_agent.py), as the paper does; this job records a fixed policy.

- smoke: 300 frames of 2 games (E1M1, random policy), seconds.
- cpu: 100k frames of 8 games (about 3.5 GB at zstd level 1).
- paper: 8 games; frames as many as the paper's 70M training examples would need are not recorded here:
  10M frames (about 350 GB); raise `record.num_frames` on a disk that holds more.
"""

import ml_collections

from configs import common
from lwjax.projects.gamengen.env import BASIC, EnvConfig

SCALES = ("smoke", "cpu", "paper")
ENVS = {"e1m1": EnvConfig(), "basic": BASIC}
POLICIES = ("random", "scripted", "agent")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, choices={"scale": SCALES, "policy": POLICIES, "env": ENVS}, scale="smoke",
                          policy="random", env="e1m1")
  scale, policy, env = args["scale"], args["policy"], args["env"]
  config = ml_collections.ConfigDict()
  config.job = "gamengen_record"
  config.seed = 0
  config.env = ENVS[env].to_dict()
  # The scripted default walks forward and turns: the env tests' sequence (action ids of env.ACTIONS).
  config.policy = {"kind": policy, "repeat_prob": 0.25, "actions": [1, 1, 9, 10, 5, 11, 6, 3], "checkpoint": ""}
  config.record = {"num_envs": 8, "num_frames": 100_000, "shard_frames": 4096, "out_dir": ""}
  if scale == "smoke":
    config.record.update(num_envs=2, num_frames=300)
  elif scale == "paper":
    config.record.update(num_frames=10_000_000)
  return config
