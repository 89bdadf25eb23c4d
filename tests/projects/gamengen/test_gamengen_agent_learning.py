"""PPO learns ViZDoom's basic.cfg: the trained agent beats the random policy measured in the same run."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.mark.slow
def test_ppo_beats_the_random_policy_on_basic(tmp_path):
  """The cpu scale on basic for 20 updates (20,480 env steps; ~10 min on 2 busy cores), then 80 evaluation
  episodes of the agent and of the uniform random policy (same repeat probability) in the same run."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, "main.py"), "--config",
       os.path.join(ROOT, "experiments/gamengen_agent.py") + ":scale=cpu,env=basic", "--workdir", str(tmp_path),
       "--config.ppo.total_env_steps=20480", "--config.eval.episodes_per_env=10"],
      env=env, capture_output=True, text=True, timeout=3600)
  assert result.returncode == 0, result.stderr[-3000:]
  evaluation = json.loads((tmp_path / "eval.json").read_text())
  agent, random = evaluation["agent"], evaluation["random"]
  print(json.dumps(evaluation, indent=1))
  assert agent["episodes"] == random["episodes"] == 80
  # A random policy kills the monster in about half of the episodes; the agent learns to aim and shoot.
  assert agent["kills"] > random["kills"] + 0.2, evaluation
  assert agent["return"] > random["return"] + 250.0, evaluation
