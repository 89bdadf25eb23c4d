"""Chunked Mamba-2 SSD for GPU in Pallas/Triton, forward and backward (Dao & Gu 2024, Sec. 6, Listing 1).

The algorithm of the TPU kernel (`ssd.py`) written the GPU way: GPU programs run in parallel, so the state
cannot carry from one grid step to the next; one program per (batch, head) walks the chunks in an in-kernel
`fori_loop`, carrying that head's `[headdim, state]` float32 state in registers. Per chunk of `chunk`
steps: the quadratic form `y = (C B^T * L) (dt x)` with `L[t, s] = exp(cum_t - cum_s)` for `s <= t` as two
`[chunk, chunk]`-tile matmuls (tensor cores), plus the carried state's contribution `exp(cum_t) C_t h`;
then the state leaves the chunk as `exp(cum_end) h + (exp(cum_end - cum) dt x)^T B`. HBM sees x, B, C read
once and y written once; the per-chunk states never leave the program. Arrays stay `[b, l, heads, ...]`
(Triton addresses the strided rows of one head); a head reads its B/C group through the index map.

As on TPU, the softplus, the in-chunk cumsum of dt * A (`cum`), the D skip and the z gate are done by XLA
around the kernels (and XLA differentiates them). Every matmul takes its operands in the inputs' dtype
(bf16 on the tensor cores: the fp32 state and gradients are rounded as operands, never as carries; fp32
inputs multiply in full fp32), always with fp32 accumulation.

Backward (`jax.custom_vjp`), fused too: the forward also writes the state entering each chunk (`[b, heads,
chunks, headdim, state]` fp32); a second kernel, again one program per (batch, head), walks the chunks last
to first carrying dL/dh, and forms the chunk's dx, dt, d cum, dB, dC with matmuls (the TPU backward's
algebra). XLA sums dB, dC over the heads of a group.

Triton tensors have power-of-two sizes of at least 16 in a dot: `chunk_size` must be such a power of two
(capped at the length rounded up to one); headdim and state are zero-padded to one, and the length to a
multiple of the chunk with dt = 0 (no input, no decay). num_warps 4 (8 for 128-sized tiles), 2 stages:
untuned guesses for H100/H200, not compiled to PTX here (no GPU).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from lwjax.kernels.pallas.selective_scan import match_varying, pad_axis, shape_like, softplus

_F32 = jnp.float32
_NN = (((1,), (0,)), ((), ()))  # dot_general dimension numbers: a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b^T
_TN = (((0,), (0,)), ((), ()))  # a^T @ b


@dataclasses.dataclass(frozen=True)
class _Static:
  """What the kernels specialise on (hashable: a `custom_vjp` non-differentiable argument)."""
  chunk: int
  num_warps: int
  interpret: bool


def ssd(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True, initial_state=None,
        return_state=False, chunk_size=128, num_warps=None, interpret=False):
  """Mamba-2 SSD; same arguments and results as `lwjax.kernels.reference.ssd` (chunked form).

  x, z [batch, len, heads, headdim]; dt [batch, len, heads]; A, D, dt_bias [heads]; B, C [batch, len,
  groups, state]; initial_state [batch, heads, headdim, state]. `chunk_size`: a power of two >= 16.
  `num_warps`: None picks 4, or 8 when a tile is 128 wide. `interpret`: False on GPU, True on CPU.
  """
  b, seq_len, h, p = x.shape
  g, n = B.shape[2], B.shape[3]
  if h % g:
    raise ValueError(f"heads ({h}) must be a multiple of groups ({g})")
  if chunk_size < 16 or chunk_size & (chunk_size - 1):
    raise ValueError(f"chunk_size must be a power of two >= 16 (Triton dot tiles), got {chunk_size}")
  q = min(chunk_size, _pow2_at_least(seq_len))
  pp, pn = _pow2_at_least(p), _pow2_at_least(n)
  if num_warps is None:
    num_warps = 8 if max(q, pp, pn) >= 128 else 4
  st = _Static(chunk=q, num_warps=num_warps, interpret=interpret)

  dt = dt.astype(_F32) + (0.0 if dt_bias is None else dt_bias.astype(_F32))
  dt = pad_axis(softplus(dt) if dt_softplus else dt, 1, q)  # [b, l', h]
  lp = dt.shape[1]
  cum = jnp.cumsum((dt * A.astype(_F32)).reshape(b, lp // q, q, h), axis=2).reshape(b, lp, h)
  def pad(a, size):
    return jnp.pad(a, [(0, 0), (0, lp - seq_len), (0, 0), (0, size - a.shape[3])])
  h0 = (jnp.zeros((b, h, pp, pn), _F32) if initial_state is None
        else jnp.pad(initial_state.astype(_F32), [(0, 0), (0, 0), (0, pp - p), (0, pn - n)]))
  y, h_last = _core(st, pad(x, pp), dt, cum, pad(B, pn), pad(C, pn), h0)
  y = y[:, :seq_len, :, :p]  # float32
  if D is not None:
    y = y + D.astype(_F32)[:, None] * x.astype(_F32)
  if z is not None:
    y = y * jax.nn.silu(z.astype(_F32))
  y = y.astype(x.dtype)
  return (y, h_last[:, :, :p, :n]) if return_state else y


def _pow2_at_least(n):
  return max(16, pl.next_power_of_2(n))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(st, x, dt, cum, B, C, h0):
  """(y [b, l', h, p] float32, final state [b, h, p, n]) from x [b, l', h, p], dt, cum [b, l', h],
  B, C [b, l', g, n], h0 [b, h, p, n]."""
  return _forward(st, x, dt, cum, B, C, h0, save_starts=False)[:2]


def _core_fwd(st, x, dt, cum, B, C, h0):
  y, h_last, starts = _forward(st, x, dt, cum, B, C, h0, save_starts=True)
  return (y, h_last), (x, dt, cum, B, C, h0, starts)


def _core_bwd(st, res, cotangents):
  *primals, starts = res
  x, _, _, B, _, _ = primals
  b, lp, h, _ = x.shape
  g, n = B.shape[2], B.shape[3]
  dx, ddt, dcum, dB, dC, dh0 = _backward(st, *primals[:-1], starts, *cotangents)
  def by_group(per_head):
    return per_head.reshape(b, lp, g, h // g, n).sum(3)
  grads = (dx, ddt, dcum, by_group(dB), by_group(dC), dh0)
  return tuple(match_varying(ct.astype(p.dtype), p) for ct, p in zip(grads, primals, strict=False))


_core.defvjp(_core_fwd, _core_bwd)


def _specs(x, B, chunks):
  """BlockSpecs over the grid (batch, head): whole-sequence blocks of one head, chunk rows read in-kernel."""
  lp, h, p = x.shape[1:]
  g, n = B.shape[2], B.shape[3]
  return dict(
      seq=pl.BlockSpec((None, lp, None, p), lambda i, k: (i, 0, k, 0)),  # [b, l', h, p]
      vec=pl.BlockSpec((None, lp, None), lambda i, k: (i, 0, k)),  # [b, l', h]
      bc=pl.BlockSpec((None, lp, None, n), lambda i, k: (i, 0, lax.div(k, h // g), 0)),  # [b, l', g, n]
      per_head=pl.BlockSpec((None, lp, None, n), lambda i, k: (i, 0, k, 0)),  # [b, l', h, n]
      state=pl.BlockSpec((None, None, p, n), lambda i, k: (i, k, 0, 0)),  # [b, h, p, n]
      starts=pl.BlockSpec((None, None, chunks, p, n), lambda i, k: (i, k, 0, 0, 0)))  # [b, h, c, p, n]


def _call(kernel, st, x, in_specs, out_specs, out_shape, name):
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=(x.shape[0], x.shape[2]), in_specs=in_specs, out_specs=out_specs,
      compiler_params=pltriton.CompilerParams(num_warps=st.num_warps, num_stages=2),
      interpret=st.interpret, name=name)


def _matmul(a, b, dims, dtype):
  """dot_general of a and b cast to `dtype`, accumulated in fp32 (fp32 operands multiply in fp32)."""
  precision = lax.Precision.HIGHEST if dtype == _F32 else None
  return lax.dot_general(a.astype(dtype), b.astype(dtype), dims, precision=precision,
                         preferred_element_type=_F32)


def _decay(cum):
  """L[t, s] = exp(cum_t - cum_s) for s <= t, else 0: [q, q] from cum [q]."""
  q = cum.shape[0]
  causal = lax.broadcasted_iota(jnp.int32, (q, q), 0) >= lax.broadcasted_iota(jnp.int32, (q, q), 1)
  return jnp.exp(jnp.where(causal, cum[:, None] - cum[None, :], -jnp.inf))


def _chunk(x_ref, dt_ref, cum_ref, B_ref, C_ref, c, q):
  """Chunk c's rows: x [q, p] (input dtype), dt, cum [q] and the log decay to the chunk end (a scalar,
  read from the ref: Triton cannot index a tensor), B, C [q, n]."""
  rows = pl.ds(c * q, q)
  return (rows, x_ref[rows, :], dt_ref[rows], cum_ref[rows], cum_ref[c * q + q - 1], B_ref[rows, :],
          C_ref[rows, :])


def _forward(st, x, dt, cum, B, C, h0, save_starts):
  b, lp, h, p = x.shape
  n = B.shape[3]
  chunks = lp // st.chunk
  sp = _specs(x, B, chunks)
  in_specs = [sp["seq"], sp["vec"], sp["vec"], sp["bc"], sp["bc"], sp["state"]]
  out_shape = [shape_like(x, x.shape, _F32), shape_like(x, (b, h, p, n), _F32)]
  out_specs = [sp["seq"], sp["state"]]
  if save_starts:
    out_shape.append(shape_like(x, (b, h, chunks, p, n), _F32))
    out_specs.append(sp["starts"])
  outs = _call(functools.partial(_forward_kernel, st=st, chunks=chunks, save_starts=save_starts), st, x,
               in_specs, out_specs, out_shape, "ssd_fwd")(x, dt, cum, B, C, h0)
  return outs if save_starts else (*outs, None)


def _forward_kernel(x_ref, dt_ref, cum_ref, B_ref, C_ref, h0_ref, y_ref, h_last_ref, *starts_ref, st, chunks,
                    save_starts):
  q, mm = st.chunk, x_ref.dtype

  def chunk(c, s):  # s [p, n]: the state entering chunk c
    if save_starts:
      starts_ref[0][c] = s
    rows, x, dt, cum, cum_end, Bm, Cm = _chunk(x_ref, dt_ref, cum_ref, B_ref, C_ref, c, q)
    xdt = x.astype(_F32) * dt[:, None]  # [q, p]
    scores = _matmul(Cm, Bm, _NT, mm) * _decay(cum)  # [q, q]
    y_ref[rows, :] = (_matmul(scores, xdt, _NN, mm)
                      + jnp.exp(cum)[:, None] * _matmul(Cm, s, _NT, mm))
    to_end = jnp.exp(cum_end - cum)[:, None] * xdt
    return jnp.exp(cum_end) * s + _matmul(to_end, Bm, _TN, mm)

  h_last_ref[...] = lax.fori_loop(0, chunks, chunk, h0_ref[...])


def _backward(st, x, dt, cum, B, C, starts, dy, dh_last):
  b, lp, h, p = x.shape
  n = B.shape[3]
  chunks = lp // st.chunk
  sp = _specs(x, B, chunks)
  in_specs = [sp["seq"], sp["vec"], sp["vec"], sp["bc"], sp["bc"], sp["starts"], sp["seq"], sp["state"]]
  out_shape = [shape_like(x, x.shape, x.dtype), shape_like(x, dt.shape, _F32), shape_like(x, dt.shape, _F32),
               shape_like(x, (b, lp, h, n), _F32), shape_like(x, (b, lp, h, n), _F32),
               shape_like(x, (b, h, p, n), _F32)]
  out_specs = [sp["seq"], sp["vec"], sp["vec"], sp["per_head"], sp["per_head"], sp["state"]]
  return _call(functools.partial(_backward_kernel, st=st, chunks=chunks), st, x, in_specs, out_specs,
               out_shape, "ssd_bwd")(x, dt, cum, B, C, starts, dy, dh_last)


def _backward_kernel(x_ref, dt_ref, cum_ref, B_ref, C_ref, starts_ref, dy_ref, dh_last_ref, dx_ref, ddt_ref,
                     dcum_ref, dB_ref, dC_ref, dh0_ref, *, st, chunks):
  """Reverse-mode of `_forward_kernel`, chunk by chunk from the last; the carry is dL/d(state leaving it)."""
  q, mm = st.chunk, x_ref.dtype

  def chunk(i, ds):
    c = chunks - 1 - i
    rows, x, dt, cum, cum_end, Bm, Cm = _chunk(x_ref, dt_ref, cum_ref, B_ref, C_ref, c, q)
    x = x.astype(_F32)
    xdt = x * dt[:, None]  # [q, p]
    s, dy = starts_ref[c], dy_ref[rows, :]  # [p, n] the state entering the chunk; [q, p]
    decay = _decay(cum)
    cb = _matmul(Cm, Bm, _NT, mm)  # [q, q]
    into = jnp.exp(cum)[:, None]  # [q, 1]: decay from the chunk start
    to_end = jnp.exp(cum_end - cum)[:, None]  # [q, 1]: decay to the chunk end
    b_ds = _matmul(Bm, ds, _NT, mm)  # [q, p]

    dxdt = _matmul(cb * decay, dy, _TN, mm) + to_end * b_ds
    d_scores = _matmul(dy, xdt, _NT, mm) * decay  # dL/d(C B^T), masked
    d_seg = d_scores * cb  # dL/d(cum_t - cum_s)
    dy_s = _matmul(dy, s, _NN, mm)  # [q, n]
    dC_ref[rows, :] = _matmul(d_scores, Bm, _NN, mm) + into * dy_s
    dB_ref[rows, :] = _matmul(d_scores, Cm, _TN, mm) + _matmul(to_end * xdt, ds, _NN, mm)
    d_to_end = to_end[:, 0] * jnp.sum(xdt * b_ds, axis=1)  # [q]
    d_end = jnp.exp(cum_end) * jnp.sum(jnp.sum(ds * s, axis=1)) + jnp.sum(d_to_end)
    last = lax.broadcasted_iota(jnp.int32, (q,), 0) == q - 1
    dcum_ref[rows] = (jnp.sum(d_seg, axis=1) - jnp.sum(d_seg, axis=0) + into[:, 0] * jnp.sum(Cm * dy_s, axis=1)
                      - d_to_end + jnp.where(last, d_end, 0.0))
    dx_ref[rows, :] = (dxdt * dt[:, None]).astype(dx_ref.dtype)
    ddt_ref[rows] = jnp.sum(dxdt * x, axis=1)
    return jnp.exp(cum_end) * ds + _matmul(into * dy, Cm, _TN, mm)

  dh0_ref[...] = lax.fori_loop(0, chunks, chunk, dh_last_ref[...])
