"""Latent cache for GameNGen's diffusion training: every recorded frame encoded once (arXiv 2408.14837, sec. 3.2).

The denoiser sees each frame many times (as a target, and in `context` windows as a past frame), so the
frozen autoencoder encodes every frame of the recordings once, with its posterior mean times the latent
scaling factor. The cache directory holds `meta.json` ({"recordings", "latent_shape", "geometry",
"num_frames", "encoder": the autoencoder's parameter fingerprint}) and, per recording r and shard s,
`r<r>-s<s>.latents.npy` (float16 [records, h, w, c]) and `r<r>-s<s>.actions.npy` (int32 [records]), read
memory-mapped. `LatentWindowSource` numbers its windows exactly as `record.WindowSource` does over the same
recordings (both use `record.EpisodeWindows`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import tqdm
from array_record.python.array_record_module import ArrayRecordReader

from lwjax.projects.gamengen.frames import FrameGeometry
from lwjax.projects.gamengen.record import EpisodeWindows, record_dtype

META_FILE = "meta.json"

# encode(images [batch, H, W, 3] float32 in [-1, 1]) -> latents [batch, h, w, c]; fixed batch size.
EncodeFn = Callable[[np.ndarray], Any]


def _stem(recording: int, shard: int) -> str:
  return f"r{recording:03d}-s{shard:05d}"


def fingerprint(params) -> str:
  """A digest of a parameter tree's values: which autoencoder encoded a cache (a retrained one differs)."""
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return digest.hexdigest()[:16]


def build_cache(recordings: Sequence[str], cache_dir: str, encode: EncodeFn, geometry: FrameGeometry, *,
                batch_size: int, encoder: str = "") -> dict:
  """Encodes every frame of `recordings` into `cache_dir`; returns the meta (also `meta.json`).

  A cache whose meta matches (same recordings, geometry and `encoder`, the autoencoder's `fingerprint`) is
  reused as is; anything else, a retrained autoencoder included, rebuilds it. The meta is written last, so an
  interrupted build is redone.
  """
  recordings = [os.path.abspath(r) for r in recordings]
  meta_path = os.path.join(cache_dir, META_FILE)
  if os.path.exists(meta_path):
    with open(meta_path) as f:
      meta = json.load(f)
    if (meta["recordings"] == recordings and meta["geometry"] == dataclasses.asdict(geometry)
        and meta.get("encoder", "") == encoder):
      return meta
    logging.info("latent cache %s: built for other recordings, geometry or autoencoder; encoding again", cache_dir)
  os.makedirs(cache_dir, exist_ok=True)
  index = EpisodeWindows(recordings, context=0)
  dtype = record_dtype(index.frame_shape)
  total = sum(s["num_records"] for ix in index.indexes for s in ix["shards"])
  latent_shape = None
  with tqdm.tqdm(total=total, unit="frame", desc="encoding latents") as bar:
    for r, (directory, ix) in enumerate(zip(recordings, index.indexes, strict=False)):
      for s, shard in enumerate(ix["shards"]):
        reader = ArrayRecordReader(os.path.join(directory, shard["path"]))
        latents, actions = [], []
        for first in range(0, shard["num_records"], batch_size):
          last = min(first + batch_size, shard["num_records"])
          records = np.frombuffer(b"".join(reader.read(first, last)), dtype)
          images = geometry.to_model(records["frame"])
          padded = np.concatenate([images, np.repeat(images[-1:], batch_size - len(images), 0)])
          latents.append(np.asarray(encode(padded), np.float16)[:len(images)])
          actions.append(records["action"].astype(np.int32))
          bar.update(len(images))
        reader.close()
        if latents:
          latent_shape = list(latents[0].shape[1:])
        np.save(os.path.join(cache_dir, _stem(r, s) + ".latents.npy"),
                np.concatenate(latents) if latents else np.zeros((0, 1, 1, 1), np.float16))
        np.save(os.path.join(cache_dir, _stem(r, s) + ".actions.npy"),
                np.concatenate(actions) if actions else np.zeros((0,), np.int32))
  meta = {"recordings": recordings, "latent_shape": latent_shape, "geometry": dataclasses.asdict(geometry),
          "num_frames": total, "encoder": encoder}
  with open(meta_path + ".tmp", "w") as f:
    json.dump(meta, f, indent=1)
  os.replace(meta_path + ".tmp", meta_path)
  return meta


class LatentWindowSource:
  """Windows of cached latents: {"context": float32 [context, h, w, c], "actions": int32 [context],
  "target": float32 [h, w, c], "window": int64}, numbered as `record.WindowSource` numbers its windows."""

  def __init__(self, cache_dir: str, context: int, episodes: Sequence[int] | None = None, stride: int = 1):
    with open(os.path.join(cache_dir, META_FILE)) as f:
      self.meta = json.load(f)
    self.cache_dir, self.context = cache_dir, context
    self.windows = EpisodeWindows(self.meta["recordings"], context, episodes, stride)
    self._arrays: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

  def __len__(self) -> int:
    return len(self.windows)

  def _shard(self, recording: int, shard: int) -> tuple[np.ndarray, np.ndarray]:
    if (recording, shard) not in self._arrays:
      stem = os.path.join(self.cache_dir, _stem(recording, shard))
      self._arrays[recording, shard] = (np.load(stem + ".latents.npy", mmap_mode="r"),
                                        np.load(stem + ".actions.npy", mmap_mode="r"))
    return self._arrays[recording, shard]

  def __getitem__(self, j: int) -> dict[str, np.ndarray]:
    recording, shard, rows = self.windows.locate(j)
    latents, actions = self._shard(recording, shard)
    window = np.asarray(latents[rows], np.float32)
    return {"context": window[:-1], "actions": np.asarray(actions[rows[:-1]]), "target": window[-1],
            "window": np.int64(j)}

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state["_arrays"] = {}  # memory maps are reopened in each process
    return state

  def __repr__(self) -> str:
    return f"LatentWindowSource({self.cache_dir!r}, context={self.context}, {len(self)} windows)"
