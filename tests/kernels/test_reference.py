"""Reference attention against a direct per-head NumPy computation."""

import jax
import numpy as np
import pytest

from lwjax import kernels


def _numpy_attention(q, k, v, mask):
  groups = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  s = np.where(mask[:, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p = p / p.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 1), (8, 2)])
@pytest.mark.parametrize("window", [None, 3])
def test_attention_with_offsets_segments_and_windows(heads, kv_heads, window):
  rng = np.random.default_rng(0)
  b, q_len, kv_len, d = 2, 5, 9, 8
  q = rng.normal(size=(b, q_len, heads, d)).astype(np.float32)
  k = rng.normal(size=(b, kv_len, kv_heads, d)).astype(np.float32)
  v = rng.normal(size=(b, kv_len, kv_heads, d)).astype(np.float32)
  q_offset = np.array([4, 2])
  q_seg = np.array([[1, 1, 2, 2, 2], [1, 1, 1, 1, 1]])
  kv_seg = np.array([[1] * 6 + [2] * 3, [1] * 9])
  q_pos = q_offset[:, None] + np.arange(q_len)
  mask = (q_pos[:, :, None] >= np.arange(kv_len)) & (q_seg[:, :, None] == kv_seg[:, None, :])
  if window:
    mask &= q_pos[:, :, None] - np.arange(kv_len) < window
  # Every query sees at least one key here, so the NumPy softmax is well defined.
  assert mask.any(-1).all()
  out = kernels.attention(q, k, v, segment_ids=(q_seg, kv_seg), q_offset=q_offset, window=window,
                          impl="reference")
  np.testing.assert_allclose(out, _numpy_attention(q, k, v, mask), atol=1e-5)


def test_fully_masked_rows_give_zeros_and_unknown_impl_is_rejected():
  q = k = v = np.ones((1, 2, 1, 4), np.float32)
  out = kernels.attention(q, k, v, segment_ids=(np.array([[3, 3]]), np.array([[1, 1]])))
  np.testing.assert_array_equal(out, 0.0)
  with pytest.raises(ValueError, match="impl"):
    kernels.attention(q, k, v, impl="triton")
  assert jax.numpy.isfinite(out).all()
