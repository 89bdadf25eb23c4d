"""LRP4RAG's hallucination classifiers (arXiv 2408.15533, Sec. 3-4): SVM (RBF kernel) and random forest from
scikit-learn, a small MLP and an LSTM in Flax NNX trained with optax, and a one-feature threshold; all scored by
stratified k-fold cross-validation on shared folds. Hallucinated is the positive class (label 1).

Every classifier weighs the classes inversely to their frequency in its training fold (scikit-learn's
"balanced"), so that a detector cannot score by predicting the majority class, and standardises its features
with the training fold's statistics. The NNX classifiers train full-batch with Adam on rows padded (weight 0)
to a fixed count, so the folds of a data set share one compilation.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from lwjax.config import option, schema_of

NAMES = ("svm", "rf", "mlp", "lstm", "threshold")
METRICS = ("accuracy", "precision", "recall", "f1")


@dataclasses.dataclass(frozen=True)
class DetectConfig:
  """Features and classifiers of the detectors."""
  folds: int = option(5, min=2, doc="stratified cross-validation folds")
  feature_length: int = option(220, min=2, doc="relevance vectors resampled to this length (paper: 220)")
  svm_c: float = option(1.0, min=1e-6)
  rf_trees: int = option(200, min=1)
  hidden: int = option(32, min=1, doc="MLP and LSTM width")
  steps: int = option(300, min=1, doc="full-batch Adam steps of the MLP and LSTM")
  learning_rate: float = option(1e-2, min=1e-6, max=1.0)


SCHEMA = schema_of(DetectConfig)


def class_weights(labels) -> np.ndarray:
  """Per-row weights n / (2 n_class): both classes weigh the same in the loss."""
  labels = np.asarray(labels, np.int64)
  counts = np.bincount(labels, minlength=2).astype(np.float64)
  return (len(labels) / (2.0 * np.maximum(counts, 1.0)))[labels].astype(np.float32)


class MLP(nnx.Module):
  """Two hidden ReLU layers -> one logit."""

  def __init__(self, features: int, hidden: int, *, rngs: nnx.Rngs):
    self.layers = nnx.List([nnx.Linear(features, hidden, rngs=rngs), nnx.Linear(hidden, hidden, rngs=rngs)])
    self.out = nnx.Linear(hidden, 1, rngs=rngs)

  def __call__(self, x_bf):
    for layer in self.layers:
      x_bf = jax.nn.relu(layer(x_bf))
    return self.out(x_bf)[:, 0]


class LSTM(nnx.Module):
  """An LSTM reading the feature vector as a sequence of scalars; its last hidden state -> one logit."""

  def __init__(self, hidden: int, *, rngs: nnx.Rngs):
    self.hidden = hidden
    self.cell = nnx.LSTMCell(1, hidden, rngs=rngs)
    self.out = nnx.Linear(hidden, 1, rngs=rngs)

  def __call__(self, x_bl):
    zeros = jnp.zeros((x_bl.shape[0], self.hidden), x_bl.dtype)
    xs_lb1 = jnp.swapaxes(x_bl, 0, 1)[..., None]
    (_, h_bh), _ = jax.lax.scan(lambda carry, x_b1: (self.cell(carry, x_b1)[0], None), (zeros, zeros), xs_lb1)
    return self.out(h_bh)[:, 0]


@functools.lru_cache(maxsize=32)
def _fit_fn(graphdef, steps: int, learning_rate: float):
  """jitted (params, x, y, w) -> params after `steps` full-batch Adam steps on the weighted logistic loss."""
  tx = optax.adam(learning_rate)

  def loss(params, x, y, w):
    logits = nnx.merge(graphdef, params)(x)
    return jnp.sum(w * optax.sigmoid_binary_cross_entropy(logits, y)) / jnp.maximum(jnp.sum(w), 1e-9)

  @jax.jit
  def fit(params, x, y, w):
    def step(carry, _):
      params, opt_state = carry
      updates, opt_state = tx.update(jax.grad(loss)(params, x, y, w), opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), None
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return params
  return fit


@functools.lru_cache(maxsize=32)
def _logits_fn(graphdef):
  return jax.jit(lambda params, x: nnx.merge(graphdef, params)(x))


class NeuralClassifier:
  """The MLP or LSTM behind scikit-learn's fit/predict; inputs [n, features] (the LSTM reads them in order)."""

  def __init__(self, kind: str, cfg: DetectConfig, *, seed: int = 0, pad_to: int = 0):
    if kind not in ("mlp", "lstm"):
      raise ValueError(f"kind must be 'mlp' or 'lstm', got {kind!r}")
    self.kind, self.cfg, self.seed, self.pad_to = kind, cfg, seed, pad_to

  def _pad(self, *arrays):
    n = arrays[0].shape[0]
    rows = max(n, self.pad_to)
    return [np.concatenate([a, np.zeros((rows - n, *a.shape[1:]), a.dtype)]) for a in arrays]

  def fit(self, x, y) -> NeuralClassifier:
    x = np.asarray(x, np.float32).reshape(len(x), -1)
    self.mean, self.std = x.mean(0), x.std(0) + 1e-6
    rngs = nnx.Rngs(self.seed)
    model = (MLP(x.shape[1], self.cfg.hidden, rngs=rngs) if self.kind == "mlp"
             else LSTM(self.cfg.hidden, rngs=rngs))
    self.graphdef, params = nnx.split(model)
    y = np.asarray(y, np.float32)
    xs, ys, ws = self._pad((x - self.mean) / self.std, y, class_weights(y))
    self.params = _fit_fn(self.graphdef, self.cfg.steps, self.cfg.learning_rate)(params, xs, ys, ws)
    return self

  def decision_function(self, x) -> np.ndarray:
    x = np.asarray(x, np.float32).reshape(len(x), -1)
    (xs,) = self._pad((x - self.mean) / self.std)
    return np.asarray(_logits_fn(self.graphdef)(self.params, xs))[:len(x)]

  def predict(self, x) -> np.ndarray:
    return (self.decision_function(x) > 0).astype(np.int64)


class ThresholdClassifier:
  """One feature against a threshold: the cut (and side) with the best balanced accuracy on the training fold."""

  def fit(self, x, y) -> ThresholdClassifier:
    x, y = np.asarray(x, np.float64).reshape(len(x)), np.asarray(y, np.int64)
    values = np.unique(x)
    cuts = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2, [values[-1] + 1.0]])
    w = class_weights(y)
    best = (-1.0, 0.0, 1)
    for cut in cuts:
      for sign in (1, -1):  # sign 1: hallucinated below the cut
        pred = (sign * (x - cut) < 0).astype(np.int64)
        score = float(np.sum(w * (pred == y)))
        if score > best[0]:
          best = (score, float(cut), sign)
    _, self.cut, self.sign = best
    return self

  def predict(self, x) -> np.ndarray:
    x = np.asarray(x, np.float64).reshape(len(x))
    return (self.sign * (x - self.cut) < 0).astype(np.int64)


def make(name: str, cfg: DetectConfig, *, seed: int = 0, pad_to: int = 0):
  """A fresh classifier `name` (one of NAMES) with fit(x [n, ...], y) / predict(x)."""
  if name == "svm":
    return _Flat(make_pipeline(StandardScaler(), SVC(kernel="rbf", C=cfg.svm_c, class_weight="balanced")))
  if name == "rf":
    return _Flat(RandomForestClassifier(n_estimators=cfg.rf_trees, class_weight="balanced", random_state=seed,
                                        n_jobs=1))
  if name in ("mlp", "lstm"):
    return NeuralClassifier(name, cfg, seed=seed, pad_to=pad_to)
  if name == "threshold":
    return ThresholdClassifier()
  raise ValueError(f"unknown classifier {name!r} (valid: {', '.join(NAMES)})")


class _Flat:
  """A scikit-learn estimator fed [n, features] whatever the feature array's rank."""

  def __init__(self, estimator):
    self.estimator = estimator

  def fit(self, x, y):
    self.estimator.fit(np.asarray(x).reshape(len(x), -1), y)
    return self

  def predict(self, x):
    return self.estimator.predict(np.asarray(x).reshape(len(x), -1))


def stratified_folds(labels, num_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """(train rows, test rows) of each fold, class proportions kept in every fold; shared by all detectors."""
  splitter = StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=seed)
  labels = np.asarray(labels)
  return list(splitter.split(np.zeros((len(labels), 1)), labels))


def scores(labels, predicted) -> dict:
  """Accuracy, precision, recall and F1 with hallucinated (1) as the positive class."""
  return {"accuracy": float(accuracy_score(labels, predicted)),
          "precision": float(precision_score(labels, predicted, zero_division=0)),
          "recall": float(recall_score(labels, predicted, zero_division=0)),
          "f1": float(f1_score(labels, predicted, zero_division=0))}


def cross_validate(make_classifier, x, labels, folds) -> tuple[dict, np.ndarray]:
  """Fits a fresh `make_classifier()` per fold: ({metric: {"mean", "std", "folds"}}, out-of-fold predictions)."""
  x, labels = np.asarray(x), np.asarray(labels, np.int64)
  predicted = np.zeros(len(labels), np.int64)
  per_fold = []
  for train, test in folds:
    predicted[test] = make_classifier().fit(x[train], labels[train]).predict(x[test])
    per_fold.append(scores(labels[test], predicted[test]))
  summary = {m: {"mean": float(np.mean([f[m] for f in per_fold])), "std": float(np.std([f[m] for f in per_fold])),
                 "folds": [f[m] for f in per_fold]} for m in METRICS}
  return summary, predicted
