"""Model-side data of GameNGen: frame geometry, strided episode windows, the latent cache and its windows."""

import os

import grain
import numpy as np
import pytest

from lwjax.projects.gamengen import data as data_lib
from lwjax.projects.gamengen.env import FRAME_SHAPE, EnvConfig
from lwjax.projects.gamengen.frames import FrameGeometry
from lwjax.projects.gamengen.latents import LatentWindowSource, build_cache
from lwjax.projects.gamengen.record import EpisodeWindows, ScriptedPolicy, WindowSource, record, split_episodes


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("rec"))
  # Episodes of 48 tics (12 agent steps of 4 tics), 2 games.
  record(EnvConfig(max_episode_tics=48, seed=3), ScriptedPolicy([1, 1, 9, 10, 5, 11, 6, 3]), 200, out, num_envs=2)
  return out


def test_geometry_shapes_and_round_trip():
  paper = FrameGeometry()
  assert paper.image_shape == (256, 320, 3) and paper.latent_shape(4) == (32, 40, 4)
  small = FrameGeometry(downsample=4, pad_multiple=32)
  assert small.frame_shape == (60, 80, 3) and small.image_shape == (64, 96, 3) and small.latent_shape(4) == (8, 12, 4)
  frames = np.random.default_rng(0).integers(0, 256, (2, *FRAME_SHAPE), np.uint8)
  images = paper.to_model(frames)
  assert images.shape == (2, 256, 320, 3) and images.min() >= -1 and images.max() <= 1
  assert (images[:, 240:] == -1).all()  # black padding at the bottom
  np.testing.assert_array_equal(paper.to_uint8(images), frames)  # exact at full resolution
  block = frames[0, :4, :4].astype(np.float64).mean(axis=(0, 1))
  np.testing.assert_array_equal(small.shrink(frames)[0, 0, 0], np.round(block).astype(np.uint8))
  np.testing.assert_array_equal(small.to_uint8(small.to_model(frames)), small.shrink(frames))
  with pytest.raises(ValueError, match="downsample=7"):
    FrameGeometry(downsample=7)


def test_strided_windows_hold_one_frame_per_agent_step_within_an_episode(recording):
  for stride in (1, 4):
    windows = EpisodeWindows(recording, context=3, stride=stride)
    lengths = [e[3] for e in windows.all_episodes]
    assert len(windows) == sum((n - 1 - 3 * stride) // stride + 1 for n in lengths if n > 3 * stride)
    source = WindowSource(recording, 3, stride=stride)
    for j in range(len(source)):
      w = source[j]
      assert (w["episode"] == w["episode"][0]).all()
      np.testing.assert_array_equal(w["step"], w["step"][0] + stride * np.arange(4))
      if stride == 4:
        assert w["step"][0] % 4 == 0  # starts where the agent chose its action
  train, held_out = split_episodes(5, 2)
  assert train == [0, 1, 2] and held_out == [3, 4]
  with pytest.raises(ValueError):
    split_episodes(2, 2)


def _encode(images):
  """A stand-in encoder: 8x8 mean pooling of the first channel and its square, as 2 latent channels."""
  b, h, w, _ = images.shape
  x = images[..., :1].reshape(b, h // 8, 8, w // 8, 8, 1).mean(axis=(2, 4))
  return np.concatenate([x, x * x], axis=-1)


def test_latent_cache_matches_encoding_the_window_frames(recording, tmp_path):
  geometry = FrameGeometry(downsample=4, pad_multiple=32)
  cache = str(tmp_path / "latents")
  meta = build_cache([recording], cache, _encode, geometry, batch_size=16)
  assert meta["latent_shape"] == [8, 12, 2] and meta["num_frames"] >= 200
  episodes = [0, 2]
  frames, latents = WindowSource(recording, 2, episodes, stride=4), LatentWindowSource(cache, 2, episodes, stride=4)
  assert len(frames) == len(latents) > 0
  for j in (0, len(frames) - 1):
    f, z = frames[j], latents[j]
    expected = _encode(geometry.to_model(np.concatenate([f["frames"], f["target"][None]])))
    np.testing.assert_allclose(np.concatenate([z["context"], z["target"][None]]), expected, atol=2e-3)  # float16
    np.testing.assert_array_equal(z["actions"], f["actions"])
  stamp = os.path.getmtime(os.path.join(cache, "meta.json"))
  build_cache([recording], cache, _encode, geometry, batch_size=16)
  assert os.path.getmtime(os.path.join(cache, "meta.json")) == stamp  # reused, not rebuilt


def test_pipelines_give_deterministic_batches_with_per_example_seeds(recording, tmp_path):
  geometry = FrameGeometry(downsample=4, pad_multiple=32)
  frames = data_lib.frame_dataset([recording], geometry, batch_size=4, shuffle_seed=1)
  a, b = next(iter(frames)), next(iter(frames))
  assert a["image"].shape == (4, 64, 96, 3) and a["seed"].dtype == np.uint32
  np.testing.assert_array_equal(a["image"], b["image"])
  np.testing.assert_array_equal(a["seed"], b["seed"])
  assert len(set(a["seed"].tolist())) == 4
  cache = str(tmp_path / "latents")
  build_cache([recording], cache, _encode, geometry, batch_size=16)
  it = iter(data_lib.latent_window_dataset(cache, 2, batch_size=3, stride=4, shuffle_seed=0))
  next(it)
  state = it.get_state()
  after = next(it)
  it.set_state(state)
  np.testing.assert_array_equal(next(it)["seed"], after["seed"])  # checkpointable: resumes the same noise
  assert isinstance(grain.MapDataset.source(LatentWindowSource(cache, 2)), grain.MapDataset)


def test_two_processes_hold_the_single_process_global_batch(recording, tmp_path):
  """Each process reads only its own examples; together a step's local batches are the global batch of one
  process (the same examples with the same noise seeds)."""
  geometry = FrameGeometry(downsample=4, pad_multiple=32)
  cache = str(tmp_path / "latents")
  build_cache([recording], cache, _encode, geometry, batch_size=16)
  pipelines = {
      "frames": lambda **kw: data_lib.frame_dataset([recording], geometry, batch_size=4, shuffle_seed=1, **kw),
      "latents": lambda **kw: data_lib.latent_window_dataset(cache, 2, batch_size=4, stride=4, shuffle_seed=0, **kw)}
  for make in pipelines.values():
    whole = iter(make(process_index=0, process_count=1))
    halves = [iter(make(process_index=p, process_count=2)) for p in range(2)]
    for _ in range(3):
      one, two = next(whole), [next(h) for h in halves]
      assert all(len(t["seed"]) == 2 for t in two)
      merged = {k: np.concatenate([two[0][k], two[1][k]]) for k in one}
      order_one, order_two = np.argsort(one["seed"]), np.argsort(merged["seed"])
      for k in one:
        np.testing.assert_array_equal(merged[k][order_two], one[k][order_one])
  with pytest.raises(ValueError, match="^train.global_batch_size: 4 does not split over 3"):
    data_lib.frame_dataset([recording], geometry, batch_size=4, process_index=0, process_count=3)


def test_a_retrained_autoencoder_rebuilds_the_latent_cache(recording, tmp_path):
  from lwjax.projects.gamengen import latents
  geometry = FrameGeometry(downsample=4, pad_multiple=32)
  cache = str(tmp_path / "latents")
  first = latents.fingerprint({"w": np.ones(3, np.float32)})
  assert first != latents.fingerprint({"w": np.full(3, 2.0, np.float32)})
  build_cache([recording], cache, _encode, geometry, batch_size=16, encoder=first)
  stamp = os.path.getmtime(os.path.join(cache, "meta.json"))
  assert build_cache([recording], cache, _encode, geometry, batch_size=16, encoder=first)["encoder"] == first
  assert os.path.getmtime(os.path.join(cache, "meta.json")) == stamp
  doubled = build_cache([recording], cache, lambda x: 2 * _encode(x), geometry, batch_size=16, encoder="retrained")
  assert doubled["encoder"] == "retrained"
  z = LatentWindowSource(cache, 2, stride=4)[0]
  f = WindowSource(recording, 2, stride=4)[0]
  np.testing.assert_allclose(z["context"], 2 * _encode(geometry.to_model(f["frames"])), atol=4e-3)
