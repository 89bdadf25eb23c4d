"""The quality of sampled training data (Smaller, Weaker, Yet Better, arXiv 2408.16737, §3.1), measured
exactly with the step checker's labels (`lwjax.candidates`), on the first k candidates of every problem:

- coverage@k: share of problems with at least one candidate whose final answer is right (the paper's
  definition); `full_coverage` counts a problem only when a candidate is right in every step.
- diversity@k: distinct right-answer solutions per problem, averaged over the problems that have one
  (solutions compared as their token sequences, whitespace normalised).
- false-positive rate@k: share of the right-answer candidates whose reasoning is wrong (a step the checker
  rejects). The paper estimates it by asking humans and Gemini about 50 solutions; here every candidate is
  checked.

`answer_filtered` is the paper's data filter: keep the candidates whose final answer is right.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _first(problems: Sequence[dict], k: int) -> list[list[dict]]:
  short = [p["index"] for p in problems if len(p["candidates"]) < k]
  if short:
    raise ValueError(f"k={k}: problems {short[:5]} have fewer candidates (sample more or choose a smaller k)")
  return [p["candidates"][:k] for p in problems]


def coverage(problems: Sequence[dict], k: int, field: str = "answer_correct") -> float:
  return float(np.mean([any(c[field] for c in cands) for cands in _first(problems, k)]))


def diversity(problems: Sequence[dict], k: int) -> float:
  """Mean number of distinct right-answer solutions over the problems with at least one (0 when none has)."""
  counts = [len({" ".join(c["text"].split()) for c in cands if c["answer_correct"]})
            for cands in _first(problems, k)]
  counts = [n for n in counts if n]
  return float(np.mean(counts)) if counts else 0.0


def false_positive_rate(problems: Sequence[dict], k: int) -> float:
  """Right final answer, wrong reasoning, among the right-answer candidates (nan when there are none)."""
  kept = [c for cands in _first(problems, k) for c in cands if c["answer_correct"]]
  return float(np.mean([not c["correct"] for c in kept])) if kept else float("nan")


def answer_filtered(problems: Sequence[dict], k: int) -> list[tuple[dict, dict]]:
  """(record, candidate) for every right-answer candidate among the first k of each problem."""
  return [(p["record"], c) for p, cands in zip(problems, _first(problems, k), strict=True) for c in cands
          if c["answer_correct"]]


def summary(problems: Sequence[dict], k: int) -> dict:
  kept = answer_filtered(problems, k)
  return {"k": k, "coverage": coverage(problems, k), "full_coverage": coverage(problems, k, "correct"),
          "diversity": diversity(problems, k), "false_positive_rate": false_positive_rate(problems, k),
          "kept": len(kept), "sample_accuracy": float(np.mean([c["answer_correct"] for cands in
                                                               _first(problems, k) for c in cands]))}
