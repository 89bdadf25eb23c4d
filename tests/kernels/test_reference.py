"""Reference attention against a direct per-head NumPy computation; its block-causal CPU form against it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwjax import kernels
from lwjax.kernels import reference


def _numpy_attention(q, k, v, mask, softcap=None):
  groups = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if softcap is not None:  # Gemma-2: scores / cap, tanh, * cap, before the mask
    s = np.tanh(s / softcap) * softcap
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


@pytest.mark.parametrize("kv_heads", [2, pytest.param(8, marks=pytest.mark.slow)])
def test_softcap_and_sliding_window_follow_transformers(kv_heads):
  """Gemma-2/Mistral as transformers computes them: kv_idx > q_idx - sliding_window, causal, capped scores."""
  rng = np.random.default_rng(2)
  b, q_len, kv_len, heads, d, window, softcap = 2, 6, 14, 8, 16, 5, 0.7
  q = rng.normal(size=(b, q_len, heads, d)).astype(np.float32) * 2  # scores past the cap: tanh saturates
  k, v = (rng.normal(size=(b, kv_len, kv_heads, d)).astype(np.float32) for _ in range(2))
  q_offset = np.array([8, 3])
  q_idx, kv_idx = (q_offset[:, None] + np.arange(q_len))[:, :, None], np.arange(kv_len)
  mask = (kv_idx <= q_idx) & (kv_idx > q_idx - window)
  attend = functools.partial(kernels.attention, q_offset=q_offset, window=window, impl="reference")
  out, uncapped = jax.jit(lambda *qkv: (attend(*qkv, softcap=softcap), attend(*qkv)))(q, k, v)
  np.testing.assert_allclose(out, _numpy_attention(q, k, v, mask, softcap), atol=1e-5)
  assert np.abs(out - uncapped).max() > 0.1  # the cap changes the result


@pytest.mark.parametrize("bad", [dict(window=0), dict(window=2.5), dict(window=True), dict(softcap=0.0),
                                 dict(softcap=-1.0), dict(softcap="50")])
def test_window_and_softcap_are_validated(bad):
  q = k = v = np.ones((1, 2, 1, 4), np.float32)
  name = next(iter(bad))
  with pytest.raises(ValueError, match=f"attention {name} must be a positive"):
    kernels.attention(q, k, v, **bad)
  with pytest.raises(ValueError, match=f"decode_attention {name} must be a positive"):
    kernels.decode_attention(q, k[None, :, 0], v[None, :, 0], np.zeros((1, 1), np.int32), np.ones(1, np.int32),
                             **bad)


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


@pytest.mark.parametrize("length,block,window,softcap,grads", [
    (64, 16, 20, 1.5, False),  # the window spans query blocks: the later ones skip the keys before it
    pytest.param(64, 16, 20, 1.5, True, marks=pytest.mark.slow),
    pytest.param(33, 32, 1, None, True, marks=pytest.mark.slow),  # each query sees itself only
    pytest.param(40, None, 64, 0.5, True, marks=pytest.mark.slow),  # a window longer than the sequence
])
def test_blocked_causal_attention_with_window_and_softcap_equals_the_reference(length, block, window, softcap,
                                                                               grads):
  q, k, v, out_grad = _random_qkv(length)  # (length 64: the shapes of the test above, no new random programs)
  segment_ids = jnp.sort(jax.random.randint(jax.random.key(5), (2, length), 0, 3), axis=1)
  options = dict(segment_ids=segment_ids, window=window, softcap=softcap)

  def loss(attend):
    return lambda q, k, v: jnp.sum(attend(q, k, v, **options) * out_grad)
  run = jax.value_and_grad if grads else lambda f, argnums: f
  blocked = functools.partial(reference.blocked_causal_attention, block=block)
  got, want = jax.jit(lambda *qkv: tuple(run(loss(attend), argnums=(0, 1, 2))(*qkv)
                                         for attend in (blocked, reference.attention)))(q, k, v)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(x, y, atol=2e-5, rtol=1e-5)


def test_auto_on_cpu_blocks_only_causal_self_attention_from_position_zero(monkeypatch):
  calls = []
  blocked = reference.blocked_causal_attention
  monkeypatch.setattr(reference, "blocked_causal_attention", lambda *a, **kw: calls.append(1) or blocked(*a, **kw))
  q, k, v, _ = _random_qkv(16)
  seg = jnp.ones((2, 16), jnp.int32)
  kernels.attention(q, k, v, segment_ids=seg)
  assert len(calls) == 1
  windowed = kernels.attention(q, k, v, window=4, softcap=2.0)  # Mistral/Gemma-2 layers take it too
  assert len(calls) == 2
  np.testing.assert_allclose(windowed, reference.attention(q, k, v, window=4, softcap=2.0), atol=1e-5)
  kernels.attention(q, k, v, impl="reference")
  kernels.attention(q, k, v, q_offset=jnp.zeros((2,), jnp.int32))  # traced offsets: prefill into a cache
  kernels.attention(q, k, v, causal=False)
  kernels.attention(q, k, v, segment_ids=(seg, seg))
  kernels.attention(q[:, :4], k, v)
  assert len(calls) == 2


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
