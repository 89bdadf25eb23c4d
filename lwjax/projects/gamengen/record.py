"""Records DOOM trajectories to ArrayRecord and serves them as training windows (GameNGen, arXiv 2408.14837, sec. 3.1).

The paper's diffusion model learns from the agent's trajectories: every frame, with the action held from
it. Here every tic is one record (the game renders a frame per tic and an action is held
`tics_per_action` tics), encoded as the bytes of one `record_dtype` element:

  episode int64, step int32 (frame index in the episode), action int32 (held from this frame to the next),
  reward float32 (the reward of the agent step chosen at this frame; 0 on the tics an action is held),
  done bool (last frame of its episode), frame uint8 [240, 320, 3].

Each game of a `VectorDoomEnv` writes its own shards, and a shard is only closed between episodes, so an
episode's frames are consecutive records of one shard. `index.json` lists the shards and the episodes
(shard, first record, length, how it ended: terminal, timeout, restarted or open when recording stopped).

Policies are callables obs -> actions [N] (obs as `VectorDoomEnv.step` returns it): `RandomPolicy`,
`ScriptedPolicy` (a fixed action list, for tests), or a trained agent's act function.

`WindowSource` gives random access (Grain's `MapDataset.source`) to fixed-length windows: `context` past
frames, their actions, and the target frame, all from one episode.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tqdm
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from lwjax.projects.gamengen.env import ACTION_NAMES, FRAME_SHAPE, NUM_ACTIONS, EnvConfig, check_config
from lwjax.projects.gamengen.vector_env import VectorDoomEnv

INDEX_FILE = "index.json"
# One record per chunk (random access reads only the records asked for); zstd:1 stores a 225 KiB frame
# in about 40 KiB at about the speed of writing it uncompressed.
WRITER_OPTIONS = "group_size:1,zstd:1"

Policy = Callable[[dict[str, np.ndarray]], np.ndarray]


def record_dtype(frame_shape: Sequence[int] = FRAME_SHAPE) -> np.dtype:
  return np.dtype([("episode", "<i8"), ("step", "<i4"), ("action", "<i4"), ("reward", "<f4"), ("done", "?"),
                   ("frame", "u1", tuple(frame_shape))])


class RandomPolicy:
  """Uniform random actions; with `repeat_prob` the previous action is kept instead (the paper raises the
  chance of repeating the previous action), never across an episode start."""

  def __init__(self, seed: int = 0, repeat_prob: float = 0.0):
    self.rng, self.repeat_prob, self.prev = np.random.default_rng(seed), repeat_prob, None

  def __call__(self, obs: dict[str, np.ndarray]) -> np.ndarray:
    actions = self.rng.integers(0, NUM_ACTIONS, len(obs["first"]))
    if self.prev is not None:
      keep = (self.rng.random(len(actions)) < self.repeat_prob) & ~obs["first"]
      actions[keep] = self.prev[keep]
    self.prev = actions
    return actions


class ScriptedPolicy:
  """The actions of a fixed list in turn (the same in every game), cycling."""

  def __init__(self, actions: Sequence[int]):
    self.actions, self.t = list(actions), 0

  def __call__(self, obs: dict[str, np.ndarray]) -> np.ndarray:
    action = self.actions[self.t % len(self.actions)]
    self.t += 1
    return np.full(len(obs["first"]), action, np.int64)


class TrajectoryWriter:
  """Writes the steps of a VectorDoomEnv to ArrayRecord shards in `out_dir`; `close()` writes the index.

  Usage: `writer.begin(env.reset())`, then per step `writer.add(actions, reward, done, info, obs)` with
  what `env.step(actions)` returned. The frame where an action is chosen is written with the next step,
  once its action and reward are known; frames still waiting when the writer closes are dropped.
  """

  def __init__(self, out_dir: str, env_config: EnvConfig, num_envs: int, *, shard_frames: int = 4096,
               writer_options: str = WRITER_OPTIONS):
    os.makedirs(out_dir, exist_ok=True)
    self.out_dir, self.env_config, self.num_envs = out_dir, env_config, num_envs
    self.shard_frames, self.writer_options = shard_frames, writer_options
    self.dtype = record_dtype()
    self.num_frames = 0
    self.shards: list[dict[str, Any]] = []  # {"path", "num_records"}
    self.episodes: list[dict[str, Any]] = []  # {"id", "env", "shard", "start", "length", "end"}
    self._writers: list[ArrayRecordWriter | None] = [None] * num_envs
    self._shard_ids = [-1] * num_envs  # index into self.shards of each game's open shard
    self._parts = [0] * num_envs
    self._episode: list[dict[str, Any] | None] = [None] * num_envs
    self._pending: list[np.ndarray | None] = [None] * num_envs  # frame whose action comes next step

  def begin(self, obs: dict[str, np.ndarray]) -> None:
    for i in range(self.num_envs):
      self._start_episode(i, obs["frame"][i])

  def _start_episode(self, i: int, first_frame_hwc: np.ndarray) -> None:
    if self._writers[i] is not None and self.shards[self._shard_ids[i]]["num_records"] >= self.shard_frames:
      self._writers[i].close()
      self._writers[i] = None
    if self._writers[i] is None:
      path = f"shard-env{i:03d}-{self._parts[i]:05d}.array_record"
      self._writers[i] = ArrayRecordWriter(os.path.join(self.out_dir, path), self.writer_options)
      self._shard_ids[i] = len(self.shards)
      self.shards.append({"path": path, "num_records": 0})
      self._parts[i] += 1
    shard = self._shard_ids[i]
    self._episode[i] = {"id": len(self.episodes), "env": i, "shard": shard,
                        "start": self.shards[shard]["num_records"], "length": 0, "end": "open"}
    self.episodes.append(self._episode[i])
    self._pending[i] = first_frame_hwc.copy()

  def _write(self, i: int, frame_hwc: np.ndarray, action: int, reward: float, done: bool) -> None:
    episode = self._episode[i]
    rec = np.zeros((), self.dtype)
    rec["episode"], rec["step"], rec["action"], rec["reward"], rec["done"] = (
        episode["id"], episode["length"], action, reward, done)
    rec["frame"] = frame_hwc
    self._writers[i].write(rec.tobytes())
    episode["length"] += 1
    self.shards[episode["shard"]]["num_records"] += 1
    self.num_frames += 1

  def add(self, actions, reward, done, info, obs) -> int:
    """Writes one vector step; returns the number of frames written."""
    before = self.num_frames
    for i in range(self.num_envs):
      action, n = int(actions[i]), int(info["num_frames"][i])
      self._write(i, self._pending[i], action, float(reward[i]), bool(done[i]) and n == 0)
      self._pending[i] = None
      for k in range(n):
        if k == n - 1 and not done[i]:
          self._pending[i] = info["frames"][i, k].copy()  # the next action is chosen at this frame
        else:
          self._write(i, info["frames"][i, k], action, 0.0, bool(done[i]) and k == n - 1)
      if done[i]:
        self._episode[i]["end"] = ("restarted" if info["restarted"][i] else
                                   "timeout" if info["timeout"][i] else "terminal")
        self._start_episode(i, obs["frame"][i])
    return self.num_frames - before

  def close(self) -> dict[str, Any]:
    """Closes the shards and writes `index.json`; returns the index."""
    for writer in self._writers:
      if writer is not None:
        writer.close()
    self._writers = [None] * self.num_envs
    index = {"frame_shape": list(FRAME_SHAPE), "fields": list(self.dtype.names), "actions": list(ACTION_NAMES),
             "env_config": self.env_config.to_dict(), "writer_options": self.writer_options,
             "num_frames": self.num_frames, "shards": self.shards,
             "episodes": [e for e in self.episodes if e["length"]]}
    with open(os.path.join(self.out_dir, INDEX_FILE), "w") as f:
      json.dump(index, f, indent=1)
    return index


def record(env_config: EnvConfig, policy: Policy, num_frames: int, out_dir: str, *, num_envs: int = 1,
           shard_frames: int = 4096) -> dict[str, Any]:
  """Plays `policy` in `num_envs` games until at least `num_frames` frames are written to `out_dir`.

  Shows a tqdm bar in frames and frames/s. Returns the index (also in `out_dir/index.json`).
  """
  env_config = check_config(env_config)
  with VectorDoomEnv(env_config, num_envs) as env:
    writer = TrajectoryWriter(out_dir, env_config, num_envs, shard_frames=shard_frames)
    obs = env.reset()
    writer.begin(obs)
    with tqdm.tqdm(total=num_frames, unit="frame", desc="recording", smoothing=0.1) as bar:
      while writer.num_frames < num_frames:
        actions = policy(obs)
        obs, reward, done, info = env.step(actions)
        bar.update(writer.add(actions, reward, done, info, obs))
    return writer.close()


class EpisodeWindows:
  """The window numbering shared by every window source: episodes of one or more recordings, in order.

  A window is `context` + 1 records of one episode, `stride` records apart (stride = tics_per_action gives
  one frame per agent step; windows then start on the frames where the agent chose its action, so the
  action a record holds is held over the whole stride). An episode of L records gives
  (L - 1 - context * stride) // stride + 1 windows, target by target. `episodes` selects episodes by
  their position in the concatenated index lists (e.g. a held-out split); default: all.
  """

  def __init__(self, directories: str | Sequence[str], context: int, episodes: Sequence[int] | None = None,
               stride: int = 1):
    self.directories = [directories] if isinstance(directories, str) else list(directories)
    if not self.directories:
      raise ValueError("no recording directories given")
    if stride < 1:
      raise ValueError(f"stride={stride}: expected >= 1")
    self.context, self.stride = context, stride
    self.indexes = []
    for directory in self.directories:
      path = os.path.join(directory, INDEX_FILE)
      if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: expected a recording written by the gamengen_record job")
      with open(path) as f:
        self.indexes.append(json.load(f))
    shapes = {tuple(index["frame_shape"]) for index in self.indexes}
    if len(shapes) != 1:
      raise ValueError(f"recordings of different frame shapes {sorted(shapes)}")
    self.frame_shape = shapes.pop()
    # (recording, shard, first record, length) per episode, in index order.
    self.all_episodes = [(r, e["shard"], e["start"], e["length"])
                         for r, index in enumerate(self.indexes) for e in index["episodes"]]
    chosen = range(len(self.all_episodes)) if episodes is None else episodes
    span = context * stride
    picked = [self.all_episodes[i] for i in chosen if self.all_episodes[i][3] > span]
    self._episodes = np.asarray([e[:3] for e in picked], np.int64).reshape(-1, 3)
    # windows up to and including each episode
    self._ends = np.cumsum([(e[3] - 1 - span) // stride + 1 for e in picked], dtype=np.int64)

  def __len__(self) -> int:
    return int(self._ends[-1]) if len(self._ends) else 0

  def episode_windows(self) -> list[range]:
    """The window numbers of each selected episode that holds a window, in order."""
    starts = np.concatenate([[0], self._ends[:-1]]).astype(np.int64)
    return [range(int(a), int(b)) for a, b in zip(starts, self._ends, strict=True)]

  def locate(self, j: int) -> tuple[int, int, list[int]]:
    """(recording, shard, the window's record indices: context + 1 of them, `stride` apart)."""
    if not 0 <= j < len(self):
      raise IndexError(f"window {j} outside [0, {len(self)})")
    e = int(np.searchsorted(self._ends, j, side="right"))
    recording, shard, start = (int(x) for x in self._episodes[e])
    first = start + (j - int(self._ends[e - 1] if e else 0)) * self.stride
    return recording, shard, list(range(first, first + self.context * self.stride + 1, self.stride))


def split_episodes(num_episodes: int, num_held_out: int) -> tuple[list[int], list[int]]:
  """(training, held-out) episode positions: the last `num_held_out` episodes are held out."""
  if not 0 <= num_held_out < num_episodes:
    raise ValueError(f"cannot hold out {num_held_out} of {num_episodes} episodes")
  cut = num_episodes - num_held_out
  return list(range(cut)), list(range(cut, num_episodes))


class WindowSource:
  """Windows of one episode: `context` frames with their actions, and the frame that follows.

  Window j is {"frames": uint8 [context, 240, 320, 3], "actions": int32 [context] (actions[k] is held
  from frames[k] to the next frame), "target": uint8 [240, 320, 3], "episode": int64 [context + 1],
  "step": int32 [context + 1]}, as stored. Windows are numbered as `EpisodeWindows` does, over one or more
  recording directories (`episodes` selects some; frames `stride` records apart). Deterministic, random
  access.
  """

  def __init__(self, directories: str | Sequence[str], context: int, episodes: Sequence[int] | None = None,
               stride: int = 1):
    self.windows = EpisodeWindows(directories, context, episodes, stride)
    self.context = context
    self.dtype = record_dtype(self.windows.frame_shape)
    self.shard_paths = [[os.path.join(d, s["path"]) for s in index["shards"]]
                        for d, index in zip(self.windows.directories, self.windows.indexes, strict=False)]
    self._readers: dict[tuple[int, int], ArrayRecordReader] = {}

  def __len__(self) -> int:
    return len(self.windows)

  def __getitem__(self, j: int) -> dict[str, np.ndarray]:
    recording, shard, rows = self.windows.locate(j)
    if (recording, shard) not in self._readers:
      self._readers[recording, shard] = ArrayRecordReader(self.shard_paths[recording][shard])
    records = np.frombuffer(b"".join(self._readers[recording, shard].read(rows)), self.dtype)
    return {"frames": records["frame"][:-1], "actions": records["action"][:-1], "target": records["frame"][-1],
            "episode": records["episode"], "step": records["step"]}

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state["_readers"] = {}  # readers hold open files; each process opens its own
    return state

  def __repr__(self) -> str:
    return (f"WindowSource({self.windows.directories!r}, context={self.context}, stride={self.windows.stride}, "
            f"{len(self)} windows)")
