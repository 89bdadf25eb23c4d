"""Grain pipelines of GameNGen's model training: frames for the autoencoder, latent windows for the denoiser
(arXiv 2408.14837, sec. 3.2 and 4.2).

Every example carries `seed` (uint32), drawn by Grain's `random_map` from the pipeline seed and the
example's position: the losses derive their noise from it (`example_keys`), so a resumed run (Grain's
iterator state is checkpointed) sees exactly the noise an uninterrupted one would, whatever the sharding.
Held-out episodes (`record.split_episodes`) never reach the training pipelines.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import jax
import numpy as np

from lwjax.projects.gamengen.frames import FrameGeometry
from lwjax.projects.gamengen.latents import LatentWindowSource
from lwjax.projects.gamengen.record import WindowSource


def _with_seed(example: dict, rng: np.random.Generator) -> dict:
  return {**example, "seed": np.uint32(rng.integers(0, 2**32 - 1))}


def _process_slice(ds: grain.MapDataset, batch_size: int, process_index: int | None, process_count: int | None):
  """(every process_count-th example from process_index, the local batch size): process p reads and decodes
  only its own examples, and the processes' batches of a step together hold the examples of one process's
  global batch (in another order), each with the seed of its global position."""
  p = jax.process_index() if process_index is None else process_index
  n = jax.process_count() if process_count is None else process_count
  if batch_size % n:
    raise ValueError(f"train.global_batch_size: {batch_size} does not split over {n} processes "
                     f"(valid: a multiple of {n})")
  return (ds[p::n] if n > 1 else ds), batch_size // n


def frame_dataset(recordings: Sequence[str], geometry: FrameGeometry, *, batch_size: int, episodes=None,
                  shuffle_seed: int | None = 0, num_epochs: int | None = None, process_index: int | None = None,
                  process_count: int | None = None) -> grain.IterDataset:
  """Batches {"image": float32 [b, H, W, 3] in [-1, 1], "seed": uint32 [b]} of single recorded frames;
  `batch_size` is the global batch, of which each process gets its share."""
  ds = grain.MapDataset.source(WindowSource(recordings, context=0, episodes=episodes))
  if shuffle_seed is not None:
    ds = ds.shuffle(seed=shuffle_seed)
  ds = ds.repeat(num_epochs).random_map(_with_seed, seed=shuffle_seed or 0)
  ds, local = _process_slice(ds, batch_size, process_index, process_count)
  ds = ds.map(lambda w: {"image": geometry.to_model(w["target"]), "seed": w["seed"]})
  return ds.to_iter_dataset().batch(local, drop_remainder=num_epochs is None)


def latent_window_dataset(cache_dir: str, context: int, *, batch_size: int, episodes=None, stride: int = 1,
                          shuffle_seed: int | None = 0, num_epochs: int | None = None,
                          process_index: int | None = None, process_count: int | None = None) -> grain.IterDataset:
  """Batches of `LatentWindowSource` windows plus "seed" (uint32 [b]); `batch_size` is the global batch, of
  which each process gets its share."""
  ds = grain.MapDataset.source(LatentWindowSource(cache_dir, context, episodes=episodes, stride=stride))
  if shuffle_seed is not None:
    ds = ds.shuffle(seed=shuffle_seed)
  ds = ds.repeat(num_epochs).random_map(_with_seed, seed=shuffle_seed or 0)
  ds, local = _process_slice(ds, batch_size, process_index, process_count)
  return ds.to_iter_dataset().batch(local, drop_remainder=num_epochs is None)


def example_keys(seed_b: jax.Array) -> jax.Array:
  """One PRNG key per example from the batch's `seed` field: [b] keys."""
  return jax.vmap(jax.random.key)(seed_b)
