"""Best-of-N selection and its baselines (GenRM, arXiv 2408.15240, §4 metrics): for N candidates of a problem,
a verifier picks the highest-scored one; self-consistency picks the most frequent final answer; pass@N
(the oracle) succeeds when any candidate is right; the first sample is N = 1 without selection.

Accuracy at n < N is the expectation over random n-subsets of the problem's N candidates (estimated with
`draws` subsets per problem), then averaged over problems with its standard error across problems.
"""

from __future__ import annotations

import collections
import math

import numpy as np


def _mean_se(per_problem: np.ndarray) -> tuple[float, float]:
  n = len(per_problem)
  return float(per_problem.mean()), float(per_problem.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0


def _subsets(num_candidates: int, n: int, draws: int, rng: np.random.Generator) -> np.ndarray:
  """[draws, n] candidate indices, each row a random n-subset (the whole set once when n == N)."""
  if n >= num_candidates:
    return np.arange(num_candidates)[None]
  return np.argsort(rng.random((draws, num_candidates)), axis=1)[:, :n]


def best_of_n(scores_pn: np.ndarray, correct_pn: np.ndarray, n: int, *, draws: int = 64,
              seed: int = 0) -> tuple[float, float]:
  """(accuracy, standard error) of picking the top-scored of n candidates (ties: the first drawn)."""
  rng = np.random.default_rng(seed)
  per_problem = []
  for scores, correct in zip(scores_pn, correct_pn, strict=True):
    subsets = _subsets(len(scores), n, draws, rng)
    picked = subsets[np.arange(len(subsets)), np.argmax(scores[subsets], axis=1)]
    per_problem.append(correct[picked].mean())
  return _mean_se(np.asarray(per_problem, np.float64))


def majority_vote(answers_pn: list[list[str | None]], correct_pn: np.ndarray, n: int, *, draws: int = 64,
                  seed: int = 0) -> tuple[float, float]:
  """Self-consistency: the most frequent final answer among n candidates (ties: the first seen; candidates
  without an answer do not vote), then one pick, as a verifier makes one: the first drawn candidate with that
  answer, scored by `correct_pn` (the same for every candidate of an answer when correctness is the answer's;
  on the whole-solution metric a wrong solution with the right answer loses)."""
  rng = np.random.default_rng(seed)
  per_problem = []
  for answers, correct in zip(answers_pn, correct_pn, strict=True):
    wins = []
    for subset in _subsets(len(answers), n, draws, rng):
      votes = collections.Counter(answers[i] for i in subset if answers[i] is not None)
      if not votes:
        wins.append(0.0)
        continue
      top = max(votes.values())
      picked = next(i for i in subset if answers[i] is not None and votes[answers[i]] == top)
      wins.append(float(correct[picked]))
    per_problem.append(np.mean(wins))
  return _mean_se(np.asarray(per_problem, np.float64))


def pass_at_n(correct_pn: np.ndarray, n: int) -> tuple[float, float]:
  """The oracle: the probability that a random n-subset holds a right candidate (exact, per problem)."""
  num = correct_pn.shape[1]
  per_problem = []
  for correct in correct_pn:
    wrong = num - int(correct.sum())
    per_problem.append(1.0 - (math.comb(wrong, n) / math.comb(num, n) if wrong >= n else 0.0))
  return _mean_se(np.asarray(per_problem, np.float64))


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
  """Area under the ROC curve: P(score of a random positive > score of a random negative), ties half."""
  scores, labels = np.asarray(scores, np.float64).ravel(), np.asarray(labels, bool).ravel()
  pos, neg = scores[labels], scores[~labels]
  if not len(pos) or not len(neg):
    return float("nan")
  order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
  ranks = np.empty(len(order))
  ranks[order] = np.arange(1, len(order) + 1)
  all_scores = np.concatenate([pos, neg])
  for value in np.unique(all_scores):  # average ranks over ties
    tied = all_scores == value
    ranks[tied] = ranks[tied].mean()
  return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def within_problem_auc(scores_pn: np.ndarray, labels_pn: np.ndarray) -> dict:
  """How well scores rank the candidates of one problem, which is what Best-of-N needs (a pooled AUC also
  rewards ranking easy problems above hard ones): the mean and standard error over problems of each problem's
  AUC, over the problems with both right and wrong candidates (`problems`), and the pooled pair accuracy, the
  share of all within-problem (right, wrong) pairs the scores order rightly (ties half)."""
  aucs, won, pairs = [], 0.0, 0
  for scores, labels in zip(np.asarray(scores_pn, np.float64), np.asarray(labels_pn, bool), strict=True):
    pos, neg = scores[labels], scores[~labels]
    if len(pos) and len(neg):
      aucs.append(roc_auc(scores, labels))
      diff = pos[:, None] - neg[None, :]
      won += float((diff > 0).sum() + 0.5 * (diff == 0).sum())
      pairs += diff.size
  mean, se = _mean_se(np.asarray(aucs, np.float64)) if aucs else (float("nan"), float("nan"))
  return {"auc": mean, "auc_se": se, "problems": len(aucs), "pair_accuracy": won / pairs if pairs else float("nan"),
          "pairs": pairs}
