"""Grain pipelines for language-model pretraining: text sources -> tokens -> packed [seq_len] rows -> batches.

Sources are random-access collections of documents: lines of local text files (`TextLineSource`), a TFDS
data set read through `tfds.data_source` (`tfds_text`, no TensorFlow needed), or an in-memory list of str.

Packing is concat-then-split (`grain.experimental.ConcatThenSplitIterDataset`): documents `[bos] + doc +
[eos]` are laid end to end and cut every `seq_len` tokens, so rows carry no padding except at the very end
of a finite run and no token is dropped, whatever a document's length. A document cut at a row end goes
on at the start of the next row as a new segment; its positions there restart at 0 (every position stays
below `seq_len`), and the one prediction across the cut is masked. First-fit packing would keep
documents whole but pads rows and truncates documents longer than `seq_len`.

The documents are split into `num_shards` fixed shards (`docs[s::num_shards]`), each packed and batched
on its own into `global_batch_size // num_shards` rows; process p owns the contiguous shards
[p * k, (p + 1) * k), k = num_shards // process_count, and its local batch is theirs concatenated in shard
order. With `num_shards` fixed, the global batch of a step (process 0's rows first) is the same whatever
the process count, so a run on 1 process and on 2 see the same data. The iterator of `make_lm_dataset`
is checkpointable: `it.get_state()` / `it.set_state(state)` resume exactly; with Orbax, save it as the
item `grain.checkpoint.CheckpointSave(it)` and restore with `grain.checkpoint.CheckpointRestore(it)`.
"""

from __future__ import annotations

import functools
import glob
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grain
import jax
import numpy as np

# A batch, each field [local_batch, seq_len]: inputs (int32 token ids, pad 0), targets (int32, the next
# token of the same segment, else pad), segment_ids (int32, 0 = padding, 1..k = the documents or document
# pieces of a row), positions (int32, within the segment), loss_mask (float32, 1 where targets is real).
BATCH_FIELDS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


class TextLineSource:
  """Random access to the non-empty lines of local text files, one document a line.

  Only byte offsets are kept in memory (two int64 per line); a document is read from disk when asked
  for, so the source serves corpora larger than memory and pickles cheaply into Grain workers.
  """

  def __init__(self, paths: str | Sequence[str]):
    if isinstance(paths, str):
      paths = sorted(glob.glob(paths)) or [paths]
    self.paths = list(paths)
    if not self.paths:
      raise ValueError("TextLineSource needs at least one path")
    file_ids, starts, ends = [], [], []
    for file_id, path in enumerate(self.paths):
      file_starts, file_ends = _line_offsets(path)
      starts.append(file_starts)
      ends.append(file_ends)
      file_ids.append(np.full(len(file_starts), file_id, np.int32))
    self._file_ids, self._starts, self._ends = (np.concatenate(a) for a in (file_ids, starts, ends))

  def __len__(self) -> int:
    return len(self._starts)

  def __getitem__(self, index: int) -> str:
    start, end = int(self._starts[index]), int(self._ends[index])
    with open(self.paths[self._file_ids[index]], "rb") as f:
      f.seek(start)
      return f.read(end - start).decode("utf-8")

  def __repr__(self) -> str:
    return f"TextLineSource({len(self)} lines in {len(self.paths)} files)"


def _line_offsets(path: str, chunk_bytes: int = 1 << 26) -> tuple[np.ndarray, np.ndarray]:
  """Byte [start, end) of each non-empty line of `path`, read in chunks to bound memory."""
  newlines, size = [np.zeros(0, np.int64)], 0
  with open(path, "rb") as f:
    while chunk := f.read(chunk_bytes):
      newlines.append(np.flatnonzero(np.frombuffer(chunk, np.uint8) == ord("\n")) + size)
      size += len(chunk)
  newlines = np.concatenate(newlines)
  starts, ends = np.concatenate([[0], newlines + 1]), np.concatenate([newlines, [size]])
  non_empty = ends > starts
  return starts[non_empty], ends[non_empty]


class SelectText(grain.transforms.Map):
  """A TFDS example dict -> its text feature as str."""

  def __init__(self, text_key: str):
    self.text_key = text_key

  def map(self, example: dict[str, Any]) -> str:
    text = example[self.text_key]
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)


def tfds_text(name: str, *, split: str, text_key: str = "text", data_dir: str | None = None) -> grain.MapDataset:
  """The `text_key` field of a prepared TFDS data set, random access through `tfds.data_source`.

  Import the builder module first (e.g. `tensorflow_datasets.text.lm1b`) so that `name` is registered.
  """
  import tensorflow_datasets as tfds  # only TFDS sources pay for (and need) it
  source = tfds.data_source(name, split=split, data_dir=data_dir)
  return grain.MapDataset.source(source).map(SelectText(text_key))


class Tokenize(grain.transforms.Map):
  """Document str -> {"tokens": [bos] + ids + [eos]} as int32 (no bos for a tokenizer without one: Qwen)."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer

  def map(self, text: str) -> dict[str, np.ndarray]:
    t = self.tokenizer
    bos = [] if t.bos_id is None else [t.bos_id]
    return {"tokens": np.asarray([*bos, *t.encode(text), t.eos_id], np.int32)}


class PackedToExample(grain.transforms.Map):
  """A packed row (`tokens`, `tokens_segment_ids`, `tokens_positions`, each [L]) -> the LM example fields.

  The target of position i is token i + 1 of the same segment; where i is the last token of its
  segment (or padding) the target is `pad_id` and `loss_mask` is 0, so no target crosses documents.
  """

  def __init__(self, pad_id: int):
    self.pad_id = pad_id

  def map(self, packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    segment_ids = packed["tokens_segment_ids"].astype(np.int32)  # [L], 0 = padding
    inputs = np.where(segment_ids > 0, packed["tokens"], self.pad_id).astype(np.int32)
    has_next = np.zeros(len(inputs), bool)
    has_next[:-1] = (segment_ids[:-1] > 0) & (segment_ids[1:] == segment_ids[:-1])
    targets = np.where(has_next, np.roll(inputs, -1), self.pad_id).astype(np.int32)
    return {
        "inputs": inputs,
        "targets": targets,
        "segment_ids": segment_ids,
        "positions": np.where(segment_ids > 0, packed["tokens_positions"], 0).astype(np.int32),
        "loss_mask": has_next.astype(np.float32),
    }


class _JsonSafePackState(grain.IterDataset):
  """Passes a `ConcatThenSplitIterDataset` through, restoring its state from JSON correctly.

  grain 0.2.18 marks "no remainder" with the tuple (-1, -1); state read back from JSON (as the Orbax
  `grain.checkpoint` handler does) holds a list there, which the packer takes for a remainder and so
  drops one document on resume. Turning the slices back into tuples makes the resume exact.
  """

  def __iter__(self) -> grain.DatasetIterator:
    return _JsonSafePackStateIterator(self._parent.__iter__())


class _JsonSafePackStateIterator(grain.DatasetIterator):

  def __next__(self):
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]):
    slices = {k: tuple(v) for k, v in state["remainder_slices"].items()}
    self._parent.set_state({**state, "remainder_slices": slices})


class _ConcatShardBatches(grain.IterDataset):
  """Zips the batch streams of several shards and concatenates each step's batches along the batch axis.

  A finite shard that ends before the others contributes all-padding rows (zeros: segment 0, loss_mask
  0), as `batch_and_pad` fills a short batch, until every shard has ended.
  """

  def __iter__(self) -> grain.DatasetIterator:
    return _ConcatShardBatchesIterator([parent.__iter__() for parent in self.parents])


class _ConcatShardBatchesIterator(grain.DatasetIterator):

  def __next__(self) -> dict[str, np.ndarray]:
    batches = [next(shard, None) for shard in self._parents]
    live = [b for b in batches if b is not None]
    if not live:
      raise StopIteration
    padding = {k: np.zeros_like(v) for k, v in live[0].items()}
    return {k: np.concatenate([(padding if b is None else b)[k] for b in batches]) for k in padding}

  def get_state(self) -> dict[str, Any]:
    return {"shards": [shard.get_state() for shard in self._parents]}

  def set_state(self, state: dict[str, Any]):
    for shard, shard_state in zip(self._parents, state["shards"], strict=True):
      shard.set_state(shard_state)


def make_lm_dataset(source: Sequence[str] | grain.MapDataset, tokenizer, *, seq_len: int, global_batch_size: int,
                    shuffle_seed: int | None, num_epochs: int | None = None, process_index: int | None = None,
                    process_count: int | None = None, num_shards: int | None = None,
                    read_options: grain.ReadOptions | None = None) -> grain.IterDataset:
  """Batches of packed LM examples for this process: dicts of `BATCH_FIELDS`, each [local_batch, seq_len].

  Args:
    source: the documents: a `TextLineSource`, a list of str, or a `grain.MapDataset` of str (several
      sources: `grain.MapDataset.concatenate` or `grain.MapDataset.mix` them first).
    tokenizer: `lwjax.data.tokenizer` interface (`encode`, `bos_id`, `eos_id`, `pad_id`).
    seq_len: length L of a packed row.
    global_batch_size: rows per step over all processes; each process yields
      `global_batch_size // process_count` of them, `global_batch_size // num_shards` from each shard.
    shuffle_seed: seed of the document shuffle (reshuffled each epoch); None keeps the source order.
    num_epochs: passes over the documents; None repeats forever (training). A finite run ends with a
      batch filled up by padding rows (`loss_mask` 0), so no document is lost (evaluation).
    process_index, process_count: this process's place; default `jax.process_index()/process_count()`.
    num_shards: fixed document shards, a multiple of `process_count` (its default); keep it fixed to
      see the same global batches on any number of processes.
    read_options: Grain threads and prefetch for reading and tokenizing documents.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  num_shards = process_count if num_shards is None else num_shards
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
  if num_shards < 1 or num_shards % process_count:
    raise ValueError(f"num_shards ({num_shards}) must be a positive multiple of the process count "
                     f"({process_count})")
  if global_batch_size % num_shards:
    raise ValueError(f"global_batch_size ({global_batch_size}) must be divisible by num_shards ({num_shards}, "
                     f"by default the process count)")
  if seq_len < 2:
    raise ValueError(f"seq_len must be at least 2, got {seq_len}")
  docs = source if isinstance(source, grain.MapDataset) else grain.MapDataset.source(source)
  shards_per_process = num_shards // process_count
  first = process_index * shards_per_process
  shards = [_packed_shard(docs, shard, num_shards, tokenizer, seq_len=seq_len,
                          batch_size=global_batch_size // num_shards, shuffle_seed=shuffle_seed,
                          num_epochs=num_epochs, read_options=read_options)
            for shard in range(first, first + shards_per_process)]
  return shards[0] if len(shards) == 1 else _ConcatShardBatches(shards)


def _packed_shard(docs: grain.MapDataset, shard: int, num_shards: int, tokenizer, *, seq_len: int, batch_size: int,
                  shuffle_seed: int | None, num_epochs: int | None,
                  read_options: grain.ReadOptions | None) -> grain.IterDataset:
  """Batches of `batch_size` packed rows of the documents `docs[shard::num_shards]`."""
  shard_docs = docs[shard::num_shards]
  if not len(shard_docs):
    raise ValueError(f"shard {shard} of {num_shards} got no documents (the source has {len(docs)})")
  if shuffle_seed is not None:
    shard_docs = shard_docs.shuffle(seed=shuffle_seed)
  shard_docs = shard_docs.repeat(num_epochs).map(Tokenize(tokenizer))
  rows = grain.experimental.ConcatThenSplitIterDataset(
      shard_docs.to_iter_dataset(read_options), length_struct={"tokens": seq_len})
  rows = _JsonSafePackState(rows).map(PackedToExample(tokenizer.pad_id))
  # batch_and_pad fills a short last batch with zeros: segment 0 and loss_mask 0, inputs the pad id 0.
  pad_batch = functools.partial(grain.experimental.batch_and_pad, batch_size=batch_size, pad_value=0)
  return rows.batch(batch_size, batch_fn=pad_batch)


def process_share(ds: grain.IterDataset, global_batch_size: int, *, process_index: int | None = None,
                  process_count: int | None = None) -> grain.IterDataset:
  """This process's rows of every global batch of `ds` (process p: rows [p * b, (p + 1) * b), b = global /
  process_count), so the global batch of a step is the same whatever the number of processes.

  For pipelines that are cheap to run whole on every host (generated rows, packed problems): each process
  builds every global batch and keeps its share. `global_batch` then assembles the global array."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size % process_count:
    raise ValueError(f"train.global_batch_size: {global_batch_size} does not split over {process_count} processes "
                     f"(valid: a multiple of {process_count})")
  if process_count == 1:
    return ds
  local = global_batch_size // process_count
  start = process_index * local
  return ds.map(lambda batch: {k: v[start:start + local] for k, v in batch.items()})


def global_batch(local_batch: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding) -> dict[str, jax.Array]:
  """Global [global_batch, seq_len] jax Arrays from each process's [local_batch, seq_len] rows."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def take_padded(batches: Iterator[dict[str, np.ndarray]], num_batches: int) -> Iterator[dict[str, np.ndarray]]:
  """Exactly `num_batches` batches: after `batches` ends, all-zero ones (loss_mask 0, segment 0).

  Every process then runs the same number of collective steps over a finite data set (evaluation),
  whatever the length of its own shard.
  """
  last = None
  for _ in range(num_batches):
    batch = next(batches, None)
    if batch is None:
      if last is None:
        raise ValueError("take_padded: the data set yielded no batch to take the shapes from")
      batch = {k: np.zeros_like(v) for k, v in last.items()}
    last = batch
    yield batch


def token_counts(batches: Iterable[dict[str, np.ndarray]], vocab_size: int) -> np.ndarray:
  """Counts [vocab_size] of the scored targets (`loss_mask > 0`) of `batches`."""
  counts = np.zeros(vocab_size, np.int64)
  for batch in batches:
    counts += np.bincount(batch["targets"][batch["loss_mask"] > 0].ravel(), minlength=vocab_size)[:vocab_size]
  return counts


def unigram_cross_entropy(train_counts: np.ndarray, eval_counts: np.ndarray) -> float:
  """Cross-entropy in nats per token of the eval tokens under the add-one-smoothed train unigram.

  The baseline a language model's eval loss (also in nats) must beat: p(t) = (count_train(t) + 1) /
  (n_train + vocab_size). Both arguments are token counts [vocab_size] (`token_counts`), so counts
  from several processes can be summed first.
  """
  train_counts, eval_counts = np.asarray(train_counts, np.float64), np.asarray(eval_counts, np.float64)
  if train_counts.shape != eval_counts.shape or not eval_counts.sum():
    raise ValueError(f"need count vectors of one vocabulary size and at least one eval token, got "
                     f"{train_counts.shape} and {eval_counts.shape} with {eval_counts.sum():.0f} eval tokens")
  log_probs = np.log(train_counts + 1.0) - np.log(train_counts.sum() + len(train_counts))
  return float(-(eval_counts * log_probs).sum() / eval_counts.sum())
