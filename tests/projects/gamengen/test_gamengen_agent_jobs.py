"""GameNGen agent and record jobs: the smoke experiment end to end through main.py, resume, configs, recording."""

import importlib
import json
import os
import subprocess
import sys

import pytest

from lwjax import jobs
from lwjax.config import ConfigError
from lwjax.projects.gamengen.record import WindowSource

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
agent_experiment = importlib.import_module("experiments.gamengen_agent")
record_experiment = importlib.import_module("experiments.gamengen_record")


def _main(cwd, *args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  result = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--config",
                           os.path.join(ROOT, "experiments/gamengen_agent.py") + ":scale=smoke", "--workdir", "run",
                           *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stderr


def _rows(workdir, split):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [row for row in map(json.loads, f) if row["split"] == split]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """The smoke scale (2 updates), then the same workdir continued to 3 updates (no evaluation)."""
  cwd = tmp_path_factory.mktemp("agent")
  first = _main(cwd)
  workdir = str(cwd / "run")
  with open(os.path.join(workdir, "eval.json")) as f:
    evaluation = json.load(f)
  after_first = {"checkpoints": sorted(os.listdir(os.path.join(workdir, "checkpoints"))), "eval": evaluation}
  second = _main(cwd, "--config.ppo.total_env_steps=192", "--config.eval.episodes_per_env=0")
  return workdir, first, second, after_first


def test_smoke_scale_trains_checkpoints_logs_records_and_evaluates(smoke_run):
  workdir, log, _, after_first = smoke_run
  assert after_first["checkpoints"] == ["1", "2"]
  assert "update 2/2 env steps 128" in log and "env steps/s" in log and "eval agent: return" in log
  evaluation = after_first["eval"]
  for policy in ("agent", "random"):
    assert evaluation[policy]["episodes"] == 2 and {"return", "kills", "cells", "term/kill"} <= set(evaluation[policy])
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  train = _rows(workdir, "train")
  assert {"policy_loss", "value_loss", "entropy", "approx_kl", "clip_fraction", "explained_variance"} <= set(train[0])
  episodes = _rows(workdir, "episode")
  assert episodes and {"return", "kills", "cells", "term/new_area", "term/ammo"} <= set(episodes[0])
  # The agent's play was recorded while it trained: every frame, readable as training windows.
  trajectories = os.path.join(workdir, "trajectories", "from_update_000000")
  with open(os.path.join(trajectories, "index.json")) as f:
    index = json.load(f)
  assert index["num_frames"] >= 2 * 64 * 3  # 2 games x 64 agent steps x >= 3 of 4 tics recorded
  assert len(WindowSource(trajectories, context=4)) > 0


def test_same_workdir_resumes_from_the_latest_checkpoint(smoke_run):
  workdir, _, log, _ = smoke_run
  assert "restored step 2" in log and "from update 2" in log and "update 3/3 env steps 192" in log
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2", "3"]
  assert [row["update"] for row in _rows(workdir, "train")] == [1, 2, 3]
  assert sorted(os.listdir(os.path.join(workdir, "trajectories"))) == ["from_update_000000", "from_update_000002"]


def test_record_job_plays_the_trained_agent(smoke_run, tmp_path):
  workdir = smoke_run[0]
  config = record_experiment.get_config("scale=smoke,policy=agent,env=basic")
  config.policy.checkpoint = workdir
  config.record.num_frames = 40
  index = jobs.get(config).run(config, str(tmp_path))
  assert index["num_frames"] >= 40 and index["env_config"]["scenario_wad"] == "basic.wad"
  assert os.path.exists(tmp_path / "trajectories" / "index.json")


def test_every_config_validates():
  for scale in agent_experiment.SCALES:
    for env in agent_experiment.ENVS:
      jobs.get(agent_experiment.get_config(f"scale={scale},env={env}"))
  for scale in record_experiment.SCALES:
    for policy in ("random", "scripted"):
      jobs.get(record_experiment.get_config(f"scale={scale},policy={policy}"))


@pytest.mark.parametrize("experiment,key,value,message", [
    ("agent", "ppo.batch_size", 7, "ppo.batch_size: 7 does not divide a rollout's 64 samples"),
    ("agent", "ppo.total_env_steps", 10, "ppo.total_env_steps: 10 is less than one rollout"),
    ("agent", "ppo.repeat_prob", 1.0, "ppo.repeat_prob: 1.0 is above the maximum"),
    ("agent", "model.image_pool", 4, "model.image_pool: 4 is not a valid choice (valid: 1, 2)"),
    ("agent", "env.map", "E9M9", "env.map: no map 'E9M9' in the WADs given"),
    ("record", "policy.actions", [1, 99], "policy.actions: [1, 99] holds ids outside [0, 17)"),
    ("record", "policy.kind", "agent", "policy.checkpoint: '' holds no checkpoints/"),
    ("record", "policy.kind", "expert", "policy.kind: 'expert' is not a valid choice"),
])
def test_config_errors_name_the_key(experiment, key, value, message):
  module = agent_experiment if experiment == "agent" else record_experiment
  config = module.get_config("scale=smoke")
  group, name = key.split(".")
  config[group][name] = value
  with pytest.raises(ConfigError) as error:
    jobs.get(config)
  assert str(error.value).startswith(message)
