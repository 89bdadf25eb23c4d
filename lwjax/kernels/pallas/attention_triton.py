"""Chunked (flash) attention for GPU in Pallas/Triton: forward and backward kernels that loop over blocks.

FlashAttention-2 (Dao 2023, arXiv:2307.08691), Algorithms 1 and 2, written the GPU way: one program per
(query block, batch, head) loops over the key blocks it can see, so the causal diagonal and the sliding
window are loop bounds and invisible blocks cost nothing; the loop is split into the blocks that need a
mask and the fully visible ones in between, which run without mask arithmetic. Logit soft-capping (Gemma-2)
as in the TPU kernel. dk/dv: one program per
(key block, batch, kv head) loops over the query blocks of every query head of its group (GQA without
repeating K/V, and no atomics). Arrays stay `[batch, len, heads, dim]` (Triton addresses strided blocks).
Block ranges, masks and the static configuration are shared with the TPU kernel (`attention_blocks.py`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from lwjax.kernels.pallas.attention_blocks import (
  F32,
  MASK_VALUE,
  FlashConfig,
  div,
  dot,
  dot_nt,
  full_kv_block_range,
  full_q_block_range,
  kv_block_range,
  needs_mask,
  pad_to,
  q_block_range,
  scores,
  shape_like,
  uncap,
  visible,
)


def attention(q, k, v, *, causal=True, segment_ids=None, q_offset=0, sm_scale=None, window=None, softcap=None,
              block_q=128, block_k=64, interpret=False):
  """Flash attention on GPU; same arguments and result as `lwjax.kernels.reference.attention`.

  q [batch, q_len, heads, dim], k/v [batch, kv_len, kv_heads, dim] -> [batch, q_len, heads, dim].
  Block sizes are powers of two >= 16 (Triton's dot); `dim` is zero-padded to one. The defaults (and the
  warps/stages below) are the usual FlashAttention-2 Triton choices for H100, not tuned here (no GPU).
  """
  batch, q_len, heads, dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  if heads % kv_heads:
    raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
  bq, bk = min(block_q, _pow2_at_least(q_len)), min(block_k, _pow2_at_least(kv_len))
  padded_dim = _pow2_at_least(dim)
  cfg = FlashConfig(causal=causal, window=window, softcap=None if softcap is None else float(softcap),
                    sm_scale=dim ** -0.5 if sm_scale is None else float(sm_scale), block_q=bq, block_k=bk,
                    kv_len=kv_len, groups=heads // kv_heads, dim=padded_dim, segments=segment_ids is not None,
                    interpret=interpret)
  offsets = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (batch,))
  segs = None
  if segment_ids is not None:
    q_seg, kv_seg = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
    segs = (pad_to(jnp.asarray(q_seg, jnp.int32), 1, bq), pad_to(jnp.asarray(kv_seg, jnp.int32), 1, bk))
  def pad(x, block):
    return pad_to(pad_to(x, 3, padded_dim), 1, block)
  out = _flash(pad(q, bq), pad(k, bk), pad(v, bk), offsets, segs, cfg)
  return out[:, :q_len, :, :dim]


def _pow2_at_least(n):
  return max(16, 1 << (n - 1).bit_length())


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, offsets, segs, cfg):
  return _forward(cfg, q, k, v, offsets, segs)[0]


def _flash_fwd(q, k, v, offsets, segs, cfg):
  out, lse = _forward(cfg, q, k, v, offsets, segs)
  return out, (q, k, v, offsets, segs, out, lse)


def _flash_bwd(cfg, residuals, d_out):
  q, k, v, offsets, segs, out, lse = residuals
  delta = jnp.swapaxes(jnp.sum(d_out.astype(F32) * out.astype(F32), axis=-1), 1, 2)  # [b, h, q_len]
  dq = _backward_dq(cfg, q, k, v, offsets, segs, d_out, lse, delta)
  dk, dv = _backward_dkv(cfg, q, k, v, offsets, segs, d_out, lse, delta)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _loop_visible(cfg, lo, hi, full_lo, full_hi, body, carry):
  """`carry = body(masked)(i, carry)` for i in [lo, hi]: unmasked over [full_lo, full_hi], masked elsewhere."""
  if not needs_mask(cfg):
    return lax.fori_loop(lo, hi + 1, body(False), carry)
  start = jnp.clip(full_lo, lo, hi + 1)
  stop = jnp.clip(full_hi + 1, start, hi + 1)
  carry = lax.fori_loop(lo, start, body(True), carry)
  carry = lax.fori_loop(start, stop, body(False), carry)
  return lax.fori_loop(stop, hi + 1, body(True), carry)


def _compiler_params(dim):
  return pltriton.CompilerParams(num_warps=4 if dim <= 64 else 8, num_stages=3)


# Forward: grid (q blocks, batch, heads); K and V of the (batch, kv head) are refs sliced in the loop.

def _forward_kernel(cfg, offsets_ref, q_ref, k_ref, v_ref, *refs):
  seg_refs, (o_ref, lse_ref) = refs[:2 * cfg.segments], refs[2 * cfg.segments:]
  qi, b = pl.program_id(0), pl.program_id(1)
  bq, bk = cfg.block_q, cfg.block_k
  q_first = offsets_ref[b] + qi * bq
  q = q_ref[...]  # [bq, d]
  q_seg = seg_refs[0][...][:, None] if cfg.segments else None

  def body(masked):
    def step(ki, carry):
      m, row_sum, acc = carry
      keys = pl.ds(ki * bk, bk)
      s = scores(cfg, dot_nt(q, k_ref[keys, :]) * cfg.sm_scale)[0]  # [bq, bk]
      if masked:
        kv_seg = seg_refs[1][keys][None, :] if cfg.segments else None
        mask = visible(cfg, s.shape, 0, q_first, ki * bk, q_seg, kv_seg)
        s = jnp.where(mask, s, MASK_VALUE)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      p = jnp.exp(s - m_new[:, None])
      if masked:
        p = jnp.where(mask, p, 0.0)
      alpha = jnp.exp(m - m_new)
      acc = alpha[:, None] * acc + dot(p.astype(v_ref.dtype), v_ref[keys, :])
      return m_new, alpha * row_sum + jnp.sum(p, axis=1), acc
    return step

  nk = k_ref.shape[0] // bk
  carry = (jnp.full((bq,), MASK_VALUE, F32), jnp.zeros((bq,), F32), jnp.zeros(q.shape, F32))
  m, row_sum, acc = _loop_visible(cfg, *kv_block_range(cfg, q_first, nk), *full_kv_block_range(cfg, q_first, nk),
                                  body, carry)
  empty = row_sum == 0.0
  o_ref[...] = (acc / jnp.where(empty, 1.0, row_sum)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, row_sum)))


def _specs(cfg, q, k, segs):
  """BlockSpecs of (offsets, q block, whole-sequence K/V, segment ids, lse row) on grid (qi, b, h)."""
  kv_len, dim = k.shape[1], q.shape[3]
  q_spec = pl.BlockSpec((None, cfg.block_q, None, dim), lambda qi, b, h: (b, qi, h, 0))
  kv_spec = pl.BlockSpec((None, kv_len, None, dim), lambda qi, b, h: (b, 0, div(h, cfg.groups), 0))
  seg_specs = []
  if segs is not None:
    seg_specs = [pl.BlockSpec((None, cfg.block_q), lambda qi, b, h: (b, qi)),
                 pl.BlockSpec((None, kv_len), lambda qi, b, h: (b, 0))]
  row_spec = pl.BlockSpec((None, None, cfg.block_q), lambda qi, b, h: (b, h, qi))
  return pl.no_block_spec, q_spec, kv_spec, seg_specs, row_spec


def _forward(cfg, q, k, v, offsets, segs):
  batch, q_len, heads, dim = q.shape
  off_spec, q_spec, kv_spec, seg_specs, row_spec = _specs(cfg, q, k, segs)
  return pl.pallas_call(
      functools.partial(_forward_kernel, cfg), grid=(q_len // cfg.block_q, batch, heads),
      in_specs=[off_spec, q_spec, kv_spec, kv_spec, *seg_specs], out_specs=[q_spec, row_spec],
      out_shape=[shape_like(q, q.shape, q.dtype), shape_like(q, (batch, heads, q_len), F32)],
      compiler_params=_compiler_params(dim), interpret=cfg.interpret, name="flash_attention_fwd",
  )(offsets, q, k, v, *(segs or ()))


# Backward dq: grid (q blocks, batch, heads), the same loop as the forward.

def _backward_dq_kernel(cfg, offsets_ref, q_ref, k_ref, v_ref, *refs):
  seg_refs, (do_ref, lse_ref, delta_ref, dq_ref) = refs[:2 * cfg.segments], refs[2 * cfg.segments:]
  qi, b = pl.program_id(0), pl.program_id(1)
  bq, bk = cfg.block_q, cfg.block_k
  q_first = offsets_ref[b] + qi * bq
  q, d_out = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]
  q_seg = seg_refs[0][...][:, None] if cfg.segments else None

  def body(masked):
    def step(ki, dq):
      keys = pl.ds(ki * bk, bk)
      k = k_ref[keys, :]
      s, t = scores(cfg, dot_nt(q, k) * cfg.sm_scale)  # [bq, bk]
      p = jnp.exp(s - lse)
      if masked:
        kv_seg = seg_refs[1][keys][None, :] if cfg.segments else None
        p = jnp.where(visible(cfg, p.shape, 0, q_first, ki * bk, q_seg, kv_seg), p, 0.0)
      ds = uncap(p * (dot_nt(d_out, v_ref[keys, :]) - delta), t)
      return dq + dot(ds.astype(k.dtype), k)
    return step

  nk = k_ref.shape[0] // bk
  dq = _loop_visible(cfg, *kv_block_range(cfg, q_first, nk), *full_kv_block_range(cfg, q_first, nk), body,
                     jnp.zeros(q.shape, F32))
  dq_ref[...] = (dq * cfg.sm_scale).astype(dq_ref.dtype)


def _backward_dq(cfg, q, k, v, offsets, segs, d_out, lse, delta):
  batch, q_len, heads, dim = q.shape
  off_spec, q_spec, kv_spec, seg_specs, row_spec = _specs(cfg, q, k, segs)
  return pl.pallas_call(
      functools.partial(_backward_dq_kernel, cfg), grid=(q_len // cfg.block_q, batch, heads),
      in_specs=[off_spec, q_spec, kv_spec, kv_spec, *seg_specs, q_spec, row_spec, row_spec],
      out_specs=q_spec, out_shape=shape_like(q, q.shape, q.dtype),
      compiler_params=_compiler_params(dim), interpret=cfg.interpret, name="flash_attention_dq",
  )(offsets, q, k, v, *(segs or ()), d_out, lse, delta)


# Backward dk, dv: grid (k blocks, batch, kv heads); loops over the group's heads and their query blocks,
# scores transposed ([bk, bq]) so that lse and delta broadcast as rows.

def _backward_dkv_kernel(cfg, offsets_ref, q_ref, k_ref, v_ref, *refs):
  seg_refs, (do_ref, lse_ref, delta_ref, dk_ref, dv_ref) = refs[:2 * cfg.segments], refs[2 * cfg.segments:]
  ki, b = pl.program_id(0), pl.program_id(1)
  bq, bk = cfg.block_q, cfg.block_k
  offset, k_first = offsets_ref[b], ki * bk
  k, v = k_ref[...], v_ref[...]  # [bk, d]
  kv_seg = seg_refs[1][...][:, None] if cfg.segments else None

  def body(g):
    def with_mask(masked):
      def step(qi, carry):
        dk, dv = carry
        queries = pl.ds(qi * bq, bq)
        q, d_out = q_ref[queries, g, :], do_ref[queries, g, :]
        s_t, t_t = scores(cfg, dot_nt(k, q) * cfg.sm_scale)  # [bk, bq]
        p_t = jnp.exp(s_t - lse_ref[g, queries][None, :])
        if masked:
          q_seg = seg_refs[0][queries][None, :] if cfg.segments else None
          p_t = jnp.where(visible(cfg, p_t.shape, 1, offset + qi * bq, k_first, q_seg, kv_seg), p_t, 0.0)
        dv = dv + dot(p_t.astype(d_out.dtype), d_out)
        ds_t = uncap(p_t * (dot_nt(v, d_out) - delta_ref[g, queries][None, :]), t_t)
        return dk + dot(ds_t.astype(q.dtype), q), dv
      return step
    return with_mask

  nq = q_ref.shape[0] // bq
  ranges = (*q_block_range(cfg, offset, k_first, nq), *full_q_block_range(cfg, offset, k_first, nq))
  carry = (jnp.zeros(k.shape, F32), jnp.zeros(v.shape, F32))
  for g in range(cfg.groups):
    carry = _loop_visible(cfg, *ranges, body(g), carry)
  dk_ref[...] = (carry[0] * cfg.sm_scale).astype(dk_ref.dtype)
  dv_ref[...] = carry[1].astype(dv_ref.dtype)


def _backward_dkv(cfg, q, k, v, offsets, segs, d_out, lse, delta):
  batch, q_len, heads, dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  g = cfg.groups
  group_spec = pl.BlockSpec((None, q_len, g, dim), lambda ki, b, j: (b, 0, j, 0))  # the group's heads
  kv_spec = pl.BlockSpec((None, cfg.block_k, None, dim), lambda ki, b, j: (b, ki, j, 0))
  rows_spec = pl.BlockSpec((None, g, q_len), lambda ki, b, j: (b, j, 0))
  seg_specs = []
  if segs is not None:
    seg_specs = [pl.BlockSpec((None, q_len), lambda ki, b, j: (b, 0)),
                 pl.BlockSpec((None, cfg.block_k), lambda ki, b, j: (b, ki))]
  return pl.pallas_call(
      functools.partial(_backward_dkv_kernel, cfg), grid=(kv_len // cfg.block_k, batch, kv_heads),
      in_specs=[pl.no_block_spec, group_spec, kv_spec, kv_spec, *seg_specs, group_spec, rows_spec,
                rows_spec],
      out_specs=[kv_spec, kv_spec],
      out_shape=[shape_like(q, k.shape, k.dtype), shape_like(q, v.shape, v.dtype)],
      compiler_params=_compiler_params(dim), interpret=cfg.interpret, name="flash_attention_dkv",
  )(offsets, q, k, v, *(segs or ()), d_out, lse, delta)
