"""GameNGen phase one: a PPO agent plays DOOM and its play becomes the diffusion model's data (arXiv 2408.14837, 4.1).

  python main.py --config experiments/gamengen_agent.py:scale=smoke --workdir runs/agent_smoke      # seconds
  python main.py --config experiments/gamengen_agent.py:scale=cpu,env=basic --workdir runs/agent_basic
  python main.py --config experiments/gamengen_agent.py:scale=cpu --workdir runs/agent_e1m1        # 2 cores
  python main.py --config experiments/gamengen_agent.py:scale=paper --workdir runs/agent_paper     # one GPU

Arguments: `scale` in smoke|cpu|paper; `env` in e1m1|basic (Freedoom E1M1 as in the paper, or the vizdoom
wheel's basic.cfg room: one monster, episodes of 300 tics). Overrides: `--config.ppo.total_env_steps=...`.

- smoke: 2 games, episodes of 50 steps, 2 updates of 32 steps, a narrow net at 80x60; records; seconds.
- cpu: 8 games, 128 steps per rollout, 4 epochs of batch-256 minibatches, 80x60 images, entropy 0.01,
  lr 2.5e-4; 100 updates of 1024 env steps (basic, ~40 min) or 200 (E1M1, ~1 h 15 min) on 2 cores, then
  80 (basic) or 16 (E1M1) evaluation episodes per policy (agent, random).
- paper: the paper's agent (160x120, 8 games, rollout 512, gamma 0.99, entropy 0.1, batch 64, 10 epochs,
  lr 1e-4) for 10M env steps, recording every frame. The paper (sec. 4.1) trains 10M env steps; for
  a longer run set e.g. `--config.ppo.total_env_steps=50000000`.

Choices the paper leaves open: SB3 defaults (GAE lambda 0.95, clip 0.2, value coefficient 0.5, gradient
norm 0.5, Adam eps 1e-5); repeat probability 0.25; rewards scaled by 0.001 for learning (the logs show the
paper's points); "rollout buffer 512" read as SB3's n_steps (per game, 4096 samples per update).
"""

import ml_collections

from configs import common, mesh
from lwjax.projects.gamengen.env import BASIC, EnvConfig

SCALES = ("smoke", "cpu", "paper")
ENVS = {"e1m1": EnvConfig(), "basic": BASIC}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, choices={"scale": SCALES, "env": ENVS}, scale="cpu", env="e1m1")
  scale, env = args["scale"], args["env"]
  config = ml_collections.ConfigDict()
  config.job = "gamengen_agent"
  config.seed = 0
  config.env = ENVS[env].to_dict()
  config.model = {"image_pool": 1, "history": 32, "action_embed_dim": 16, "cnn_channels": [32, 64, 64],
                  "features": 512, "head_hidden": 512}
  config.ppo = {"num_envs": 8, "rollout_steps": 512, "total_env_steps": 10_000_000, "gamma": 0.99,
                "gae_lambda": 0.95, "clip_eps": 0.2, "entropy_coef": 0.1, "value_coef": 0.5, "batch_size": 64,
                "epochs": 10, "normalize_advantages": True, "repeat_prob": 0.25, "reward_scale": 0.001}
  config.optim = common.optim(name="adamw", learning_rate=1e-4, schedule="constant", warmup_steps=0,
                              weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-5, clip_norm=0.5)
  config.train = {"log_every": 1, "checkpoint_every": 10, "keep_checkpoints": 3, "async_checkpointing": True}
  config.record = {"enabled": True, "shard_frames": 4096}
  config.eval = {"episodes_per_env": 10}
  config.mesh = mesh.get()

  if scale == "smoke":
    config.env.max_episode_tics = 200  # 50 agent steps: every game reaches the time limit
    config.model.update(image_pool=2, cnn_channels=[8, 16, 16], features=64, head_hidden=64)
    config.ppo.update(num_envs=2, rollout_steps=32, total_env_steps=128, batch_size=32, epochs=2)
    config.train.update(checkpoint_every=1)
    config.eval.episodes_per_env = 1
  elif scale == "cpu":
    config.model.update(image_pool=2)
    config.ppo.update(rollout_steps=128, total_env_steps=102_400 if env == "basic" else 204_800,
                      batch_size=256, epochs=4, entropy_coef=0.01)
    config.optim.update(learning_rate=2.5e-4)
    config.record.enabled = False
    if env == "e1m1":
      config.eval.episodes_per_env = 2  # 16 episodes per policy: an E1M1 episode is 1050 agent steps
  return config
