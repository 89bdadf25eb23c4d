"""Chunked (flash) attention for TPU in Pallas/Mosaic: forward and backward kernels over KV/Q blocks.

FlashAttention-2 (Dao 2023, arXiv:2307.08691): Algorithm 1 (forward: online softmax over KV blocks, the
log-sum-exp saved per query) and Algorithm 2 (backward from the saved log-sum-exp), with dq and dk/dv in
separate kernels so every grid cell owns its output block and no accumulation crosses parallel cells.

TPU mapping. Arrays are head-major `[batch, heads, len, dim]` (the wrapper transposes), one (query block,
key block) pair per grid step, blocks DMA'd into VMEM by BlockSpecs, accumulators in VMEM scratch along the
innermost ("arbitrary") grid axis. (Viewing `[batch, len, heads * dim]` with a head as a lane-aligned column
block would avoid the transposes on paper, but on TPU that view is itself a relayout of `[.., heads, dim]`
tiles: AOT-compiled inside a GPT layer it made more copies, not fewer.) Query offsets (chunked prefill, one
per sequence) are scalar-prefetched into SMEM so that the index maps can use them: a key block that no query
of the current query block can see (above the causal diagonal, outside the sliding window) is neither
computed (`pl.when`) nor fetched (its index map repeats the previous block, and the pipeline skips a copy
whose block index is unchanged). Blocks entirely visible take a path without mask arithmetic. GQA reads kv
head `head // groups` through the index map; repeated K/V are never built. bf16/fp32 matmul inputs, fp32
accumulation. Gemma-2's logit soft-capping, `softcap * tanh(s / softcap)`, applies to each block's scores
before the mask; the backward pass recomputes the tanh and takes the gradient through it (1 - tanh^2).
Lengths are padded to the block size; padded keys are masked, padded queries sliced off.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lwjax.kernels.pallas.attention_blocks import (
  F32,
  MASK_VALUE,
  FlashConfig,
  div,
  dot,
  dot_nt,
  kv_block_range,
  pad_to,
  q_block_range,
  round_up,
  scores,
  shape_like,
  uncap,
  visible,
)


def attention(q, k, v, *, causal=True, segment_ids=None, q_offset=0, sm_scale=None, window=None, softcap=None,
              block_q=512, block_k=512, interpret=False):
  """Flash attention; same arguments and result as `lwjax.kernels.reference.attention`.

  q [batch, q_len, heads, dim], k/v [batch, kv_len, kv_heads, dim] -> [batch, q_len, heads, dim].
  `block_q`/`block_k` cap the block sizes (on TPU multiples of 128 unless a block spans the whole padded
  length). `interpret`: False on TPU; True or `pltpu.InterpretParams()` to run the kernels on CPU.
  """
  batch, q_len, heads, dim = q.shape
  kv_len, kv_heads = k.shape[1], k.shape[2]
  if heads % kv_heads:
    raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
  bq, bk = min(block_q, round_up(q_len, 8)), min(block_k, round_up(kv_len, 8))
  cfg = FlashConfig(causal=causal, window=window, softcap=None if softcap is None else float(softcap),
                    sm_scale=dim ** -0.5 if sm_scale is None else float(sm_scale), block_q=bq, block_k=bk,
                    kv_len=kv_len, groups=heads // kv_heads, dim=dim, segments=segment_ids is not None,
                    interpret=interpret, q_offset=q_offset if isinstance(q_offset, int) else None)
  offsets = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (batch,))
  segs = None
  if segment_ids is not None:
    q_seg, kv_seg = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
    segs = (pad_to(jnp.asarray(q_seg, jnp.int32), 1, bq), pad_to(jnp.asarray(kv_seg, jnp.int32), 1, bk))
  def head_major(x, block):
    return pad_to(jnp.swapaxes(x, 1, 2), 2, block)  # [b, s, h, d] -> [b, h, s', d]
  out = _flash(head_major(q, bq), head_major(k, bk), head_major(v, bk), offsets, segs, cfg)
  return jnp.swapaxes(out[:, :, :q_len], 1, 2)


def _head_block(cfg, rows, index_map):
  """BlockSpec of `rows` rows of one head; `index_map(*grid, offsets) -> (batch, head, row block)`."""
  def block(*args):
    b, h, r = index_map(*args)
    return b, h, r, 0
  return pl.BlockSpec((None, None, rows, cfg.dim), block)


def _row_block(cfg, index_map):
  """BlockSpec of a lane-major row of per-query values (lse, delta) in a [batch, heads, 1, q_len] array."""
  def row(*args):
    b, h, r = index_map(*args)
    return b, h, 0, r
  return pl.BlockSpec((None, None, 1, cfg.block_q), row)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, offsets, segs, cfg):
  return _forward(cfg, q, k, v, offsets, segs)[0]


def _flash_fwd(q, k, v, offsets, segs, cfg):
  out, lse = _forward(cfg, q, k, v, offsets, segs)
  return out, (q, k, v, offsets, segs, out, lse)


def _flash_bwd(cfg, residuals, d_out):
  q, k, v, offsets, segs, out, lse = residuals
  # D_i = rowsum(dO_i * O_i) (FlashAttention-2, Algorithm 2, line 4), as [b, h, 1, q_len] like lse.
  delta = jnp.sum(d_out.astype(F32) * out.astype(F32), axis=-1)[:, :, None, :]
  dq = _backward_dq(cfg, q, k, v, offsets, segs, d_out, lse, delta)
  dk, dv = _backward_dkv(cfg, q, k, v, offsets, segs, d_out, lse, delta)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _for_visible_block(cfg, q_first, k_first, step):
  """Runs `step(masked)` if the block has a visible entry; `masked=False` when every entry is visible."""
  q_last, k_last = q_first + cfg.block_q - 1, k_first + cfg.block_k - 1
  run, full = [], []
  if cfg.causal:
    run.append(k_first <= q_last)
    full.append(k_last <= q_first)
  if cfg.window is not None:
    run.append(k_last > q_first - cfg.window)
    full.append(k_first > q_last - cfg.window)
  if cfg.kv_len % cfg.block_k:
    full.append(k_last < cfg.kv_len)
  run = functools.reduce(jnp.logical_and, run, True)
  if cfg.segments:
    pl.when(run)(lambda: step(True))
    return
  full = functools.reduce(jnp.logical_and, full, True)
  pl.when(jnp.logical_and(run, full) if full is not True else run)(lambda: step(False))
  if full is not True:
    pl.when(jnp.logical_and(run, jnp.logical_not(full)))(lambda: step(True))


def _clamp(i, lo, hi):
  return jnp.minimum(jnp.maximum(i, lo), hi)


def _q_major_specs(cfg, k, segs):
  """BlockSpecs on the grid (batch, heads, q blocks, k blocks): q-side, kv-side, lse-row, segment ids."""
  nk = k.shape[2] // cfg.block_k

  def kv_block(b, qi, ki, off):  # invisible key blocks map to a visible one: no DMA for them
    return _clamp(ki, *kv_block_range(cfg, off[b] + qi * cfg.block_q, nk))

  q_spec = _head_block(cfg, cfg.block_q, lambda b, h, qi, ki, off: (b, h, qi))
  kv_spec = _head_block(cfg, cfg.block_k,
                        lambda b, h, qi, ki, off: (b, div(h, cfg.groups), kv_block(b, qi, ki, off)))
  row_spec = _row_block(cfg, lambda b, h, qi, ki, off: (b, h, qi))
  seg_specs, seg_operands = [], []
  if segs is not None:  # queries as a column [bq, 1], keys as a row [1, bk]
    seg_specs = [pl.BlockSpec((None, cfg.block_q, 1), lambda b, h, qi, ki, off: (b, qi, 0)),
                 pl.BlockSpec((None, 1, cfg.block_k), lambda b, h, qi, ki, off: (b, 0, kv_block(b, qi, ki, off)))]
    seg_operands = [segs[0][:, :, None], segs[1][:, None, :]]
  return q_spec, kv_spec, row_spec, seg_specs, seg_operands


def _pallas_call(cfg, kernel, name, grid, num_reductions, in_specs, out_specs, scratch_shapes, out_shape,
                 cost_estimate):
  return pl.pallas_call(
      functools.partial(kernel, cfg), out_shape=out_shape, name=name, interpret=cfg.interpret,
      grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=grid, in_specs=in_specs,
                                             out_specs=out_specs, scratch_shapes=scratch_shapes),
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel",) * (len(grid) - num_reductions) + ("arbitrary",) * num_reductions),
      cost_estimate=cost_estimate)


def visited_pairs(cfg, q_len, kv_len):
  """(query, key) pairs in the blocks the kernels compute, lengths padded to the blocks: each kernel visits the
  same (query block, key block) pairs, every pair of a visited block computed (the mask applied after the
  matmul), blocks above the causal diagonal or outside the window skipped. Causal self-attention over n blocks of
  B: n (n + 1) / 2 blocks, T (T + B) / 2 pairs, about half of T^2. A traced query offset (chunked prefill, one
  per sequence): every pair, the dense upper bound."""
  if cfg.q_offset is None or not (cfg.causal or cfg.window is not None):
    return q_len * kv_len
  blocks = 0
  for qi in range(q_len // cfg.block_q):  # kv_block_range with the static offset
    q_first = cfg.q_offset + qi * cfg.block_q
    last, first = kv_len // cfg.block_k - 1, 0
    if cfg.causal:  # k_first <= q_last
      last = min(last, (q_first + cfg.block_q - 1) // cfg.block_k)
    if cfg.window is not None:  # k_last > q_first - window
      first = max(q_first - cfg.window + 1, 0) // cfg.block_k
    blocks += max(0, last - first + 1)
  return blocks * cfg.block_q * cfg.block_k


def _cost(cfg, q, k, passes):
  """`passes` matmuls of [block_q, dim] x [dim, block_k] per visited block pair (`visited_pairs`): 2 forward (QK^T,
  PV), 3 for dq (QK^T, dO V^T, dS K), 4 for dk/dv (K Q^T, P^T dO, V dO^T, dS^T Q); one exp per visited score (two
  with soft-capping's tanh). Bytes: q-side blocks once per pass, kv blocks for the visited pairs only (a skipped
  block is not fetched)."""
  (batch, heads, q_len), kv_len = q.shape[:3], k.shape[2]
  pairs = visited_pairs(cfg, q_len, kv_len)
  kv_bytes = k.size * k.dtype.itemsize * cfg.groups * pairs / (q_len * kv_len)
  return pl.CostEstimate(flops=2 * passes * batch * heads * pairs * cfg.dim,
                         transcendentals=batch * heads * pairs * (1 if cfg.softcap is None else 2),
                         bytes_accessed=int(passes * (2 * q.size * q.dtype.itemsize + kv_bytes)))


# Forward: grid (batch, heads, q blocks, k blocks); running max m, sum l and output in VMEM scratch.

def _forward_kernel(cfg, offsets_ref, q_ref, k_ref, v_ref, *refs):
  seg_refs, (o_ref, lse_ref, m_ref, l_ref, acc_ref) = refs[:2 * cfg.segments], refs[2 * cfg.segments:]
  b, qi, ki = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  q_first, k_first = offsets_ref[b] + qi * cfg.block_q, ki * cfg.block_k

  @pl.when(ki == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, F32)
    l_ref[...] = jnp.zeros(l_ref.shape, F32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, F32)

  def step(masked):
    s = scores(cfg, dot_nt(q_ref[...], k_ref[...]) * cfg.sm_scale)[0]  # [bq, bk]
    if masked:
      mask = visible(cfg, s.shape, 0, q_first, k_first, *([r[...] for r in seg_refs] or [None, None]))
      s = jnp.where(mask, s, MASK_VALUE)
    m_prev = m_ref[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.exp(s - m_new)
    if masked:  # a row with nothing visible yet has m == s == MASK_VALUE: keep its sum at zero
      p = jnp.where(mask, p, 0.0)
    alpha = jnp.exp(m_prev - m_new)
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    acc_ref[...] = alpha * acc_ref[...] + dot(p.astype(v_ref.dtype), v_ref[...])
    m_ref[...] = m_new

  _for_visible_block(cfg, q_first, k_first, step)

  @pl.when(ki == pl.num_programs(3) - 1)
  def _finish():
    row_sum = l_ref[...]
    empty = row_sum == 0.0  # no visible key (padding, or a segment absent from the keys): output 0 as reference
    o_ref[...] = (acc_ref[...] / jnp.where(empty, 1.0, row_sum)).astype(o_ref.dtype)
    lse = jnp.where(empty, jnp.inf, m_ref[...] + jnp.log(jnp.where(empty, 1.0, row_sum)))  # [bq, 1]
    lse_ref[...] = lse.reshape(1, cfg.block_q)


def _forward(cfg, q, k, v, offsets, segs):
  batch, heads, q_len = q.shape[:3]
  q_spec, kv_spec, row_spec, seg_specs, seg_operands = _q_major_specs(cfg, k, segs)
  grid = (batch, heads, q_len // cfg.block_q, k.shape[2] // cfg.block_k)
  scratch = [pltpu.VMEM((cfg.block_q, 1), F32), pltpu.VMEM((cfg.block_q, 1), F32),
             pltpu.VMEM((cfg.block_q, cfg.dim), F32)]
  return _pallas_call(
      cfg, _forward_kernel, "flash_attention_fwd", grid, 1, [q_spec, kv_spec, kv_spec, *seg_specs],
      [q_spec, row_spec], scratch, [shape_like(q, q.shape, q.dtype), shape_like(q, (batch, heads, 1, q_len), F32)],
      _cost(cfg, q, k, passes=2),
  )(offsets, q, k, v, *seg_operands)


# Backward. dq: grid (batch, heads, q blocks, k blocks), dq accumulated over k blocks.

def _backward_dq_kernel(cfg, offsets_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
  seg_refs, (dq_ref, acc_ref) = refs[:2 * cfg.segments], refs[2 * cfg.segments:]
  b, qi, ki = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  q_first, k_first = offsets_ref[b] + qi * cfg.block_q, ki * cfg.block_k

  @pl.when(ki == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, F32)

  def step(masked):
    s, t = scores(cfg, dot_nt(q_ref[...], k_ref[...]) * cfg.sm_scale)  # [bq, bk]
    p = jnp.exp(s - lse_ref[...].reshape(cfg.block_q, 1))
    if masked:
      segs = [r[...] for r in seg_refs] or [None, None]
      p = jnp.where(visible(cfg, s.shape, 0, q_first, k_first, *segs), p, 0.0)
    dp = dot_nt(do_ref[...], v_ref[...])  # [bq, bk]
    ds = uncap(p * (dp - delta_ref[...].reshape(cfg.block_q, 1)), t)
    acc_ref[...] += dot(ds.astype(k_ref.dtype), k_ref[...])

  _for_visible_block(cfg, q_first, k_first, step)

  @pl.when(ki == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (acc_ref[...] * cfg.sm_scale).astype(dq_ref.dtype)


def _backward_dq(cfg, q, k, v, offsets, segs, d_out, lse, delta):
  batch, heads, q_len = q.shape[:3]
  q_spec, kv_spec, row_spec, seg_specs, seg_operands = _q_major_specs(cfg, k, segs)
  grid = (batch, heads, q_len // cfg.block_q, k.shape[2] // cfg.block_k)
  return _pallas_call(
      cfg, _backward_dq_kernel, "flash_attention_dq", grid, 1,
      [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *seg_specs], q_spec,
      [pltpu.VMEM((cfg.block_q, cfg.dim), F32)], shape_like(q, q.shape, q.dtype), _cost(cfg, q, k, passes=3),
  )(offsets, q, k, v, d_out, lse, delta, *seg_operands)


# dk, dv: grid (batch, kv heads, k blocks, heads of the group, q blocks), summed over the last two axes.
# Computed transposed ([bk, bq] scores) so that lse and delta broadcast as lane-major rows.

def _backward_dkv_kernel(cfg, offsets_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs):
  seg_refs, (dk_ref, dv_ref, dk_acc, dv_acc) = refs[:2 * cfg.segments], refs[2 * cfg.segments:]
  b, ki, g, qi = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
  q_first, k_first = offsets_ref[b] + qi * cfg.block_q, ki * cfg.block_k

  @pl.when((g == 0) & (qi == 0))
  def _init():
    dk_acc[...] = jnp.zeros(dk_acc.shape, F32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, F32)

  def step(masked):
    q, d_out = q_ref[...], do_ref[...]
    s_t, t_t = scores(cfg, dot_nt(k_ref[...], q) * cfg.sm_scale)  # [bk, bq]
    p_t = jnp.exp(s_t - lse_ref[...])
    if masked:
      q_seg, kv_seg = [r[...] for r in seg_refs] or [None, None]  # q [1, bq], kv [bk, 1]
      p_t = jnp.where(visible(cfg, p_t.shape, 1, q_first, k_first, q_seg, kv_seg), p_t, 0.0)
    dv_acc[...] += dot(p_t.astype(d_out.dtype), d_out)
    ds_t = uncap(p_t * (dot_nt(v_ref[...], d_out) - delta_ref[...]), t_t)  # [bk, bq]
    dk_acc[...] += dot(ds_t.astype(q.dtype), q)

  _for_visible_block(cfg, q_first, k_first, step)

  @pl.when((g == pl.num_programs(3) - 1) & (qi == pl.num_programs(4) - 1))
  def _finish():
    dk_ref[...] = (dk_acc[...] * cfg.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _backward_dkv(cfg, q, k, v, offsets, segs, d_out, lse, delta):
  batch, kv_heads, kv_len = k.shape[:3]
  nq, nk = q.shape[2] // cfg.block_q, kv_len // cfg.block_k

  def q_block(b, ki, qi, off):  # query blocks that cannot see this key block map to one that can
    return _clamp(qi, *q_block_range(cfg, off[b], ki * cfg.block_k, nq))

  def q_index(b, j, ki, g, qi, off):
    return b, j * cfg.groups + g, q_block(b, ki, qi, off)

  q_spec, row_spec = _head_block(cfg, cfg.block_q, q_index), _row_block(cfg, q_index)
  kv_spec = _head_block(cfg, cfg.block_k, lambda b, j, ki, g, qi, off: (b, j, ki))
  seg_specs, seg_operands = [], []
  if segs is not None:  # queries as a row [1, bq], keys as a column [bk, 1]
    seg_specs = [pl.BlockSpec((None, 1, cfg.block_q), lambda b, j, ki, g, qi, off: (b, 0, q_block(b, ki, qi, off))),
                 pl.BlockSpec((None, cfg.block_k, 1), lambda b, j, ki, g, qi, off: (b, ki, 0))]
    seg_operands = [segs[0][:, None, :], segs[1][:, :, None]]
  scratch = [pltpu.VMEM((cfg.block_k, cfg.dim), F32), pltpu.VMEM((cfg.block_k, cfg.dim), F32)]
  return _pallas_call(
      cfg, _backward_dkv_kernel, "flash_attention_dkv", (batch, kv_heads, nk, cfg.groups, nq), 2,
      [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, *seg_specs], [kv_spec, kv_spec], scratch,
      [shape_like(q, k.shape, k.dtype), shape_like(q, v.shape, v.dtype)], _cost(cfg, q, k, passes=4),
  )(offsets, q, k, v, d_out, lse, delta, *seg_operands)
