"""Reference attention against a direct per-head NumPy computation; its block-causal CPU form against it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwjax import kernels
from lwjax.kernels import reference


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


def _random_qkv(length, heads=4, kv_heads=2, dim=8, batch=2, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (batch, length, heads, dim))
  k = jax.random.normal(ks[1], (batch, length, kv_heads, dim))
  v = jax.random.normal(ks[2], (batch, length, kv_heads, dim))
  return q, k, v, jax.random.normal(ks[3], q.shape)


@pytest.mark.parametrize("length,block", [(64, None), pytest.param(70, 16, marks=pytest.mark.slow),
                                          pytest.param(33, 32, marks=pytest.mark.slow), (8, None)])
@pytest.mark.parametrize("packed", [False, True])
def test_blocked_causal_attention_equals_the_reference_with_gradients(length, block, packed):
  q, k, v, out_grad = _random_qkv(length)
  # Packed rows: sorted segment ids, so segments are contiguous and cross the query blocks.
  segment_ids = (jnp.sort(jax.random.randint(jax.random.key(5), (2, length), 0, 3), axis=1) if packed else None)

  def loss(attend, q, k, v):
    return jnp.sum(attend(q, k, v) * out_grad)
  blocked = functools.partial(reference.blocked_causal_attention, segment_ids=segment_ids, block=block)
  full = functools.partial(reference.attention, causal=True, segment_ids=segment_ids)
  np.testing.assert_allclose(blocked(q, k, v), full(q, k, v), atol=1e-5)
  grads = jax.grad(functools.partial(loss, blocked), argnums=(0, 1, 2))(q, k, v)
  expected = jax.grad(functools.partial(loss, full), argnums=(0, 1, 2))(q, k, v)
  for got, want in zip(grads, expected, strict=False):
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_auto_on_cpu_blocks_only_causal_self_attention_from_position_zero(monkeypatch):
  calls = []
  blocked = reference.blocked_causal_attention
  monkeypatch.setattr(reference, "blocked_causal_attention", lambda *a, **kw: calls.append(1) or blocked(*a, **kw))
  q, k, v, _ = _random_qkv(16)
  seg = jnp.ones((2, 16), jnp.int32)
  kernels.attention(q, k, v, segment_ids=seg)
  assert len(calls) == 1
  kernels.attention(q, k, v, impl="reference")
  kernels.attention(q, k, v, q_offset=jnp.zeros((2,), jnp.int32))  # traced offsets: prefill into a cache
  kernels.attention(q, k, v, window=4)
  kernels.attention(q, k, v, causal=False)
  kernels.attention(q, k, v, segment_ids=(seg, seg))
  kernels.attention(q[:, :4], k, v)
  assert len(calls) == 1


@pytest.mark.parametrize("q_len", [1, 4])
def test_kv_cache_layout_gives_the_same_attention(q_len):
  """kv_layout="bhsd" (the KV cache's [b, kv_heads, s, d]) equals the [b, s, kv_heads, d] form, decode included."""
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(3, q_len, 4, 8)), jnp.float32)
  k, v = (jnp.asarray(rng.normal(size=(3, 11, 2, 8)), jnp.float32) for _ in range(2))
  offsets = jnp.array([0, 3, 7])
  want = reference.attention(q, k, v, q_offset=offsets)
  got = reference.attention(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), q_offset=offsets, kv_layout="bhsd")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="kv_layout"):
    reference.attention(q, k, v, kv_layout="bsdh")
