"""LRP4RAG's detectors and their baselines (arXiv 2408.15533, Sec. 3-4) on one set of answers: features from the
generator's signals, every classifier cross-validated on the same stratified folds.

  lrp               AttnLRP relevance matrix -> mean over answer tokens -> per-prompt-token vector -> resampled
  attention         attention of the answer positions to the prompt (mean over layers and heads), resampled
  gradient_x_input  gradient x input of each answer logit, mean over answer tokens, resampled
  uncertainty       the answer's log-probability and mean entropy (2 numbers: no sequence for the LSTM)
  self_consistency  agreement of the greedy answer with K samples at temperature 1, thresholded
"""

from __future__ import annotations

import logging

import numpy as np
from tqdm import tqdm

from lwjax.projects.lrp4rag import classifiers, signals
from lwjax.relevance.features import resample

CLASSIFIERS = {"lrp": ("svm", "rf", "mlp", "lstm"), "attention": ("svm", "rf", "mlp", "lstm"),
               "gradient_x_input": ("svm", "rf", "mlp", "lstm"), "uncertainty": ("svm", "rf", "mlp"),
               "self_consistency": ("threshold",)}


def features(signals: list[dict], agreement, length: int) -> dict[str, np.ndarray]:
  """{feature set: [n, ...]} from `signals.extract`'s rows and the self-consistency agreement [n] (None: no
  self-consistency set, as for responses the generator did not write)."""
  def vectors(name, reduce=lambda v: v):
    return np.stack([resample(reduce(s[name]), length) for s in signals])
  out = {"lrp": vectors("relevance", lambda m: m.mean(axis=0)), "attention": vectors("attention"),
         "gradient_x_input": vectors("gradient_x_input"),
         "uncertainty": np.asarray([[s["logprob"], s["entropy"]] for s in signals], np.float32)}
  if agreement is not None:
    out["self_consistency"] = np.asarray(agreement, np.float32)[:, None]
  return out


def evaluate(feature_sets: dict[str, np.ndarray], labels, groups, cfg: classifiers.DetectConfig, *,
             seed: int) -> dict:
  """Cross-validated scores of every (feature set in `feature_sets`, classifier) on shared folds: {"folds": k,
  "detectors": {"<features>/<classifier>": {metric: {"mean", "std", "folds"}, "accuracy_by_group": {group:
  accuracy}}}}, or {"skipped": why} when a class has fewer than 2 examples. `groups` [n] names each example's
  group (prompt kind, or task type)."""
  labels, groups = np.asarray(labels, np.int64), np.asarray(groups)
  smaller = int(min(labels.sum(), len(labels) - labels.sum()))
  if smaller < 2:
    why = f"only {smaller} example(s) of one class: no cross-validation"
    logging.warning("detectors skipped: %s", why)
    return {"skipped": why}
  num_folds = min(cfg.folds, smaller)
  if num_folds < cfg.folds:
    logging.warning("%d folds instead of %d: the smaller class has %d examples", num_folds, cfg.folds, smaller)
  folds = classifiers.stratified_folds(labels, num_folds, seed)
  jobs = [(f, c) for f, names in CLASSIFIERS.items() if f in feature_sets for c in names]
  results = {}
  for feature_name, name in tqdm(jobs, desc=f"detectors ({num_folds}-fold CV)", unit="detector"):
    def make(name=name):
      return classifiers.make(name, cfg, seed=seed, pad_to=len(labels))
    summary, predicted = classifiers.cross_validate(make, feature_sets[feature_name], labels, folds)
    summary["accuracy_by_group"] = {g: float(np.mean(predicted[groups == g] == labels[groups == g]))
                                    for g in sorted(set(groups.tolist()))}
    results[f"{feature_name}/{name}"] = summary
  return {"folds": num_folds, "detectors": results}


def table(detectors: dict) -> str:
  """One line per detector: mean +- std of each metric over the folds."""
  lines = [f"{'detector':<28}" + "".join(f"{m:>18}" for m in classifiers.METRICS)]
  for name, summary in detectors.items():
    lines.append(f"{name:<28}" + "".join(f"{summary[m]['mean']:>11.3f} ±{summary[m]['std']:.3f}"
                                         for m in classifiers.METRICS))
  return "\n".join(lines)


def explain_and_detect(model, prompt_ids, answer_ids, labels: np.ndarray, groups, agreement,
                       config) -> tuple[dict, list]:
  """The detection half of both LRP4RAG evaluations (the generated task's and RAGTruth's): relevance
  conservation, every answer's signals (`signals.extract`), the detectors' cross-validated scores against
  `labels` (folds stratified by `groups`; `agreement` the self-consistency feature, or None), and the majority
  baseline. Returns (metrics, the signal rows)."""
  e = config.eval
  metrics = {"conservation": signals.conservation(model, prompt_ids, answer_ids, batch=e.signal_batch)}
  rows = signals.extract(model, prompt_ids, answer_ids, batch=e.signal_batch, relevance_chunk=e.relevance_chunk or None)
  detect_cfg = classifiers.DetectConfig(**config.detect)
  result = evaluate(features(rows, agreement, detect_cfg.feature_length), labels, groups, detect_cfg, seed=config.seed)
  majority = max(labels.mean(), 1 - labels.mean())
  metrics.update(feature_length=detect_cfg.feature_length, majority_accuracy=float(majority), **result)
  if "detectors" in result:
    logging.info("detectors (%d-fold CV; always predicting the majority class: accuracy %.3f):\n%s", result["folds"],
                 majority, table(result["detectors"]))
  return metrics, rows
