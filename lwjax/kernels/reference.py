"""Plain-JAX reference implementations of the kernels (einsum-softmax attention, Mamba scans and SSD).

These are the ground truth the Pallas kernels are tested against, and the CPU path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def soft_cap(logits, softcap):
  """Gemma-2's logit soft-capping, `softcap * tanh(logits / softcap)`; the logits unchanged when it is None."""
  return logits if softcap is None else softcap * jnp.tanh(logits / softcap)


def attention(q, k, v, *, causal=True, segment_ids=None, q_offset=0, sm_scale=None, window=None, softcap=None,
              kv_layout="bshd"):
  """Softmax attention with GQA, causal masking from a query offset, segment ids, a sliding window (Mistral) and
  logit soft-capping (Gemma-2), as Hugging Face transformers computes them.

  Args:
    q: [batch, q_len, heads, dim]; k, v: [batch, kv_len, kv_heads, dim] with heads % kv_heads == 0.
    causal: query at absolute position `q_offset + i` attends to keys at positions <= it.
    segment_ids: [batch, len] (q_len == kv_len, packed sequences) or a pair (q_segment_ids,
      kv_segment_ids); tokens attend only within their segment.
    q_offset: absolute position of the first query; int or int array [batch] (chunked prefill, decode).
    sm_scale: softmax scale, default dim ** -0.5.
    window: if set, a query attends only to the last `window` keys up to itself (sliding window): the query
      at position i sees key j iff i - j < window (and j <= i when causal).
    softcap: if set, the scaled scores s become `softcap * tanh(s / softcap)` before masking.
    kv_layout: "bshd" (k, v as above) or "bhsd" ([batch, kv_heads, kv_len, dim]: a KV cache's layout).
  Returns:
    [batch, q_len, heads, dim] in q's dtype; softmax computed in float32.
  """
  batch, q_len, heads, dim = q.shape
  if kv_layout not in ("bshd", "bhsd"):
    raise ValueError(f"kv_layout must be 'bshd' or 'bhsd', got {kv_layout!r}")
  kv = "bskd" if kv_layout == "bshd" else "bksd"
  kv_len, kv_heads = (k.shape[1], k.shape[2]) if kv_layout == "bshd" else (k.shape[2], k.shape[1])
  if heads % kv_heads:
    raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
  groups = heads // kv_heads
  scale = dim ** -0.5 if sm_scale is None else sm_scale
  q_bqkgd = q.reshape(batch, q_len, kv_heads, groups, dim)
  logits = soft_cap(jnp.einsum(f"bqkgd,{kv}->bkgqs", q_bqkgd, k, preferred_element_type=jnp.float32) * scale,
                    softcap)

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
  out = jnp.einsum(f"bkgqs,{kv}->bqkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.reshape(batch, q_len, heads, dim).astype(q.dtype)


def blocked_causal_attention(q, k, v, *, segment_ids=None, sm_scale=None, window=None, softcap=None, block=None):
  """Causal self-attention (q_len == kv_len, from position 0) over query blocks: `attention`'s CPU fast path.

  Query block i attends only to keys [0, (i + 1) * block), so the masked triangle above the block diagonal
  is never computed (with the default of 4 blocks, 5/8 of the full [q, s] logits), and the mask is added as
  a bias; with a `window`, nor are the keys before the window of the block's first query. Same arguments and
  result as `attention(q, k, v, causal=True, segment_ids=segment_ids, sm_scale=sm_scale, window=window,
  softcap=softcap)` with a single segment-id array; every query sees itself, so no row is empty.
  `block` (default: a quarter of the length, at least 32) is the query block size.
  """
  batch, length, heads, dim = q.shape
  block = block or max(32, -(-length // 4))
  kv_heads = k.shape[2]
  if heads % kv_heads:
    raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
  groups = heads // kv_heads
  scale = dim ** -0.5 if sm_scale is None else sm_scale
  q_bkgqd = q.reshape(batch, length, kv_heads, groups, dim).transpose(0, 2, 3, 1, 4)
  k_bksd, v_bksd = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  positions = jnp.arange(length)
  outs = []
  for start in range(0, length, block):
    end = min(start + block, length)
    first = 0 if window is None else max(0, start - window + 1)  # the first key the block's first query sees
    logits = soft_cap(jnp.einsum("bkgqd,bksd->bkgqs", q_bkgqd[:, :, :, start:end], k_bksd[:, :, first:end],
                                 preferred_element_type=jnp.float32) * scale, softcap)
    mask = positions[start:end, None] >= positions[None, first:end]  # [q, s]
    if window is not None:
      mask = mask & (positions[start:end, None] - positions[None, first:end] < window)
    if segment_ids is not None:
      mask = mask & (segment_ids[:, start:end, None] == segment_ids[:, None, first:end])  # [b, q, s]
    mask = jnp.broadcast_to(mask, (batch, end - start, end - first))
    probs = jax.nn.softmax(logits + jnp.where(mask, 0.0, _MASK_VALUE)[:, None, None], axis=-1)
    outs.append(jnp.einsum("bkgqs,bksd->bkgqd", probs.astype(v.dtype), v_bksd[:, :, first:end],
                           preferred_element_type=jnp.float32))
  out_bkgqd = jnp.concatenate(outs, axis=3)
  return out_bkgqd.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, dim).astype(q.dtype)


def decode_attention(q, k_pages, v_pages, page_table, lengths, *, sm_scale=None, window=None, softcap=None):
  """Attention of the newest `q_tokens` queries of each sequence over its paged KV cache.

  Args:
    q: [batch, q_tokens, heads, dim]; query i of sequence b sits at position lengths[b] - q_tokens + i
      (q_tokens > 1: speculative verification) and attends causally to the keys up to it.
    k_pages, v_pages: [kv_heads, num_pages, page_size, dim], heads % kv_heads == 0.
    page_table: [batch, max_pages] int32; key position p of sequence b lives in page
      page_table[b, p // page_size] at slot p % page_size. Entries past the length are ignored.
    lengths: [batch] int32, valid keys per sequence including the new tokens.
    sm_scale: softmax scale, default dim ** -0.5.
    window, softcap: a sliding window and logit soft-capping, as in `attention`.
  Returns:
    [batch, q_tokens, heads, dim] in q's dtype.
  """
  kv_heads, _, page_size, dim = k_pages.shape
  batch, max_pages = page_table.shape
  q_len, heads = q.shape[1], q.shape[2]
  if heads % kv_heads:
    raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
  groups, kv_len = heads // kv_heads, max_pages * page_size
  scale = dim ** -0.5 if sm_scale is None else sm_scale
  # Gathered pages stay in the pools' head-major order, [kv_heads, batch, keys, dim], and the scores are
  # computed with (kv_heads, batch) as the batch dims: no transposing copy of the gathered keys/values
  # (on XLA:CPU the gather otherwise fuses into a strided transpose that costs several times the gather).
  k = k_pages[:, page_table].reshape(kv_heads, batch, kv_len, dim)
  v = v_pages[:, page_table].reshape(kv_heads, batch, kv_len, dim)
  q_kbgqd = q.reshape(batch, q_len, kv_heads, groups, dim).transpose(2, 0, 3, 1, 4)
  logits = soft_cap(jnp.einsum("kbgqd,kbsd->kbgqs", q_kbgqd, k, preferred_element_type=jnp.float32) * scale,
                    softcap)
  lengths = jnp.asarray(lengths, jnp.int32)
  q_pos = lengths[:, None] - q_len + jnp.arange(q_len)[None, :]  # [b, q]
  kv_pos = jnp.arange(kv_len)
  mask = q_pos[:, :, None] >= kv_pos  # [b, q, s]: causal, and so within the length
  if window is not None:
    mask &= q_pos[:, :, None] - kv_pos < window
  logits = jnp.where(mask[None, :, None], logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(mask[None, :, None].any(-1, keepdims=True), probs, 0.0)  # no visible key: zeros
  out = jnp.einsum("kbgqs,kbsd->kbgqd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.transpose(1, 3, 0, 2, 4).reshape(batch, q_len, heads, dim).astype(q.dtype)


# ---- Mamba selective state spaces (Mamba-1 selective scan, Mamba-2 SSD, decoding state update) ----


def _discretize_dt(dt, bias, softplus):
  """Step sizes in float32: softplus(dt + bias) as in Mamba, or dt + bias when softplus is off."""
  dt = dt.astype(jnp.float32)
  if bias is not None:
    dt = dt + bias.astype(jnp.float32)
  return jax.nn.softplus(dt) if softplus else dt


def _with_groups(bc):
  """B or C as [batch, len, groups, state]: an ungrouped [batch, len, state] is one group."""
  return (bc[:, :, None] if bc.ndim == 3 else bc).astype(jnp.float32)


def _gate(y, u, D, z):
  """y + D * u, then times silu(z) when z is given (float32)."""
  if D is not None:
    y = y + u.astype(jnp.float32) * D.astype(jnp.float32)
  if z is not None:
    y = y * jax.nn.silu(z.astype(jnp.float32))
  return y


def _varying_like(x, *others):
  """x marked as varying over every `shard_map` axis that one of `others` varies over: a scan carry keeps
  one type, so a zero initial state must vary like the sharded inputs it meets."""
  axes = frozenset().union(*(jax.typeof(o).manual_axis_type.varying for o in others))
  axes -= jax.typeof(x).manual_axis_type.varying
  return jax.lax.pcast(x, tuple(sorted(axes)), to="varying") if axes else x


def _mamba1_scan(h0_bdn, dt_bld, x_bld, A_dn, B_blgn, C_blgn, method):
  """h_t = exp(dt_t A) h_{t-1} + x_t B_t, y_t = C_t . h_t over the length axis.

  Returns (y [b, l, d], states [b, l, d, n]) for method "states", else (y, final state [b, d, n]).
  """
  b, _, d = x_bld.shape
  g = B_blgn.shape[2]
  h0_bdn = _varying_like(h0_bdn, dt_bld, x_bld, A_dn, B_blgn, C_blgn)
  A_gcn = A_dn.astype(jnp.float32).reshape(g, d // g, -1)
  if method == "associative":
    dA = jnp.exp(dt_bld.reshape(b, -1, g, d // g)[..., None] * A_gcn)  # [b, l, g, d/g, n]
    dBx = x_bld.reshape(dA.shape[:-1])[..., None] * B_blgn[:, :, :, None]
    dBx = dBx.at[:, 0].add(dA[:, 0] * h0_bdn.reshape(dA.shape[:1] + dA.shape[2:]))

    def combine(left, right):
      return left[0] * right[0], right[0] * left[1] + right[1]
    _, h = jax.lax.associative_scan(combine, (dA, dBx), axis=1)
    y = jnp.einsum("blgcn,blgn->blgc", h, C_blgn).reshape(x_bld.shape)
    return y, h[:, -1].reshape(h0_bdn.shape)

  def step(h_bgcn, inputs):
    dt_bgc, x_bgc, B_bgn, C_bgn = inputs
    h_bgcn = jnp.exp(dt_bgc[..., None] * A_gcn) * h_bgcn + x_bgc[..., None] * B_bgn[:, :, None]
    y_bgc = jnp.einsum("bgcn,bgn->bgc", h_bgcn, C_bgn)
    return h_bgcn, (y_bgc, h_bgcn if method == "states" else None)

  per_step = (dt_bld.reshape(b, -1, g, d // g), x_bld.reshape(b, -1, g, d // g), B_blgn, C_blgn)
  h_last, (y, hs) = jax.lax.scan(step, h0_bdn.reshape(b, g, d // g, -1),
                                 jax.tree.map(lambda a: jnp.moveaxis(a, 1, 0), per_step))
  y = jnp.moveaxis(y, 0, 1).reshape(x_bld.shape)
  if method == "states":
    return y, jnp.moveaxis(hs, 0, 1).reshape(b, -1, d, A_dn.shape[1])
  return y, h_last.reshape(h0_bdn.shape)


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                   initial_state=None, return_state=False, method="scan"):
  """Mamba-1 selective scan (Gu & Dao 2023, Alg. 2; the S6 layer of Mamba in the Llama, arXiv 2408.15237).

  h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t,  y_t = C_t . h_t + D u_t, times silu(z_t) when z is given,
  with dt = softplus(delta + delta_bias) (zero-order hold for A, Euler for B, as in Mamba).

  Args:
    u, delta: [batch, len, dim]. A: [dim, state] (negative for a decaying state).
    B, C: [batch, len, state], or [batch, len, groups, state] with dim % groups == 0 (channel c reads
      group c // (dim // groups)).
    D: [dim] skip; z: [batch, len, dim] gate; delta_bias: [dim].
    initial_state: [batch, dim, state]; zeros when None.
    return_state: also return the state after the last step, float32 [batch, dim, state].
    method: "scan" (lax.scan, O(b d n) memory) or "associative" (lax.associative_scan over
      materialised [b, l, d, n] transitions: log-depth, for checking the sequential forms).
  Returns:
    y [batch, len, dim] in u's dtype (float32 math), and the final state when return_state.
  """
  b, _, d = u.shape
  if method not in ("scan", "associative"):
    raise ValueError(f"selective_scan method must be 'scan' or 'associative', got {method!r}")
  dt = _discretize_dt(delta, delta_bias, delta_softplus)
  h0 = (jnp.zeros((b, d, A.shape[1]), jnp.float32) if initial_state is None
        else initial_state.astype(jnp.float32))
  y, h_last = _mamba1_scan(h0, dt, dt * u.astype(jnp.float32), A, _with_groups(B), _with_groups(C), method)
  y = _gate(y, u, D, z).astype(u.dtype)
  return (y, h_last) if return_state else y


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True,
                           accepted=None, return_all_states=False):
  """Advances a Mamba state by k tokens (decoding; speculative verification as in arXiv 2408.15237 Sec. 4).

  Mamba-2 heads use it too: state [b, heads*headdim, n], A repeated per head to [heads*headdim, n].

  Args:
    state: [batch, dim, state] before the k tokens. x, dt: [batch, k, dim]; A: [dim, state];
      B, C: [batch, k, state] or [batch, k, groups, state]; D, dt_bias: [dim]; z: [batch, k, dim].
    accepted: int [batch] in [0, k]: how many of the k steps to keep in the returned state (the
      verified draft tokens); all k when None.
    return_all_states: return the state after every step, [batch, k, dim, state], instead.
  Returns:
    (y [batch, k, dim] in x's dtype, the new state in state's dtype).
  """
  dt = _discretize_dt(dt, dt_bias, dt_softplus)
  y, states = _mamba1_scan(state.astype(jnp.float32), dt, dt * x.astype(jnp.float32), A, _with_groups(B),
                           _with_groups(C), "states")
  y = _gate(y, x, D, z).astype(x.dtype)
  if return_all_states:
    return y, states.astype(state.dtype)
  if accepted is None:
    return y, states[:, -1].astype(state.dtype)
  with_start = jnp.concatenate([state[:, None].astype(jnp.float32), states], axis=1)  # [b, k + 1, d, n]
  kept = jnp.take_along_axis(with_start, jnp.asarray(accepted).reshape(-1, 1, 1, 1), axis=1)[:, 0]
  return y, kept.astype(state.dtype)


def ssd(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True, initial_state=None,
        return_state=False, chunk_size=None):
  """Mamba-2 state space duality (Dao & Gu 2024, Sec. 6): scalar decay per head.

  h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,  y_t = h_t C_t + D x_t (times silu(z_t) when given).

  Args:
    x: [batch, len, heads, headdim]; dt: [batch, len, heads]; A: [heads] (negative);
      B, C: [batch, len, groups, state] with heads % groups == 0 (head h reads group h // (heads // groups));
      D, dt_bias: [heads]; z: [batch, len, heads, headdim]; initial_state: [batch, heads, headdim, state].
    chunk_size: None for the quadratic (attention-like) form over the whole length; an int for the
      chunked form: quadratic within chunks, a linear recurrence over the chunk states.
  Returns:
    y [batch, len, heads, headdim] in x's dtype, and the float32 final state when return_state.
  """
  b, seq_len, h, p = x.shape
  g, n = B.shape[2], B.shape[3]
  dt = _discretize_dt(dt, dt_bias, dt_softplus)  # [b, l, h]
  h0 = (jnp.zeros((b, h, p, n), jnp.float32) if initial_state is None
        else initial_state.astype(jnp.float32))
  q = seq_len if chunk_size is None else chunk_size
  pad = -seq_len % q
  c = (seq_len + pad) // q

  def chunked(a):  # [b, l, ...] -> [b, c, q, ...]; zero-padded steps add no input and do not decay
    a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
    return a.reshape(b, c, q, *a.shape[2:])

  xdt = chunked(x.astype(jnp.float32) * dt[..., None])  # [b, c, q, h, p]
  B_h = chunked(jnp.repeat(B.astype(jnp.float32), h // g, axis=2))  # [b, c, q, h, n]
  C_h = chunked(jnp.repeat(C.astype(jnp.float32), h // g, axis=2))
  cum = jnp.cumsum(chunked(dt * A.astype(jnp.float32)), axis=2)  # [b, c, q, h]: log decay from chunk start
  causal = jnp.tril(jnp.ones((q, q), bool))
  seg = cum[:, :, :, None] - cum[:, :, None, :]  # [b, c, t, s, h]
  decay = jnp.exp(jnp.where(causal[:, :, None], seg, -jnp.inf))
  scores = jnp.einsum("bctkn,bcskn->bctsk", C_h, B_h) * decay
  y = jnp.einsum("bctsk,bcskp->bctkp", scores, xdt)

  to_end = jnp.exp(cum[:, :, -1:] - cum)  # [b, c, q, h]: decay from each step to its chunk's end
  chunk_states = jnp.einsum("bcskn,bcskp->bckpn", B_h * to_end[..., None], xdt)

  def carry(s_bkpn, inputs):
    decay_bk, new_bkpn = inputs
    return decay_bk[..., None, None] * s_bkpn + new_bkpn, s_bkpn
  h0 = _varying_like(h0, cum, chunk_states)
  h_last, starts = jax.lax.scan(carry, h0, (jnp.moveaxis(jnp.exp(cum[:, :, -1]), 1, 0),
                                            jnp.moveaxis(chunk_states, 1, 0)))
  starts = jnp.moveaxis(starts, 0, 1)  # [b, c, h, p, n]: the state entering each chunk
  y = y + jnp.einsum("bctkn,bckpn->bctkp", C_h, starts) * jnp.exp(cum)[..., None]
  y = y.reshape(b, c * q, h, p)[:, :seq_len]
  y = _gate(y, x, None if D is None else D[:, None], z).astype(x.dtype)
  return (y, h_last) if return_state else y
