"""Chunked Mamba-2 SSD for TPU in Pallas/Mosaic, forward and backward (Dao & Gu 2024, Sec. 6, Listing 1).

Within a chunk of `chunk` steps the scan is the quadratic, attention-like form on the MXU,
`y = (C B^T * L) (dt x)` with `L[t, s] = exp(cum_t - cum_s)` for `s <= t`; across chunks the `[headdim,
state]` float32 state of one head carries in VMEM scratch along the "arbitrary" chunk axis of the grid
(batch, heads, chunks), entering each chunk as `exp(cum_t) C_t h` and leaving as
`exp(cum_end) h + (exp(cum_end - cum) dt x)^T B`. HBM sees x, B, C read once and y written once.

Layout: the wrapper makes x head-major `[b, heads, l, headdim]` (a Mosaic block's last two dims are
tiled, so a head cannot be a squeezed middle dim) and B, C `[b, groups, l, state]`; a head reads its
group through the index map. The per-step log decays `cum` (in-chunk cumsum of dt * A) are computed by XLA
and passed as a column and as a row, so the `[chunk, chunk]` decay mask needs no in-kernel transpose. The
softplus, the cumsum, the D skip and the z gate stay in XLA (and XLA differentiates them).

Backward (`jax.custom_vjp`): the forward also writes the state entering each chunk; a second kernel walks
the chunks in reverse, carrying dL/dh across them in VMEM, and forms every gradient of the chunk with
matmuls (dx, dt, dB, dC per head, d cum as a column and a row); XLA sums dB, dC over the heads of a group.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lwjax.kernels.pallas.selective_scan import match_varying, pad_axis, round_up, shape_like, softplus

_F32 = jnp.float32
_NN = (((1,), (0,)), ((), ()))  # dot_general dimension numbers: a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b^T
_TN = (((0,), (0,)), ((), ()))  # a^T @ b


@dataclasses.dataclass(frozen=True)
class _Static:
  """What the kernel specialises on (hashable: a `custom_vjp` non-differentiable argument)."""
  chunk: int
  softplus: bool
  interpret: Any


def ssd(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True, initial_state=None,
        return_state=False, chunk_size=128, interpret=False):
  """Mamba-2 SSD; same arguments and results as `lwjax.kernels.reference.ssd` (chunked form).

  x, z [batch, len, heads, headdim]; dt [batch, len, heads]; A, D, dt_bias [heads]; B, C [batch, len,
  groups, state]; initial_state [batch, heads, headdim, state]. `chunk_size`: steps per grid step, on TPU
  a multiple of 128 unless one chunk spans the whole (8-padded) length. `interpret`: False on TPU; True or
  `pltpu.InterpretParams()` on CPU.
  """
  if chunk_size % 8:
    raise ValueError(f"chunk_size ({chunk_size}) must be a multiple of 8")
  st = _Static(chunk=min(chunk_size, round_up(x.shape[1], 8)), softplus=dt_softplus, interpret=interpret)
  y, h_last = _ssd(st, x, dt, A, B, C, D, z, dt_bias, initial_state)
  return (y, h_last) if return_state else y


def _ssd(st, x, dt, A, B, C, D, z, dt_bias, initial_state):
  """The kernels between an XLA prologue (softplus, in-chunk cumsum, head-major layout) and epilogue."""
  b, seq_len, h, p = x.shape
  n = B.shape[3]
  q = st.chunk
  dt = dt.astype(_F32) + (0.0 if dt_bias is None else dt_bias.astype(_F32))
  dt = pad_axis(softplus(dt) if st.softplus else dt, 1, q)  # [b, l', h]; padded steps: no input, no decay
  lp = dt.shape[1]
  cum = jnp.cumsum((dt * A.astype(_F32)).reshape(b, lp // q, q, h), axis=2).reshape(b, lp, h)
  def head_major(a):
    return jnp.moveaxis(pad_axis(a, 1, q), 2, 1)  # [b, l, h, ...] -> [b, h, l', ...]
  h0 = jnp.zeros((b, h, p, n), _F32) if initial_state is None else initial_state.astype(_F32)
  y, h_last = _core(st, head_major(x), jnp.moveaxis(dt, 2, 1), jnp.moveaxis(cum, 2, 1), head_major(B),
                    head_major(C), h0)
  y = jnp.moveaxis(y, 1, 2)[:, :seq_len]  # [b, l, h, p] float32
  if D is not None:
    y = y + D.astype(_F32)[:, None] * x.astype(_F32)
  if z is not None:
    y = y * jax.nn.silu(z.astype(_F32))
  return y.astype(x.dtype), h_last


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(st, x, dt, cum, B, C, h0):
  """(y [b, h, l', p] float32, final state) from x [b, h, l', p], dt, cum [b, h, l'], B, C [b, g, l', n]."""
  return _forward(st, x, dt, cum, B, C, h0, save_starts=False)


def _core_fwd(st, x, dt, cum, B, C, h0):
  y, h_last, starts = _forward(st, x, dt, cum, B, C, h0, save_starts=True)
  return (y, h_last), (x, dt, cum, B, C, h0, starts)


def _core_bwd(st, res, cotangents):
  *primals, starts = res
  x, _, _, B, _, _ = primals
  b, h, lp, _ = x.shape
  g, n = B.shape[1], B.shape[3]
  dx, ddt, dcum_col, dcum_row, dB, dC, dh0 = _backward(st, (*primals[:-1], starts), *cotangents)
  def by_group(per_head):
    return per_head.reshape(b, g, h // g, lp, n).sum(2)
  grads = (dx, ddt[..., 0], dcum_col[..., 0] + dcum_row[:, :, 0], by_group(dB), by_group(dC), dh0)
  return tuple(match_varying(ct.astype(p.dtype), p) for ct, p in zip(grads, primals, strict=False))


_core.defvjp(_core_fwd, _core_bwd)


def _specs(st, p, n, heads_per_group, reverse):
  """BlockSpecs over the grid (batch, head, chunk step); `reverse` walks chunks last to first."""
  def chunk_of(c):
    return pl.num_programs(2) - 1 - c if reverse else c
  q = st.chunk
  return dict(
      seq=pl.BlockSpec((None, None, q, p), lambda i, k, c: (i, k, chunk_of(c), 0)),  # [b, h, l, p]
      col=pl.BlockSpec((None, None, q, 1), lambda i, k, c: (i, k, chunk_of(c), 0)),  # [b, h, l, 1]
      row=pl.BlockSpec((None, None, 1, q), lambda i, k, c: (i, k, 0, chunk_of(c))),  # [b, h, 1, l]
      bc=pl.BlockSpec((None, None, q, n),  # [b, g, l, n]
                      lambda i, k, c: (i, lax.div(k, heads_per_group), chunk_of(c), 0)),
      per_head=pl.BlockSpec((None, None, q, n), lambda i, k, c: (i, k, chunk_of(c), 0)),  # [b, h, l, n]
      state=pl.BlockSpec((None, None, p, n), lambda i, k, c: (i, k, 0, 0)),  # [b, h, p, n]
      start=pl.BlockSpec((None, None, None, p, n), lambda i, k, c: (i, k, chunk_of(c), 0, 0)))  # [b, h, c, p, n]


def _call(kernel, st, grid, in_specs, out_specs, out_shape, state_shape, name, cost):
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM(state_shape, _F32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=st.interpret, name=name, cost_estimate=cost)


def _forward(st, x, dt, cum, B, C, h0, save_starts):
  """x [b, h, l', p]; dt, cum [b, h, l']; B, C [b, g, l', n]; h0 [b, h, p, n]."""
  b, h, lp, p = x.shape
  g, n = B.shape[1], B.shape[3]
  q = st.chunk
  sp = _specs(st, p, n, h // g, reverse=False)
  ins = [x, dt[..., None], cum[..., None], cum[:, :, None], B, C, h0]
  in_specs = [sp["seq"], sp["col"], sp["col"], sp["row"], sp["bc"], sp["bc"], sp["state"]]
  out_shape = [shape_like(x, (b, h, lp, p), _F32)]
  out_specs = [sp["seq"]]
  if save_starts:
    out_shape.append(shape_like(x, (b, h, lp // q, p, n), _F32))
    out_specs.append(sp["start"])
  out_shape.append(shape_like(x, (b, h, p, n), _F32))
  out_specs.append(sp["state"])
  flops = 2 * b * h * lp * (q * n + q * p + 2 * n * p)
  io_bytes = sum(a.size * a.dtype.itemsize for a in ins) + x.size * 4
  outs = _call(functools.partial(_forward_kernel, save_starts=save_starts), st, (b, h, lp // q), in_specs,
               out_specs, out_shape, (p, n), "ssd_fwd",
               pl.CostEstimate(flops=flops, transcendentals=b * h * lp * (q + 2), bytes_accessed=io_bytes))(*ins)
  return outs[0], outs[-1], *outs[1:-1]


def _forward_kernel(x_ref, dt_ref, cum_col_ref, cum_row_ref, B_ref, C_ref, h0_ref, y_ref, *refs, save_starts):
  *starts_ref, h_last_ref, s_scr = refs
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _():
    s_scr[...] = h0_ref[...]
  s = s_scr[...]  # [p, n], the state entering this chunk
  if save_starts:
    starts_ref[0][...] = s
  cum_col, cum_row = cum_col_ref[...], cum_row_ref[...]  # [q, 1], [1, q]
  x = x_ref[...]
  xdt = x.astype(_F32) * dt_ref[...]  # [q, p]
  Bm, Cm = B_ref[...], C_ref[...]  # [q, n]
  scores = lax.dot_general(Cm, Bm, _NT, preferred_element_type=_F32) * _decay(cum_col, cum_row)  # [q, q]
  y = lax.dot_general(scores.astype(x.dtype), xdt.astype(x.dtype), _NN, preferred_element_type=_F32)
  y_ref[...] = y + jnp.exp(cum_col) * lax.dot_general(Cm.astype(_F32), s, _NT, preferred_element_type=_F32)
  cum_end = cum_row[:, -1:]  # [1, 1]
  to_end = jnp.exp(cum_end - cum_col) * xdt  # [q, p]
  s = jnp.exp(cum_end) * s + lax.dot_general(to_end, Bm.astype(_F32), _TN, preferred_element_type=_F32)
  s_scr[...] = s

  @pl.when(c == pl.num_programs(2) - 1)
  def _():
    h_last_ref[...] = s


def _decay(cum_col, cum_row):
  """L[t, s] = exp(cum_t - cum_s) for s <= t, else 0: [q, q]."""
  q = cum_row.shape[1]
  causal = lax.broadcasted_iota(jnp.int32, (q, q), 0) >= lax.broadcasted_iota(jnp.int32, (q, q), 1)
  return jnp.exp(jnp.where(causal, cum_col - cum_row, -jnp.inf))


def _backward(st, res, dy, dh_last):
  x, dt, cum, B, C, starts = res
  b, h, lp, p = x.shape
  g, n = B.shape[1], B.shape[3]
  q = st.chunk
  sp = _specs(st, p, n, h // g, reverse=True)
  ins = [x, dt[..., None], cum[..., None], cum[:, :, None], B, C, starts, dy, dh_last]
  in_specs = [sp["seq"], sp["col"], sp["col"], sp["row"], sp["bc"], sp["bc"], sp["start"], sp["seq"],
              sp["state"]]
  out_shape = [shape_like(x, x.shape, x.dtype), shape_like(x, (b, h, lp, 1), _F32),
               shape_like(x, (b, h, lp, 1), _F32), shape_like(x, (b, h, 1, lp), _F32),
               shape_like(x, (b, h, lp, n), _F32), shape_like(x, (b, h, lp, n), _F32),
               shape_like(x, (b, h, p, n), _F32)]
  out_specs = [sp["seq"], sp["col"], sp["col"], sp["row"], sp["per_head"], sp["per_head"], sp["state"]]
  flops = 2 * b * h * lp * (3 * q * p + 2 * q * n + 6 * n * p)
  io_bytes = sum(a.size * a.dtype.itemsize for a in ins + out_shape)
  cost = pl.CostEstimate(flops=flops, transcendentals=b * h * lp * (q + 3), bytes_accessed=io_bytes)
  return _call(_backward_kernel, st, (b, h, lp // q), in_specs, out_specs, out_shape, (p, n), "ssd_bwd", cost)(*ins)


def _backward_kernel(x_ref, dt_ref, cum_col_ref, cum_row_ref, B_ref, C_ref, start_ref, dy_ref, dh_last_ref,
                     dx_ref, ddt_ref, dcum_col_ref, dcum_row_ref, dB_ref, dC_ref, dh0_ref, ds_scr):
  """Reverse-mode of one chunk of `_forward_kernel`; ds_scr carries dL/d(state leaving the chunk)."""
  step = pl.program_id(2)

  @pl.when(step == 0)
  def _():
    ds_scr[...] = dh_last_ref[...]
  cum_col, cum_row = cum_col_ref[...], cum_row_ref[...]
  dt_col = dt_ref[...]
  x = x_ref[...].astype(_F32)
  xdt = x * dt_col  # [q, p]
  Bm, Cm = B_ref[...].astype(_F32), C_ref[...].astype(_F32)  # [q, n]
  s, ds = start_ref[...], ds_scr[...]  # [p, n]: the state entering the chunk; dL/d(state leaving it)
  dy = dy_ref[...]  # [q, p]
  decay = _decay(cum_col, cum_row)
  cb = lax.dot_general(Cm, Bm, _NT, preferred_element_type=_F32)  # [q, q]
  into = jnp.exp(cum_col)  # [q, 1]: decay from the chunk start
  cum_end = cum_row[:, -1:]
  to_end = jnp.exp(cum_end - cum_col)  # [q, 1]: decay to the chunk end
  b_ds = lax.dot_general(Bm, ds, _NT, preferred_element_type=_F32)  # [q, p]

  dxdt = lax.dot_general(cb * decay, dy, _TN, preferred_element_type=_F32) + to_end * b_ds
  d_scores = lax.dot_general(dy, xdt, _NT, preferred_element_type=_F32) * decay  # dL/d(C B^T) masked
  d_seg = d_scores * cb  # dL/d(cum_t - cum_s)
  dy_s = lax.dot_general(dy, s, _NN, preferred_element_type=_F32)  # [q, n]
  dC_ref[...] = lax.dot_general(d_scores, Bm, _NN, preferred_element_type=_F32) + into * dy_s
  dB_ref[...] = (lax.dot_general(d_scores, Cm, _TN, preferred_element_type=_F32)
                 + lax.dot_general(to_end * xdt, ds, _NN, preferred_element_type=_F32))
  d_to_end = to_end * jnp.sum(xdt * b_ds, axis=1, keepdims=True)  # [q, 1]
  dcum_col_ref[...] = (jnp.sum(d_seg, axis=1, keepdims=True) + into * jnp.sum(Cm * dy_s, axis=1, keepdims=True)
                       - d_to_end)
  d_end = jnp.exp(cum_end) * jnp.sum(ds * s, keepdims=True) + jnp.sum(d_to_end, keepdims=True)  # [1, 1]
  last = lax.broadcasted_iota(jnp.int32, cum_row.shape, 1) == cum_row.shape[1] - 1
  dcum_row_ref[...] = jnp.where(last, d_end, 0.0) - jnp.sum(d_seg, axis=0, keepdims=True)
  dx_ref[...] = (dxdt * dt_col).astype(dx_ref.dtype)
  ddt_ref[...] = jnp.sum(dxdt * x, axis=1, keepdims=True)
  ds = jnp.exp(cum_end) * ds + lax.dot_general(into * dy, Cm, _TN, preferred_element_type=_F32)
  ds_scr[...] = ds

  @pl.when(step == pl.num_programs(2) - 1)
  def _():
    dh0_ref[...] = ds
