"""Paged decode attention in Pallas: online softmax over each sequence's KV pages, split-K over pages.

One program owns one (sequence, kv head, split). The `groups = heads // kv_heads` query heads sharing the
kv head, times the `q_tokens` new tokens, are the rows of one [rows, dim] query tile, so each KV page is
read from HBM once per kv head: decode is bound by that read. Pages are found through the page table:

- TPU (Mosaic): lengths and the page table are scalar-prefetched into SMEM and the index maps of the K/V
  BlockSpecs read them; `pages_per_block` pages (one operand each) are DMA'd per grid step while the
  previous step computes. Steps past a sequence's length map to the block already in VMEM, which the
  pipeline does not fetch again, and skip their compute.
- GPU (Triton): each program loops over blocks of `block_kv` keys up to the length, gathering the rows of
  K and V through the page table.

With several splits each covers a contiguous range of keys and returns its output normalised with its
log-sum-exp; XLA combines them. With a sliding window, key blocks before the window of a sequence's earliest
new token are skipped like those past its length (TPU: neither fetched nor computed; GPU: outside the loop).
Logit soft-capping (Gemma-2) applies to the scores before the mask. `interpret=True` runs either kernel on CPU
(how the tests run them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu, triton as pltriton

from lwjax.kernels.reference import soft_cap

_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
# Programs that fill an H100/H200 (132 SMs) about twice; fewer (sequence, kv head) pairs get split-K.
_GPU_PROGRAMS = 256


def decode_attention(q, k_pages, v_pages, page_table, lengths, *, sm_scale=None, window=None, softcap=None,
                     backend=None, num_splits=None, block_kv=None, interpret=False):
  """Paged attention of the newest tokens; arguments and result as `reference.decode_attention`.

  Args:
    backend: "tpu" or "gpu" kernel; default "gpu" on a GPU, else "tpu" (also in interpret mode on CPU).
    num_splits: key ranges per sequence (split-K); default 1 where batch x kv_heads fills the device.
    block_kv: keys per step; TPU default 512 (rounded down to whole pages), GPU default 64 (a power of 2).
    interpret: run the kernel in Pallas interpret mode: True, or `pltpu.InterpretParams()` for the TPU kernel
      in Pallas' TPU simulator.
  """
  batch, q_tokens, heads, dim = q.shape
  kv_heads = k_pages.shape[0]
  if heads % kv_heads:
    raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
  groups = heads // kv_heads
  backend = backend or ("gpu" if jax.default_backend() == "gpu" else "tpu")
  if backend not in ("tpu", "gpu"):
    raise ValueError(f"backend must be 'tpu' or 'gpu', got {backend!r}")
  # Row r = token * groups + group, matching head = kv_head * groups + group.
  q_bkrd = q.reshape(batch, q_tokens, kv_heads, groups, dim).transpose(0, 2, 1, 3, 4)
  q_bkrd = q_bkrd.reshape(batch, kv_heads, q_tokens * groups, dim)
  kernel = _tpu_decode if backend == "tpu" else _gpu_decode
  o_bksrd, lse_bksr1 = kernel(
      q_bkrd, k_pages, v_pages, jnp.asarray(page_table, jnp.int32), jnp.asarray(lengths, jnp.int32),
      scale=dim ** -0.5 if sm_scale is None else sm_scale, window=window, softcap=softcap, q_tokens=q_tokens,
      groups=groups, num_splits=num_splits, block_kv=block_kv, interpret=interpret)
  out_bkrd = _combine_splits(o_bksrd, lse_bksr1)
  out = out_bkrd.reshape(batch, kv_heads, q_tokens, groups, dim).transpose(0, 2, 1, 3, 4)
  return out.reshape(batch, q_tokens, heads, dim).astype(q.dtype)


def _combine_splits(o_bksrd, lse_bksr1):
  """Merges per-split outputs [b, k, splits, rows, d] by their log-sum-exps; empty splits have -inf."""
  if o_bksrd.shape[2] == 1:
    return o_bksrd[:, :, 0]
  lse_max = lse_bksr1.max(axis=2, keepdims=True)
  weights = jnp.exp(lse_bksr1 - jnp.where(jnp.isfinite(lse_max), lse_max, 0.0))
  total = weights.sum(axis=2)
  return (weights * o_bksrd).sum(axis=2) / jnp.where(total > 0, total, 1.0)


def _first_visible_key(length, q_tokens, window):
  """The first key any of a sequence's new tokens sees: 0, or with a window that of its earliest new token."""
  return 0 if window is None else jnp.maximum(length - q_tokens - window + 1, 0)


def _online_softmax_step(carry, q_rd, k_nd, v_nd, first_key, length, *, q_tokens, groups, scale, window, softcap):
  """One block of keys at positions first_key + [0, n) folded into (max, sum, acc) for every query row."""
  m_r1, l_r1, acc_rd = carry
  precision = lax.Precision.HIGHEST if q_rd.dtype == jnp.float32 else None
  logits = lax.dot_general(q_rd, k_nd, (((1,), (1,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32) * scale  # [rows, n]
  logits = soft_cap(logits, softcap)
  key_pos = first_key + lax.broadcasted_iota(jnp.int32, logits.shape, 1)
  query_pos = length - q_tokens + lax.div(lax.broadcasted_iota(jnp.int32, logits.shape, 0), groups)
  visible = key_pos <= query_pos  # causal; also hides keys >= length and slots past the last page
  if window is not None:
    visible &= query_pos - key_pos < window
  logits = jnp.where(visible, logits, _MASK_VALUE)
  m_new = jnp.maximum(m_r1, logits.max(axis=1, keepdims=True))
  # Masked keys get exactly 0 even in rows that have seen no visible key yet (m_new == mask value).
  p = jnp.where(visible, jnp.exp(logits - m_new), 0.0)
  alpha = jnp.exp(m_r1 - m_new)
  pv = lax.dot_general(p.astype(v_nd.dtype), v_nd, (((1,), (0,)), ((), ())), precision=precision,
                       preferred_element_type=jnp.float32)
  return m_new, alpha * l_r1 + p.sum(axis=1, keepdims=True), alpha * acc_rd + pv


def _normalise(m_r1, l_r1, acc_rd):
  """(output, log-sum-exp) of one split; rows without visible keys give 0 and -inf."""
  has_keys = l_r1 > 0
  l_safe = jnp.where(has_keys, l_r1, 1.0)
  return acc_rd / l_safe, jnp.where(has_keys, m_r1 + jnp.log(l_safe), -jnp.inf)


def _tpu_decode(q_bkrd, k_pages, v_pages, page_table, lengths, *, scale, window, softcap, q_tokens, groups,
                num_splits, block_kv, interpret):
  batch, kv_heads, rows, dim = q_bkrd.shape
  page_size = k_pages.shape[2]
  max_pages = page_table.shape[1]
  pages_per_block = max(1, min(max_pages, (block_kv or 512) // page_size))
  num_blocks = pl.cdiv(max_pages, pages_per_block)
  # One TensorCore walks the grid in order (v5e); megacore chips (v4, v5p) share the parallel axes, so
  # split-K only pays when there is a single (sequence, kv head) pair.
  splits = num_splits or (1 if batch * kv_heads > 1 else min(2, num_blocks))
  blocks_per_split = pl.cdiv(num_blocks, splits)

  # lax.div, not //: floor division lowers through `sign`, whose Mosaic rule asks the current device for its
  # TPU generation (none when compiling ahead of time on CPU); truncation differs only below 0, clipped here.
  # Blocks past the length, or before the window, map to the nearest block that is read: no copy for them.
  def page_index_map(j):
    def index_map(b, h, s, i, lengths_ref, pages_ref):
      length = lengths_ref[b]
      last_page = jnp.clip(lax.div(length - 1, page_size), 0, max_pages - 1)
      block = jnp.minimum(s * blocks_per_split + i, lax.div(last_page, pages_per_block))
      if window is not None:
        first_page = jnp.minimum(lax.div(_first_visible_key(length, q_tokens, window), page_size), last_page)
        block = jnp.maximum(block, lax.div(first_page, pages_per_block))
      return h, pages_ref[b * max_pages + jnp.minimum(block * pages_per_block + j, last_page)], 0, 0
    return index_map

  page_specs = [pl.BlockSpec((None, None, page_size, dim), page_index_map(j)) for j in range(pages_per_block)]

  def split_spec(last_dim):
    return pl.BlockSpec((None, None, None, rows, last_dim), lambda b, h, s, i, *_: (b, h, s, 0, 0))

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=(batch, kv_heads, splits, blocks_per_split),
      in_specs=[pl.BlockSpec((None, None, rows, dim), lambda b, h, s, i, *_: (b, h, 0, 0))] + page_specs * 2,
      out_specs=[split_spec(dim), split_spec(1)],
      scratch_shapes=[pltpu.VMEM((rows, 1), jnp.float32), pltpu.VMEM((rows, 1), jnp.float32),
                      pltpu.VMEM((rows, dim), jnp.float32)])
  kernel = functools.partial(_tpu_kernel, pages_per_block=pages_per_block, page_size=page_size,
                             blocks_per_split=blocks_per_split, q_tokens=q_tokens, groups=groups, scale=scale,
                             window=window, softcap=softcap)
  out_dtype = q_bkrd.dtype if splits == 1 else jnp.float32
  return pl.pallas_call(
      kernel, grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((batch, kv_heads, splits, rows, dim), out_dtype),
                 jax.ShapeDtypeStruct((batch, kv_heads, splits, rows, 1), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
  )(lengths, page_table.reshape(-1), q_bkrd, *[k_pages] * pages_per_block, *[v_pages] * pages_per_block)


def _tpu_kernel(lengths_ref, pages_ref, q_ref, *refs, pages_per_block, page_size, blocks_per_split, q_tokens,
                groups, scale, window, softcap):
  del pages_ref  # used by the index maps only
  k_refs, v_refs = refs[:pages_per_block], refs[pages_per_block:2 * pages_per_block]
  o_ref, lse_ref, m_ref, l_ref, acc_ref = refs[2 * pages_per_block:]
  b, s, i = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  length = lengths_ref[b]
  first_key = (s * blocks_per_split + i) * pages_per_block * page_size

  @pl.when(i == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, _MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  in_range = first_key < length
  if window is not None:
    in_range &= first_key + pages_per_block * page_size > _first_visible_key(length, q_tokens, window)

  @pl.when(in_range)
  def _step():
    k_nd = jnp.concatenate([r[...] for r in k_refs], axis=0)  # [pages_per_block * page_size, dim]
    v_nd = jnp.concatenate([r[...] for r in v_refs], axis=0)
    carry = _online_softmax_step((m_ref[...], l_ref[...], acc_ref[...]), q_ref[...], k_nd, v_nd, first_key,
                                 length, q_tokens=q_tokens, groups=groups, scale=scale, window=window,
                                 softcap=softcap)
    m_ref[...], l_ref[...], acc_ref[...] = carry

  @pl.when(i == blocks_per_split - 1)
  def _finish():
    o_rd, lse_r1 = _normalise(m_ref[...], l_ref[...], acc_ref[...])
    o_ref[...] = o_rd.astype(o_ref.dtype)
    lse_ref[...] = lse_r1


def _gpu_decode(q_bkrd, k_pages, v_pages, page_table, lengths, *, scale, window, softcap, q_tokens, groups,
                num_splits, block_kv, interpret):
  batch, kv_heads, rows, dim = q_bkrd.shape
  page_size = k_pages.shape[2]
  max_pages = page_table.shape[1]
  block_kv = block_kv or 64
  if block_kv & (block_kv - 1) or dim & (dim - 1):
    raise ValueError(f"Triton needs power-of-2 block_kv and dim, got {block_kv} and {dim}")
  # Triton's dot needs at least 16 rows; the padding rows are dropped below.
  rows_pad = max(16, pl.next_power_of_2(rows))
  q_bkrd = jnp.pad(q_bkrd, ((0, 0), (0, 0), (0, rows_pad - rows), (0, 0)))
  num_blocks = pl.cdiv(max_pages * page_size, block_kv)
  splits = num_splits or max(1, min(num_blocks, _GPU_PROGRAMS // (batch * kv_heads)))
  blocks_per_split = pl.cdiv(num_blocks, splits)

  def whole(x):
    return pl.BlockSpec(x.shape, lambda b, h, s: (0,) * x.ndim)

  def split_spec(last_dim):
    return pl.BlockSpec((None, None, None, rows_pad, last_dim), lambda b, h, s: (b, h, s, 0, 0))

  kernel = functools.partial(_gpu_kernel, block_kv=block_kv, page_size=page_size, max_pages=max_pages,
                             blocks_per_split=blocks_per_split, q_tokens=q_tokens, groups=groups, scale=scale,
                             window=window, softcap=softcap)
  o_bksrd, lse_bksr1 = pl.pallas_call(
      kernel, grid=(batch, kv_heads, splits),
      in_specs=[whole(lengths), whole(page_table),
                pl.BlockSpec((None, None, rows_pad, dim), lambda b, h, s: (b, h, 0, 0)),
                whole(k_pages), whole(v_pages)],
      out_specs=[split_spec(dim), split_spec(1)],
      out_shape=[jax.ShapeDtypeStruct((batch, kv_heads, splits, rows_pad, dim), jnp.float32),
                 jax.ShapeDtypeStruct((batch, kv_heads, splits, rows_pad, 1), jnp.float32)],
      compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
      interpret=interpret,
  )(lengths, page_table, q_bkrd, k_pages, v_pages)
  return o_bksrd[:, :, :, :rows], lse_bksr1[:, :, :, :rows]


def _gpu_kernel(lengths_ref, pages_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, block_kv, page_size, max_pages,
                blocks_per_split, q_tokens, groups, scale, window, softcap):
  b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  length = lengths_ref[b]
  last_page = jnp.clip(lax.div(length - 1, page_size), 0, max_pages - 1)
  q_rd = q_ref[...]

  def body(i, carry):
    key_pos_n = i * block_kv + jnp.arange(block_kv, dtype=jnp.int32)
    # Slots past the last valid page re-read it (in bounds, masked): table entries there may be garbage.
    page_n = pages_ref[b, jnp.minimum(lax.div(key_pos_n, page_size), last_page)]
    slot_n = lax.rem(key_pos_n, page_size)
    return _online_softmax_step(carry, q_rd, k_ref[h, page_n, slot_n, :], v_ref[h, page_n, slot_n, :],
                                i * block_kv, length, q_tokens=q_tokens, groups=groups, scale=scale,
                                window=window, softcap=softcap)

  rows, dim = q_rd.shape
  init = (jnp.full((rows, 1), _MASK_VALUE, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
          jnp.zeros((rows, dim), jnp.float32))
  first = s * blocks_per_split
  last = jnp.minimum(first + blocks_per_split, lax.div(length + block_kv - 1, block_kv))
  if window is not None:
    first = jnp.maximum(first, lax.div(_first_visible_key(length, q_tokens, window), block_kv))
  o_rd, lse_r1 = _normalise(*lax.fori_loop(first, last, body, init))
  o_ref[...] = o_rd
  lse_ref[...] = lse_r1
