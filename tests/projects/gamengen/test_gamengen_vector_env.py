"""VectorDoomEnv: batched layout, auto-reset, and restarting workers that are killed or hang."""

import logging
import os
import signal

import numpy as np
import pytest

from lwjax.projects.gamengen.env import AUTOMAP_SHAPE, FRAME_SHAPE, DoomEnv, EnvConfig
from lwjax.projects.gamengen.reward import REWARD_TERMS
from lwjax.projects.gamengen.vector_env import VectorDoomEnv

CONFIG = EnvConfig(max_episode_tics=40, seed=5)  # 10 steps an episode


@pytest.fixture(scope="module")
def venv():
  env = VectorDoomEnv(CONFIG, 2, step_timeout_s=5.0)
  yield env
  env.close()


def test_batched_layout_auto_reset_and_same_games_as_in_process(venv):
  obs = venv.reset()
  assert obs["frame"].shape == (2, *FRAME_SHAPE) and obs["automap"].shape == (2, *AUTOMAP_SHAPE)
  assert obs["first"].tolist() == [True, True]
  reference = DoomEnv(CONFIG, seed=CONFIG.seed + 1)  # game 1 of the vector env
  np.testing.assert_array_equal(obs["frame"][1], reference.reset()["frame"])
  actions = np.asarray([[1, 5], [9, 6], [10, 1]] * 4)
  for t, step_actions in enumerate(actions[:10]):
    obs, reward, done, info = venv.step(step_actions)
    _, ref_reward, ref_done, ref_info = reference.step(int(step_actions[1]))
    np.testing.assert_array_equal(info["frames"][1], ref_info["frames"])
    assert reward[1] == np.float32(ref_reward) and done[1] == ref_done
    assert info["frames"].shape == (2, 4, *FRAME_SHAPE) and reward.dtype == np.float32
    assert set(info["terms"]) == set(REWARD_TERMS)
    np.testing.assert_allclose(sum(info["terms"].values()), reward, rtol=1e-6)
    assert done.tolist() == [t == 9] * 2 and obs["first"].tolist() == done.tolist()
  reference.close()
  assert info["timeout"].all() and info["num_frames"].tolist() == [3, 3]
  assert not np.array_equal(obs["frame"][1], info["frames"][1, 2])  # the next episode's first frame
  with pytest.raises(ValueError, match="actions"):
    venv.step([0, 99])


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_failed_worker_is_restarted_with_a_warning(venv, caplog, fault):
  venv.reset()
  venv.step([1, 1])
  pid = venv.worker_pids[0]
  os.kill(pid, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
  with caplog.at_level(logging.WARNING):
    obs, reward, done, info = venv.step([1, 1])
  assert ("died" if fault == "killed" else "no answer in 5 s") in caplog.text and "restarting" in caplog.text
  assert info["restarted"].tolist() == [True, False] and done.tolist() == [True, False]
  assert info["num_frames"][0] == 0 and obs["first"].tolist() == [True, False]
  assert venv.worker_pids[0] != pid
  obs, reward, done, info = venv.step([1, 1])  # both games go on
  assert info["num_frames"].tolist() == [4, 4] and not info["restarted"].any()
