"""Plain-JAX reference implementations of the kernels (einsum-softmax attention).

These are the ground truth the Pallas kernels are tested against, and the CPU path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention(q, k, v, *, causal=True, segment_ids=None, q_offset=0, sm_scale=None, window=None):
  """Softmax attention with GQA, causal masking from a query offset, segment ids and a sliding window.

  Args:
    q: [batch, q_len, heads, dim]; k, v: [batch, kv_len, kv_heads, dim] with heads % kv_heads == 0.
    causal: query at absolute position `q_offset + i` attends to keys at positions <= it.
    segment_ids: [batch, len] (q_len == kv_len, packed sequences) or a pair (q_segment_ids,
      kv_segment_ids); tokens attend only within their segment.
    q_offset: absolute position of the first query; int or int array [batch] (chunked prefill, decode).
    sm_scale: softmax scale, default dim ** -0.5.
    window: if set, a query attends only to the last `window` keys up to itself (sliding window).
  Returns:
    [batch, q_len, heads, dim] in q's dtype; softmax computed in float32.
  """
  batch, q_len, heads, dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  if heads % kv_heads:
    raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
  groups = heads // kv_heads
  scale = dim ** -0.5 if sm_scale is None else sm_scale
  q_bqkgd = q.reshape(batch, q_len, kv_heads, groups, dim)
  logits = jnp.einsum("bqkgd,bskd->bkgqs", q_bqkgd, k, preferred_element_type=jnp.float32) * scale

  mask = jnp.ones((batch, q_len, kv_len), dtype=bool)
  q_pos = jnp.reshape(jnp.asarray(q_offset), (-1, 1)) + jnp.arange(q_len)[None, :]  # [b or 1, q]
  kv_pos = jnp.arange(kv_len)
  if causal:
    mask &= q_pos[:, :, None] >= kv_pos[None, None, :]
  if window is not None:
    mask &= q_pos[:, :, None] - kv_pos[None, None, :] < window
  if segment_ids is not None:
    q_seg, kv_seg = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
    mask &= q_seg[:, :, None] == kv_seg[:, None, :]
  logits = jnp.where(mask[:, None, None], logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1)
  # Rows with no visible key (padding) give zeros rather than a uniform average.
  probs = jnp.where(mask[:, None, None].any(-1, keepdims=True), probs, 0.0)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(batch, q_len, heads, dim).astype(q.dtype)
