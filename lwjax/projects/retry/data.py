"""iGSM (question, solution) rows for next-token training with the loss on the solution only
(Physics of LMs 2.2, Sec. 2: pretraining on retry data, with optional label masking of the wrong steps).

A row is `[bos] question " " solution [eos]`, one problem per row, right-padded to `seq_len`; problems
that do not fit are skipped (the experiments size `seq_len` so that few are). The loss mask covers the
solution and the eos; with `mask_retries` the tokens of each wrong step ("Define X as") are left out,
while the [BACK] marker stays trained (`lwjax.data.igsm.retry`). Fields as `lwjax.data.pipeline`
(`inputs`, `targets`, `segment_ids`, `positions`, `loss_mask`), so `losses.lm_loss` applies as is.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

from lwjax.data import igsm


def parse_ops(text: str) -> tuple[int, ...]:
  """ "1-4" -> (1, 2, 3, 4); "2,4,6" -> (2, 4, 6)."""
  ops = []
  for part in text.split(","):
    lo, _, hi = part.partition("-")
    ops += range(int(lo), int(hi or lo) + 1)
  if not ops or min(ops) < 1:
    raise ValueError(f"ops {text!r}: expected op ranges like '1-4' or '2,4,6' of ops >= 1")
  return tuple(ops)


def encode_example(record: dict, tokenizer, seq_len: int, mask_retries: bool) -> dict[str, np.ndarray] | None:
  """One padded training row of `record` (an `IGSMSource` record); None when it exceeds `seq_len`."""
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
  row = {k: np.zeros(seq_len, np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
  row["inputs"][:n], row["targets"][:n] = tokens[:-1], tokens[1:]
  row["segment_ids"][:n], row["positions"][:n] = 1, np.arange(n)
  row["loss_mask"] = np.zeros(seq_len, np.float32)
  row["loss_mask"][len(prompt) - 1:n] = trained
  return row


def make_dataset(source: igsm.IGSMSource, tokenizer, *, seq_len: int, batch_size: int, mask_retries: bool,
                 shuffle_seed: int | None, num_epochs: int | None = None) -> grain.IterDataset:
  """Batches [batch_size, seq_len] of rows of `source`; a checkpointable Grain dataset."""
  ds = grain.MapDataset.source(source)
  if shuffle_seed is not None:
    ds = ds.shuffle(seed=shuffle_seed)
  ds = ds.repeat(num_epochs).map(lambda r: encode_example(r, tokenizer, seq_len, mask_retries))
  ds = ds.to_iter_dataset().filter(lambda row: row is not None)
  return ds.batch(batch_size, drop_remainder=num_epochs is None)


def eval_records(ops: Sequence[int], num_per_op: int, *, seed: int, preset: str, fmt: str) -> list[dict]:
  """`num_per_op` held-out problems (test-split templates) at each op in `ops`."""
  return [igsm.IGSMSource(num_per_op, seed=seed + op, preset=preset, fmt=fmt, split="test", ops=(op,))[i]
          for op in ops for i in range(num_per_op)]
