"""Fixed-length features from per-token scores, as LRP4RAG (arXiv 2408.15533, Sec. 3) feeds its classifiers:
a prompt's relevance vector, whatever the prompt's length, resampled to one length (220 in the paper)."""

from __future__ import annotations

import numpy as np


def resample(vector, length: int) -> np.ndarray:
  """`vector` [..., n] resampled along its last axis to [..., length] by linear interpolation (float32).

  Output point i sits at input position i * (n - 1) / (length - 1): the first and last values are kept, a
  linear ramp stays a ramp, and n == length returns the input. A single value (n == 1) is repeated.
  """
  if length < 1:
    raise ValueError(f"length must be >= 1, got {length}")
  values = np.asarray(vector, np.float32)
  n = values.shape[-1]
  if n == 0:
    raise ValueError("cannot resample an empty vector")
  if n == 1:
    return np.repeat(values, length, axis=-1)
  at = np.linspace(0.0, n - 1, length) if length > 1 else np.zeros(1)
  lo = np.minimum(np.floor(at).astype(np.int64), n - 2)
  frac = (at - lo).astype(np.float32)
  return values[..., lo] * (1.0 - frac) + values[..., lo + 1] * frac
