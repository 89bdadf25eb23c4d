"""Scores of the official scripts: SQuAD's exact match and F1 (`evaluate-v2.0.py`: lowercase, punctuation and the
articles a/an/the removed, whitespace collapsed; the best over the gold answers; an unanswerable question's gold
answer is the empty string) and RULER's `string_match_all` for common-words extraction (the share of the expected
words found in the prediction, case-insensitive)."""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def _tokens(text: str) -> list[str]:
  return normalize_answer(text).split() if text else []


def exact(gold: str, predicted: str) -> float:
  return float(normalize_answer(gold) == normalize_answer(predicted))


def f1(gold: str, predicted: str) -> float:
  gold_tokens, predicted_tokens = _tokens(gold), _tokens(predicted)
  if not gold_tokens or not predicted_tokens:
    return float(gold_tokens == predicted_tokens)
  same = sum((collections.Counter(gold_tokens) & collections.Counter(predicted_tokens)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(predicted_tokens), same / len(gold_tokens)
  return 2 * precision * recall / (precision + recall)


def squad(predicted: str, answers: Sequence[str]) -> dict[str, float]:
  """{"exact_match", "f1"}: the best over the gold answers (those that normalise to nothing dropped; none left:
  the empty answer, right only for an empty prediction)."""
  golds = [a for a in answers if normalize_answer(a)] or [""]
  return {"exact_match": max(exact(g, predicted) for g in golds), "f1": max(f1(g, predicted) for g in golds)}


def string_match_all(predicted: str, expected: Sequence[str]) -> float:
  """RULER's score of one prediction: the share of the expected strings it contains, case-insensitive."""
  text = predicted.lower()
  return sum(e.lower() in text for e in expected) / len(expected)
