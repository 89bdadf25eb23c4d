"""Verifier training data from labelled candidates (GenRM, arXiv 2408.15240, §3-4): one right-padded row per
candidate for each verifier kind, plus, for the unified verifier, the solution-generation rows of the
correct candidates with weight lambda.

Rows hold `inputs`, `targets`, `loss_mask`, `positions`, `segment_ids` (the LM fields of
`lwjax.training.losses.lm_loss`) and, for the discriminative head, `last` (where to read the head),
`label` (1 = the whole solution is correct) and `weight`. Candidates are balanced per problem: at most
`per_class` correct and `per_class` incorrect ones of each problem, so neither verdict dominates.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np

from lwjax.data import rows as rows_lib, tokenizer as tokenizer_lib
from lwjax.projects.genrm import rationale

KINDS = ("disc", "direct", "cot", "unified")


def balanced(problems: list[dict], per_class: int, seed: int) -> list[tuple[dict, dict]]:
  """(problem record, candidate) pairs: up to `per_class` correct and incorrect candidates per problem."""
  rng, pairs = random.Random(seed), []
  for problem in problems:
    for verdict in (True, False):
      group = [c for c in problem["candidates"] if c["correct"] == verdict]
      rng.shuffle(group)
      pairs += [(problem["record"], c) for c in group[:per_class]]
  rng.shuffle(pairs)
  return pairs


def _row(prompt_ids: list[int], target_ids: list[int], seq_len: int, weight: float = 1.0) -> dict | None:
  """`rows.lm_row` plus the discriminative head's fields, so that every row of a batch has every field."""
  row = rows_lib.lm_row(prompt_ids, target_ids, seq_len, weight)
  if row is None:
    return None
  row.update(last=np.int32(0), label=np.float32(0), weight=np.float32(0))
  return row


def verification_row(kind: str, task: str, record: dict, candidate: dict, tokenizer, seq_len: int) -> dict | None:
  """The training row of one candidate for verifier `kind` (disc, direct or cot)."""
  bos, question, solution = tokenizer_lib.bos_prefix(tokenizer), record["question"], candidate["text"]
  label = float(candidate["correct"])
  if kind == "disc":
    ids = bos + tokenizer.encode(f"{question} {solution}")
    row = _row(ids, [tokenizer.eos_id], seq_len, weight=0.0)
    if row is not None:
      row.update(last=np.int32(len(ids) - 1), label=np.float32(label), weight=np.float32(1.0))
    return row
  if kind == "direct":
    prompt = bos + tokenizer.encode(rationale.direct_prompt(question, solution))
    return _row(prompt, tokenizer.encode(rationale.YES if label else rationale.NO), seq_len)
  if kind == "cot":
    prompt = bos + tokenizer.encode(rationale.cot_prompt(question, solution))
    written = candidate.get("rationale") or rationale.rationale(task, record, solution, candidate["correct"],
                                                                candidate["first_error"])
    # The verdict word is encoded on its own, as scoring reads it (p(encode("Yes")[0]) after the last `;`): a
    # subword tokenizer would otherwise fold it into " Yes", another token.
    reasoning, verdict = written.rsplit(" ", 1)
    return _row(prompt, tokenizer.encode(reasoning) + tokenizer.encode(verdict) + [tokenizer.eos_id], seq_len)
  raise ValueError(f"verifier kind {kind!r}: expected one of disc, direct, cot")


def solution_row(record: dict, solution: str, tokenizer, seq_len: int, weight: float) -> dict | None:
  """Solution generation (the solver's own objective) on a correct solution, with loss weight `weight`."""
  return _row(tokenizer_lib.bos_prefix(tokenizer) + tokenizer.encode(record["question"]),
              tokenizer.encode(solution) + [tokenizer.eos_id], seq_len, weight)


def training_rows(kind: str, task: str, problems: list[dict], tokenizer, *, seq_len: int, per_class: int,
                  seed: int, unified_lambda: float = 0.0, unified_base: str = "direct",
                  write_rationales: Callable[[list[tuple[dict, dict]]], list[list[str]]] | None = None
                  ) -> list[dict]:
  """All training rows for verifier `kind`; `unified` = `unified_base` rows + lambda x solution rows of the
  correct candidates (the weight enters each row's loss mask, so the batch loss is their weighted mean).

  CoT rationales are the step checker's, or, with `write_rationales` (the balanced pairs -> the kept rationale
  targets of each, `api_rationales.write`), written by a model: one row per kept rationale, and a candidate
  without one gets no CoT row."""
  pairs = balanced(problems, per_class, seed)
  base = unified_base if kind == "unified" else kind
  verified = pairs
  if base == "cot" and write_rationales is not None:
    verified = [(record, {**c, "rationale": text}) for (record, c), texts in zip(pairs, write_rationales(pairs),
                                                                                  strict=True) for text in texts]
  rows = [verification_row(base, task, record, c, tokenizer, seq_len) for record, c in verified]
  if kind == "unified":
    rows += [solution_row(record, c["text"], tokenizer, seq_len, unified_lambda) for record, c in pairs
             if c["correct"]]
  rows = [r for r in rows if r is not None]
  if not rows:
    raise ValueError(f"no {kind} training rows fit seq_len={seq_len} (valid: a larger data.seq_len)")
  random.Random(seed).shuffle(rows)
  return rows
