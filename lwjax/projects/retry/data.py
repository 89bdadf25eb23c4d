"""iGSM (question, solution) rows for next-token training with the loss on the solution only
(Physics of LMs 2.2, Sec. 2: pretraining on retry data, with optional label masking of the wrong steps).

A problem is `[bos] question " " solution [eos]`; problems longer than `seq_len` are skipped (the
experiments size `seq_len` so that few are). With `pack`, whole problems are first-fit packed into rows of
`seq_len` (`grain.experimental.FirstFitPackIterDataset`, `batch_size` bins at a time), each a segment that
attends only to itself with positions from 0, so no problem is cut; iGSM-med problems of ops 1-4 average ~270
tokens, and a 512-token row is 80% used with 8 bins (87% with 64) against ~55% with one problem per
right-padded row (no `pack`). The loss mask covers the solution and the eos; with `mask_retries` the
tokens of each wrong step ("Define X as") are left out, while the [BACK] marker stays trained
(`lwjax.data.igsm.retry`). Fields as `lwjax.data.pipeline` (`inputs`, `targets`, `segment_ids`,
`positions`, `loss_mask`), so `losses.lm_loss` applies as is.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

from lwjax.data import igsm, pipeline


def parse_ops(text: str) -> tuple[int, ...]:
  """ "1-4" -> (1, 2, 3, 4); "2,4,6" -> (2, 4, 6)."""
  ops = []
  for part in text.split(","):
    lo, _, hi = part.partition("-")
    ops += range(int(lo), int(hi or lo) + 1)
  if not ops or min(ops) < 1:
    raise ValueError(f"ops {text!r}: expected op ranges like '1-4' or '2,4,6' of ops >= 1")
  return tuple(ops)


def encode_tokens(record: dict, tokenizer, seq_len: int, mask_retries: bool) -> dict[str, np.ndarray] | None:
  """`inputs`, `targets`, `loss_mask` of one problem, unpadded ([n], n <= seq_len); None when it is longer."""
  prompt = [tokenizer.bos_id] + tokenizer.encode(record["question"])
  solution, ends = tokenizer.encode_with_ends(" " + record["solution"])
  tokens = prompt + solution + [tokenizer.eos_id]
  if len(tokens) > seq_len + 1:
    return None
  trained = np.ones(len(solution) + 1, np.float32)
  if mask_retries:
    for start, end in record["masked_spans"]:  # spans index the solution, which the row shifts by one space
      for i, piece_end in enumerate(ends):
        if start < piece_end <= end + 1:
          trained[i] = 0.0
  n = len(tokens) - 1
  loss_mask = np.zeros(n, np.float32)
  loss_mask[len(prompt) - 1:] = trained
  return {"inputs": np.asarray(tokens[:-1], np.int32), "targets": np.asarray(tokens[1:], np.int32),
          "loss_mask": loss_mask}


def encode_example(record: dict, tokenizer, seq_len: int, mask_retries: bool) -> dict[str, np.ndarray] | None:
  """One right-padded training row of `record` (an `IGSMSource` record); None when it exceeds `seq_len`."""
  example = encode_tokens(record, tokenizer, seq_len, mask_retries)
  if example is None:
    return None
  n = len(example["inputs"])
  row = {k: np.zeros(seq_len, v.dtype) for k, v in example.items()}
  for k, v in example.items():
    row[k][:n] = v
  row["segment_ids"] = (np.arange(seq_len) < n).astype(np.int32)
  row["positions"] = np.where(row["segment_ids"] > 0, np.arange(seq_len), 0).astype(np.int32)
  return row


def _packed_fields(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """FirstFitPack output (`x`, `x_segment_ids`, `x_positions` per field) -> the LM example fields."""
  return {"inputs": packed["inputs"], "targets": packed["targets"], "loss_mask": packed["loss_mask"],
          "segment_ids": packed["inputs_segment_ids"].astype(np.int32),
          "positions": packed["inputs_positions"].astype(np.int32)}


def make_dataset(source: igsm.IGSMSource, tokenizer, *, seq_len: int, batch_size: int, mask_retries: bool,
                 shuffle_seed: int | None, num_epochs: int | None = None, pack: bool = False,
                 process_index: int | None = None, process_count: int | None = None) -> grain.IterDataset:
  """Batches [batch_size, seq_len] of rows of `source` (packed with `pack`); a checkpointable Grain dataset.
  `batch_size` is the global batch: on several processes each keeps its share (`pipeline.process_share`), so
  a step trains on the same rows whatever the number of processes."""
  ds = grain.MapDataset.source(source)
  if shuffle_seed is not None:
    ds = ds.shuffle(seed=shuffle_seed)
  encode = encode_tokens if pack else encode_example
  ds = ds.repeat(num_epochs).map(lambda r: encode(r, tokenizer, seq_len, mask_retries))
  ds = ds.to_iter_dataset().filter(lambda row: row is not None)
  if pack:
    lengths = {"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len}
    ds = grain.experimental.FirstFitPackIterDataset(ds, length_struct=lengths, num_packing_bins=batch_size,
                                                    shuffle_bins=False).map(_packed_fields)
  return pipeline.process_share(ds.batch(batch_size, drop_remainder=num_epochs is None), batch_size,
                                process_index=process_index, process_count=process_count)


def eval_records(ops: Sequence[int], num_per_op: int, *, seed: int, preset: str, fmt: str) -> list[dict]:
  """`num_per_op` held-out problems (test-split templates) at each op in `ops`."""
  return [igsm.IGSMSource(num_per_op, seed=seed + op, preset=preset, fmt=fmt, split="test", ops=(op,))[i]
          for op in ops for i in range(num_per_op)]
