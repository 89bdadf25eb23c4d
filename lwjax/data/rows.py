"""Unpacked LM rows (one prompt + target per row) and shuffled, repeated batches of them.

What the projects that train on generated (prompt, target) pairs share: GenRM's verifier and solver rows,
LRP4RAG's question-answering rows, the Mamba distillation's document and pseudo-label rows.
"""

from __future__ import annotations

import grain
import numpy as np

from lwjax.data import pipeline


def lm_row(prompt_ids: list[int], target_ids: list[int], seq_len: int, weight: float = 1.0) -> dict | None:
  """One row: the loss (weight `weight`) on `target_ids`, predicted after the prompt; None when the tokens
  exceed seq_len + 1. Fields: inputs, targets, loss_mask, segment_ids (1 on the row's tokens), positions."""
  tokens = list(prompt_ids) + list(target_ids)
  if len(tokens) > seq_len + 1:
    return None
  n = len(tokens) - 1
  row = {"inputs": np.zeros(seq_len, np.int32), "targets": np.zeros(seq_len, np.int32),
         "loss_mask": np.zeros(seq_len, np.float32)}
  row["inputs"][:n], row["targets"][:n] = tokens[:-1], tokens[1:]
  row["loss_mask"][len(prompt_ids) - 1:n] = weight
  row["segment_ids"] = (np.arange(seq_len) < n).astype(np.int32)
  row["positions"] = np.where(row["segment_ids"] > 0, np.arange(seq_len), 0).astype(np.int32)
  return row


def masked_row(tokens: list[int], weights: list[float], seq_len: int) -> dict:
  """One row of `tokens` cut to seq_len + 1, the loss on token j weighted `weights[j]` (the first token is never
  predicted); fields as `lm_row`'s."""
  tokens, weights = list(tokens)[:seq_len + 1], list(weights)[:seq_len + 1]
  n = len(tokens) - 1
  row = {"inputs": np.zeros(seq_len, np.int32), "targets": np.zeros(seq_len, np.int32),
         "loss_mask": np.zeros(seq_len, np.float32)}
  row["inputs"][:n], row["targets"][:n], row["loss_mask"][:n] = tokens[:-1], tokens[1:], weights[1:]
  row["segment_ids"] = (np.arange(seq_len) < n).astype(np.int32)
  row["positions"] = np.where(row["segment_ids"] > 0, np.arange(seq_len), 0).astype(np.int32)
  return row


def stack(rows: list[dict]) -> dict:
  """Rows -> one dict of [n, ...] arrays."""
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def shuffled_batches(rows: list[dict], *, batch_size: int, seed: int, process_index: int | None = None,
                     process_count: int | None = None) -> grain.IterDataset:
  """Shuffled, repeated batches of `rows`; a checkpointable Grain dataset. `batch_size` is the global batch:
  on several processes each gets its share of it (`pipeline.process_share`), the same rows as on one."""
  ds = grain.MapDataset.source(rows).shuffle(seed=seed).repeat().to_iter_dataset().batch(batch_size,
                                                                                          drop_remainder=True)
  return pipeline.process_share(ds, batch_size, process_index=process_index, process_count=process_count)
