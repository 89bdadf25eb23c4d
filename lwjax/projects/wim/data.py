"""Training rows of the WiM reader (Writing in the Margins, arXiv 2408.14906): every prompt of `prompts` with its
exact target, from generated documents of every task and length.

Per document: a margin row for each segment (the context up to it, the extraction prompt, the segment's
margin), a relevance row for each margin (and, for retrieval, one for a distractor fact of the segment, which
is not relevant), and three answer rows: after the context with the kept margins, after the context alone (full
context), and after the relevant segments alone (retrieval-only). A row is built when its batch is drawn
(`batches`: a checkpointable Grain pipeline over (document, row) pairs), so long documents cost no memory.
For documents whose facts are assignments (retrieval, multi-hop) one more row drills the skill every prompt
leans on, finding which key was assigned a value: after the context, every assignment is asked in turn as a
retrieval question (`? get v42 ans` -> `k17`, the loss on the answers only). It is ours, not the paper's, as
are the copy rows (`copy_fraction` of all rows: a random run of keys and values, `?`, the run again, the loss on
the repeat). Copying random sequences is what forms induction heads in a small causal LM, and with them the
lookup every fact prompt needs (find the queried word, copy the word after it): docs/RESULTS.md measured it.
Rows are packed first-fit into `seq_len` sequences (attention kept within each row by its segment id): most
rows are far shorter than the longest, and each carries only a few target tokens.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import grain
import numpy as np

from lwjax.data import pipeline, rows as rows_lib
from lwjax.data.tokenizer import bos_prefix
from lwjax.projects.wim import prompts, tasks

KINDS = ("margin", "relevance", "distractor", "answer_margins", "answer_full", "answer_retrieval", "recall", "copy")
COPY_WORDS = tasks.KEYS + tasks.VALUES


def row_specs(record: tasks.Record) -> list[tuple[str, int]]:
  """(kind, segment or 0) of every row of `record`."""
  specs = [("margin", i) for i in range(len(record.segments))]
  specs += [("relevance", i) for i in range(len(record.segments))]
  if record.task == "retrieval":
    specs += [("distractor", i) for i, s in enumerate(record.segments) if _distractor(record, i) is not None]
  if _assignments(record):
    specs.append(("recall", 0))
  return specs + [("answer_margins", 0), ("answer_full", 0), ("answer_retrieval", 0)]


def _assignments(record: tasks.Record) -> list[tuple[str, str]]:
  """(key, what it is assigned) of every fact of the document, in document order."""
  return [(target, source) for source, target in tasks.assignments(record.context)]


def _recall_row(tok: tasks.WiMTokenizer, record: tasks.Record, seq_len: int) -> dict | None:
  """The context, then each assignment asked in turn as `? get <value> ans` -> `<key>` (document order
  reversed: the first answer is not simply the last fact read), the loss on the answers only."""
  prompt = bos_prefix(tok) + tasks.encode_segments(tok, record.segments)
  tokens, is_answer = list(prompt), [False] * len(prompt)
  for key, value in reversed(_assignments(record)):
    query, answer = tok.encode(f"? get {value} ans"), tok.encode(key)
    tokens += query + answer
    is_answer += [False] * len(query) + [True] * len(answer)
  row = rows_lib.lm_row(prompt, tokens[len(prompt):], seq_len)
  if row is not None:  # loss_mask[i] is the loss on predicting tokens[i + 1]
    n = len(tokens) - 1
    row["loss_mask"][:n] = np.asarray(is_answer[1:], np.float32)
  return row


def copy_row(tok: tasks.WiMTokenizer, rng: random.Random, seq_len: int) -> dict | None:
  """`<bos> w1 .. wn ? w1 .. wn` for 4-24 random keys and values, the loss on the repeat."""
  n = min(rng.randint(4, 24), max(1, (seq_len - 2) // 2))
  words = " ".join(rng.choice(COPY_WORDS) for _ in range(n))
  return rows_lib.lm_row(bos_prefix(tok) + tok.encode(f"{words} ?"), tok.encode(words), seq_len)


def _distractor(record: tasks.Record, index: int) -> str | None:
  """A fact of segment `index` holding another value than the queried one (retrieval), or None."""
  value = record.query.split()[1]
  for source, target in tasks.assignments(record.segments[index]):
    if source != value:
      return " ".join(tasks.fact(source, target))
  return None


def build_row(tok: tasks.WiMTokenizer, record: tasks.Record, kind: str, index: int, seq_len: int) -> dict | None:
  """One training row (`rows.lm_row`: loss on the target only), None when longer than seq_len."""
  bos, eos = bos_prefix(tok), [tok.eos_id]
  answer = tok.encode(" ".join(record.answer)) + eos
  if kind == "margin":
    context = bos + tasks.encode_segments(tok, record.segments[:index + 1])
    return rows_lib.lm_row(context + prompts.extraction(tok, record.query),
                           tok.encode(record.margins[index]) + eos, seq_len)
  if kind in ("relevance", "distractor"):
    margin = record.margins[index] if kind == "relevance" else _distractor(record, index)
    relevant = record.relevant[index] if kind == "relevance" else False
    return rows_lib.lm_row(prompts.classification(tok, record.query, margin),
                           tok.encode(tasks.YES if relevant else tasks.NO) + eos, seq_len)
  if kind == "recall":
    return _recall_row(tok, record, seq_len)
  if kind == "answer_margins":
    kept = [m for m, r in zip(record.margins, record.relevant, strict=True) if r]
    return rows_lib.lm_row(bos + tasks.encode_segments(tok, record.segments)
                           + prompts.answer_with_margins(tok, record.query, kept), answer, seq_len)
  if kind == "answer_full":
    return rows_lib.lm_row(bos + tasks.encode_segments(tok, record.segments) + prompts.answer_direct(tok, record.query),
                           answer, seq_len)
  if kind == "answer_retrieval":
    chosen = [s for s, r in zip(record.segments, record.relevant, strict=True) if r]
    return rows_lib.lm_row(bos + tasks.encode_segments(tok, chosen) + prompts.answer_direct(tok, record.query),
                           answer, seq_len)
  raise ValueError(f"kind={kind!r}: expected one of {KINDS}")


def documents(num: int, *, seed: int, task_names: Sequence[str], num_segments: Sequence[int],
              segment_words: int) -> list[tasks.Record]:
  """`num` documents per task, lengths drawn from `num_segments`, tasks interleaved."""
  per_task = [tasks.generate(t, num, seed=seed, num_segments=num_segments, segment_words=segment_words)
              for t in task_names]
  return [r for group in zip(*per_task, strict=True) for r in group]


def batches(records: Sequence[tasks.Record], tok: tasks.WiMTokenizer, *, seq_len: int, batch_size: int,
            seed: int, copy_fraction: float = 0.0, process_index: int | None = None,
            process_count: int | None = None) -> grain.IterDataset:
  """Shuffled, repeated batches of every row of every record, packed first-fit several to a sequence (fields as
  `rows.lm_row`'s, segment ids 1..k per sequence, positions restarting at each row); rows over seq_len are
  replaced by another row of the same record (a short one: its relevance row). `copy_fraction` of the rows are
  copy rows (`copy_row`, each drawn from its own seed: a resumed pipeline makes the same ones). `batch_size` is
  the global batch; on several processes each keeps its share (`pipeline.process_share`)."""
  if not 0.0 <= copy_fraction < 1.0:
    raise ValueError(f"copy_fraction={copy_fraction}: expected a share in [0, 1)")
  specs = [(i, kind, index) for i, r in enumerate(records) for kind, index in row_specs(r)]
  specs += [(-1, "copy", j) for j in range(round(len(specs) * copy_fraction / (1.0 - copy_fraction)))]
  fields = ("inputs", "targets", "loss_mask")

  def make(spec):
    i, kind, index = spec
    if kind == "copy":
      row = copy_row(tok, random.Random(f"copy/{seed}/{index}"), seq_len)
      n = int(row["segment_ids"].sum())
      return {k: row[k][:n] for k in fields}
    row = build_row(tok, records[i], kind, index, seq_len)
    row = row if row is not None else build_row(tok, records[i], "relevance", 0, seq_len)
    n = int(row["segment_ids"].sum())
    return {k: row[k][:n] for k in fields}

  rows = grain.MapDataset.source(specs).shuffle(seed=seed).map(make).repeat().to_iter_dataset()
  packed = grain.experimental.FirstFitPackIterDataset(rows, length_struct={k: seq_len for k in fields},
                                                      num_packing_bins=batch_size, shuffle_bins=False)
  ds = packed.map(_packed_fields).batch(batch_size, drop_remainder=True)
  return pipeline.process_share(ds, batch_size, process_index=process_index, process_count=process_count)


def _packed_fields(packed: dict) -> dict:
  return {"inputs": packed["inputs"].astype("int32"), "targets": packed["targets"].astype("int32"),
          "loss_mask": packed["loss_mask"].astype("float32"),
          "segment_ids": packed["inputs_segment_ids"].astype("int32"),
          "positions": packed["inputs_positions"].astype("int32")}
