"""Trajectory recording: bit-exact round trips, episode bookkeeping, windows that never cross episodes."""

import json
import os

import grain
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordReader

from lwjax.projects.gamengen.env import FRAME_SHAPE, DoomEnv, EnvConfig
from lwjax.projects.gamengen.record import (
  INDEX_FILE,
  RandomPolicy,
  ScriptedPolicy,
  TrajectoryWriter,
  WindowSource,
  record,
  record_dtype,
)

TICS = 4


def read_all(directory):
  with open(os.path.join(directory, INDEX_FILE)) as f:
    index = json.load(f)
  dtype = record_dtype(index["frame_shape"])
  records = [np.frombuffer(b"".join(ArrayRecordReader(os.path.join(directory, s["path"])).read_all()), dtype)
             for s in index["shards"]]
  return index, records


class FakeVectorGame:
  """Random frames in the layout of VectorDoomEnv.step, with episodes ending at random, mid-action, or by a
  restart; remembers the (frame, action, reward, done) sequence each game should record."""

  def __init__(self, num_envs, seed):
    self.n, self.rng = num_envs, np.random.default_rng(seed)
    self.expected = [[] for _ in range(num_envs)]  # per game: finished episodes, each a list of records
    self.current = [[] for _ in range(num_envs)]
    self.pending = [None] * num_envs

  def frames(self, *shape):
    """Distinct but compressible frames: a random grey level and a random strip of 16 pixels."""
    frames = np.broadcast_to(self.rng.integers(0, 256, (*shape, 1, 1, 1), np.uint8), (*shape, *FRAME_SHAPE)).copy()
    frames[..., 0, :16, :] = self.rng.integers(0, 256, (*shape, 16, 3), np.uint8)
    return frames

  def reset(self):
    obs = {"frame": self.frames(self.n), "first": np.ones(self.n, bool)}
    self.pending = list(obs["frame"])
    return obs

  def step(self, actions):
    frames = self.frames(self.n, TICS)
    reward = self.rng.normal(size=self.n).astype(np.float32)
    done = self.rng.random(self.n) < 0.15
    restarted = done & (self.rng.random(self.n) < 0.3)
    num_frames = np.where(done, self.rng.integers(0, TICS + 1, self.n), TICS)
    num_frames[restarted] = 0
    obs = {"frame": self.frames(self.n), "first": done.copy()}
    for i in range(self.n):
      n = num_frames[i]
      self.current[i].append((self.pending[i], actions[i], reward[i], done[i] and n == 0))
      self.current[i] += [(frames[i, k], actions[i], 0.0, done[i] and k == n - 1) for k in range(n - (not done[i]))]
      self.pending[i] = obs["frame"][i] if done[i] else frames[i, n - 1]
      if done[i]:
        self.expected[i].append(self.current[i])
        self.current[i] = []
    info = {"frames": frames, "num_frames": num_frames, "timeout": done & ~restarted & (num_frames == 3),
            "restarted": restarted}
    return obs, reward, done, info


@pytest.fixture(scope="module")
def fake_recording(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("fake"))
  game, policy = FakeVectorGame(3, seed=0), RandomPolicy(seed=1, repeat_prob=0.5)
  writer = TrajectoryWriter(out, EnvConfig(), 3, shard_frames=40)
  obs = game.reset()
  writer.begin(obs)
  for _ in range(60):
    actions = policy(obs)
    obs, reward, done, info = game.step(actions)
    writer.add(actions, reward, done, info, obs)
  writer.close()
  return out, game


def test_round_trip_is_bit_exact(fake_recording):
  out, game = fake_recording
  index, records = read_all(out)
  assert index["num_frames"] == sum(len(r) for r in records) == sum(s["num_records"] for s in index["shards"])
  by_game = {i: [e for e in index["episodes"] if e["env"] == i] for i in range(3)}
  for i in range(3):
    assert len(game.expected[i]) >= 3  # several finished episodes per game
    for episode, expected in zip(by_game[i], game.expected[i], strict=False):
      got = records[episode["shard"]][episode["start"]:episode["start"] + episode["length"]]
      assert episode["length"] == len(expected) and episode["end"] in ("terminal", "timeout", "restarted")
      np.testing.assert_array_equal(got["frame"], np.stack([r[0] for r in expected]))
      np.testing.assert_array_equal(got["action"], [r[1] for r in expected])
      np.testing.assert_array_equal(got["reward"], np.asarray([r[2] for r in expected], np.float32))
      np.testing.assert_array_equal(got["done"], [r[3] for r in expected])
      np.testing.assert_array_equal(got["step"], np.arange(len(expected)))
      assert (got["episode"] == episode["id"]).all() and got["done"][-1] and not got["done"][:-1].any()
    assert by_game[i][-1]["end"] == "open"  # cut when recording stopped
  assert len(index["shards"]) > 3  # shards rolled over, between episodes


def test_windows_never_cross_episodes(fake_recording):
  out, _ = fake_recording
  context = 6
  source = WindowSource(out, context)
  with open(os.path.join(out, INDEX_FILE)) as f:
    index = json.load(f)
  assert len(source) == sum(max(0, e["length"] - context) for e in index["episodes"])
  episode_of = {j: i for i, r in enumerate(source.windows.episode_windows()) for j in r}
  assert sorted(episode_of) == list(range(len(source)))
  stored_ids = {}  # episode_windows' position -> the episode ids its windows hold
  for j in range(len(source)):
    w = source[j]
    stored_ids.setdefault(episode_of[j], set()).add(int(w["episode"][0]))
    assert (w["episode"] == w["episode"][0]).all()
    np.testing.assert_array_equal(w["step"], w["step"][0] + np.arange(context + 1))
    assert w["frames"].shape == (context, *FRAME_SHAPE) and w["actions"].shape == (context,)
  assert all(len(ids) == 1 for ids in stored_ids.values())
  assert len(set.union(*stored_ids.values())) == len(stored_ids)  # one range per episode
  with pytest.raises(IndexError):
    source[len(source)]


def test_windows_through_grain_are_deterministic(fake_recording):
  out, _ = fake_recording
  source = WindowSource(out, 4)
  batches = [grain.MapDataset.source(source).shuffle(seed=3).batch(8)[2] for _ in range(2)]
  assert batches[0]["frames"].shape == (8, 4, *FRAME_SHAPE) and batches[0]["target"].shape == (8, *FRAME_SHAPE)
  for key in batches[0]:
    np.testing.assert_array_equal(batches[0][key], batches[1][key])


def test_record_job_matches_a_replay_of_the_same_game(tmp_path):
  config = EnvConfig(max_episode_tics=48, seed=11)  # 12 steps an episode
  script = [1, 1, 9, 10, 5, 11, 6, 3]
  index = record(config, ScriptedPolicy(script), 100, str(tmp_path))
  assert index["num_frames"] >= 100 and [e["end"] for e in index["episodes"]][:2] == ["timeout", "timeout"]
  window = WindowSource(str(tmp_path), 8)[0]

  env, policy = DoomEnv(config), ScriptedPolicy(script)  # game 0 of a VectorDoomEnv is seeded config.seed
  frames, actions = [env.reset()["frame"]], []
  for _ in range(12):
    action = int(policy({"first": np.zeros(1, bool)})[0])
    _, _, done, info = env.step(action)
    frames += list(info["frames"][:info["num_frames"]])
    actions += [action] * TICS
  env.close()
  _, records = read_all(str(tmp_path))
  first = records[0][:len(frames)]
  assert done and first["done"][-1] and len(frames) == index["episodes"][0]["length"]
  np.testing.assert_array_equal(first["frame"], np.stack(frames))
  np.testing.assert_array_equal(first["action"], actions[:len(frames)])
  np.testing.assert_array_equal(window["frames"], np.stack(frames[:8]))
  np.testing.assert_array_equal(window["target"], frames[8])
