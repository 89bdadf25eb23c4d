"""Fused Mamba-1 selective scan for TPU in Pallas/Mosaic, forward and backward (Gu & Dao 2023, Sec. 3.3).

The hardware-aware scan of the Mamba paper (Sec. 3.3.2) mapped to a TPU core. The grid is (batch,
channel blocks, sequence chunks); the chunk axis is "arbitrary" (sequential), so the state of a block of
`block_d` channels, `[state, block_d]` float32 in VMEM scratch, carries from one chunk to the next and the
`[b, l, d, n]` states never reach HBM: HBM sees u, delta, z, B, C read once and y written once.

TPU layout. Channels lie on the 128 lanes and the state index on sublanes, so one step updates
`n * block_d / 1024` full vregs. u, delta, z, y keep their `[b, l, d]` layout (time on sublanes); B and C
come as `[b, groups, l, n]` float32 (small: n / d of u). The step loop runs over 8-row sub-chunks with a
static unroll of 8 steps: B and C rows are loaded as an aligned `[8, n]` tile and transposed to `[n, 8]`,
so each step reads its column by a static lane slice (Mosaic cannot slice lanes at a dynamic offset).
Softplus, dt * u, the D skip and the z gate are computed vectorised per chunk; only the recurrence is
sequential. Lengths are padded to the chunk; padded steps get dt = 0 (no decay, no input).

Backward (`jax.custom_vjp`). The forward saves the state at each chunk start (`[b, chunks, n, d]`, a
chunk's worth smaller than the states). The backward kernel walks the chunks in reverse (its index maps
read chunk `chunks - 1 - c`): it recomputes the chunk's states from the saved start into VMEM
(`[chunk + 1, n, block_d]`), then runs the adjoint recurrence backwards in time, carrying dL/dh across
chunks in VMEM scratch. Per-step dB and dC are sums over the channel block, written per block and summed
over blocks by XLA; dA, dD and d(delta_bias) accumulate in resident output blocks along the chunk axis.

Sizes: chunk 128 and block_d 256 by default. The backward's state history, (chunk + 1) * n * block_d * 4
bytes (2.1 MiB at n = 16), and its blocks fit the 16 MiB default scoped VMEM of a v5e (AOT-compiled; chunk
256 with block_d 512 does not). Untuned: no TPU was available to time other sizes.
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

_F32 = jnp.float32
_SUB = 8  # steps per statically unrolled sub-chunk: one sublane tile of B and C rows


@dataclasses.dataclass(frozen=True)
class _Static:
  """What the kernels specialise on (hashable: a `custom_vjp` non-differentiable argument)."""
  length: int  # before padding: later steps are masked to dt = 0
  chunk: int
  block_d: int
  blocks_per_group: int  # channel blocks reading the same B/C group
  softplus: bool
  has_z: bool
  interpret: Any


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                   initial_state=None, return_state=False, chunk=128, block_d=256, interpret=False):
  """Mamba-1 selective scan; same arguments and results as `lwjax.kernels.reference.selective_scan`.

  u, delta, z [batch, len, dim]; A [dim, state]; B, C [batch, len, state] or [batch, len, groups, state];
  D, delta_bias [dim]; initial_state [batch, dim, state]. `chunk` (time steps per grid step, a multiple of
  8) and `block_d` (channels per grid step, on TPU a multiple of 128 dividing dim // groups, or all of
  dim) size the VMEM blocks. `interpret`: False on TPU; True or `pltpu.InterpretParams()` on CPU.
  """
  b, seq_len, d = u.shape
  n = A.shape[1]
  if chunk % _SUB:
    raise ValueError(f"chunk ({chunk}) must be a multiple of {_SUB}")
  B_blgn, C_blgn = (x[:, :, None] if x.ndim == 3 else x for x in (B, C))
  g = B_blgn.shape[2]
  bd = pick_block(d // g, block_d)
  if g > 1 and bd % 128 and not interpret:
    raise ValueError(f"on TPU dim // groups ({d // g}) must be a multiple of 128 when groups > 1")
  t = min(chunk, round_up(seq_len, _SUB))
  st = _Static(length=seq_len, chunk=t, block_d=bd, blocks_per_group=d // g // bd, softplus=delta_softplus,
               has_z=z is not None, interpret=interpret)
  def seq(x):
    return pad_axis(x, 1, t)
  def bc(x):
    return seq(x.astype(_F32)).transpose(0, 2, 1, 3)  # [b, l, g, n] -> [b, g, l', n]
  def vec(x):
    return jnp.zeros((1, d), _F32) if x is None else x.astype(_F32).reshape(1, d)
  h0 = (jnp.zeros((b, n, d), _F32) if initial_state is None
        else jnp.swapaxes(initial_state.astype(_F32), 1, 2))
  y, h_last = _scan(st, seq(u), seq(delta), None if z is None else seq(z), bc(B_blgn), bc(C_blgn),
                    A.astype(_F32).T, vec(D), vec(delta_bias), h0)
  y = y[:, :seq_len]
  return (y, jnp.swapaxes(h_last, 1, 2)) if return_state else y


def round_up(n, multiple):
  return -(-n // multiple) * multiple


def pad_axis(x, axis, block):
  """Zero-pads `axis` of x up to a multiple of `block`."""
  pad = round_up(x.shape[axis], block) - x.shape[axis]
  return jnp.pad(x, [(0, pad if a == axis else 0) for a in range(x.ndim)]) if pad else x


def pick_block(size, cap):
  """The largest multiple of 128 up to `cap` dividing `size`; `size` itself when there is none."""
  for block in range(cap - cap % 128, 0, -128):
    if size % block == 0:
      return block
  return size


def shape_like(x, shape, dtype):
  """An output shape varying over the same `shard_map` mesh axes as `x` (required under check_vma)."""
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(x).manual_axis_type)


def softplus(x):
  """log(1 + e^x) in float32, with Mamba's threshold of 20 above which it is the identity."""
  return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def _chunk_dt(delta_ref, bias_ref, chunk_idx, st):
  """(dt, delta + bias), float32 [chunk, block_d]; steps past the true length get dt = 0."""
  raw = delta_ref[...].astype(_F32) + bias_ref[...]
  dt = softplus(raw) if st.softplus else raw
  return _mask_padding(dt, chunk_idx, st), raw


def _mask_padding(x, chunk_idx, st):
  """Zeroes the rows of a [chunk, block_d] tile that lie past the true length."""
  if st.length % st.chunk == 0:
    return x
  rows = lax.broadcasted_iota(jnp.int32, x.shape, 0) + chunk_idx * st.chunk
  return jnp.where(rows < st.length, x, 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(st, u, delta, z, B, C, A_nd, D, bias, h0):
  """(y [b, l', d], final state [b, n, d]) from padded inputs; B, C [b, g, l', n]; A_nd [n, d]."""
  return _forward(st, u, delta, z, B, C, A_nd, D, bias, h0, save_starts=False)


def _scan_fwd(st, u, delta, z, B, C, A_nd, D, bias, h0):
  y, h_last, starts = _forward(st, u, delta, z, B, C, A_nd, D, bias, h0, save_starts=True)
  return (y, h_last), (u, delta, z, B, C, A_nd, D, bias, h0, starts)


def _scan_bwd(st, res, cotangents):
  dy, dh_last = cotangents
  *primals, starts = res
  grads = _backward(st, (*primals[:-1], starts), dy, dh_last)
  b, g, lp, n = primals[3].shape
  def by_group(part):
    return part.reshape(b, g, st.blocks_per_group, lp, n).sum(2)  # sum channel blocks
  grads[3:8] = [by_group(grads[3]), by_group(grads[4]), grads[5].sum(0), grads[6].sum(0), grads[7].sum(0)]
  return tuple(ct if p is None else match_varying(ct, p) for ct, p in zip(grads, primals, strict=False))


def match_varying(ct, primal):
  """Sums a cotangent over the `shard_map` axes along which it varies but its primal does not (the
  gradient of a replicated input, such as A, is the sum over the shards)."""
  extra = jax.typeof(ct).manual_axis_type.varying - jax.typeof(primal).manual_axis_type.varying
  return lax.psum(ct, tuple(sorted(extra))) if extra else ct


_scan.defvjp(_scan_fwd, _scan_bwd)


def _specs(st, n, reverse):
  """BlockSpecs over the grid (batch, channel block, chunk step); `reverse` walks chunks last to first."""
  def chunk_of(c):
    return pl.num_programs(2) - 1 - c if reverse else c
  seq = pl.BlockSpec((None, st.chunk, st.block_d), lambda i, j, c: (i, chunk_of(c), j))  # [b, l, d]
  bc = pl.BlockSpec((None, None, st.chunk, n),  # [b, g, l, n]
                    lambda i, j, c: (i, lax.div(j, st.blocks_per_group), chunk_of(c), 0))
  per_block = pl.BlockSpec((None, None, st.chunk, n), lambda i, j, c: (i, j, chunk_of(c), 0))  # [b, d/bd, l, n]
  start = pl.BlockSpec((None, None, n, st.block_d), lambda i, j, c: (i, chunk_of(c), 0, j))  # [b, chunks, n, d]
  state = pl.BlockSpec((None, n, st.block_d), lambda i, j, c: (i, 0, j))  # [b, n, d], resident over chunks
  param = pl.BlockSpec((n, st.block_d), lambda i, j, c: (0, j))  # A [n, d]
  row = pl.BlockSpec((1, st.block_d), lambda i, j, c: (0, j))  # D, bias [1, d]
  batch_row = pl.BlockSpec((None, 1, st.block_d), lambda i, j, c: (i, 0, j))  # [b, 1, d]
  return dict(seq=seq, bc=bc, per_block=per_block, start=start, state=state, param=param, row=row,
              batch_row=batch_row)


def _call(kernel, st, grid, in_specs, out_specs, out_shape, scratch, name, cost):
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
      scratch_shapes=[pltpu.VMEM(shape, _F32) for shape in scratch],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=st.interpret, name=name, cost_estimate=cost)


def _forward(st, u, delta, z, B, C, A_nd, D, bias, h0, save_starts):
  b, lp, d = u.shape
  n, t, bd = A_nd.shape[0], st.chunk, st.block_d
  sp = _specs(st, n, reverse=False)
  ins = [u, delta] + ([z] if st.has_z else []) + [B, C, A_nd, D, bias, h0]
  in_specs = [sp["seq"]] * (2 + st.has_z) + [sp["bc"], sp["bc"], sp["param"], sp["row"], sp["row"], sp["state"]]
  out_shape = [shape_like(u, (b, lp, d), u.dtype), shape_like(u, (b, n, d), _F32)]
  out_specs = [sp["seq"], sp["state"]]
  if save_starts:
    out_shape.append(shape_like(u, (b, lp // t, n, d), _F32))
    out_specs.append(sp["start"])
  io_bytes = sum(x.size * x.dtype.itemsize for x in ins) + u.size * u.dtype.itemsize
  cost = pl.CostEstimate(flops=7 * b * lp * d * n, transcendentals=b * lp * d * (n + 2), bytes_accessed=io_bytes)
  return _call(functools.partial(_forward_kernel, st=st, save_starts=save_starts), st, (b, d // bd, lp // t),
               in_specs, out_specs, out_shape, [(n, bd), (t, bd), (t, bd), (t, bd)],
               "selective_scan_fwd", cost)(*ins)


def _forward_kernel(*refs, st, save_starts):
  u_ref, delta_ref, *refs = refs
  z_ref = refs.pop(0) if st.has_z else None
  B_ref, C_ref, A_ref, D_ref, bias_ref, h0_ref, y_ref, h_last_ref, *refs = refs
  starts_ref = refs.pop(0) if save_starts else None
  h_scr, dt_scr, x_scr, y_scr = refs  # [n, bd], then [chunk, bd] each
  c = pl.program_id(2)

  @pl.when(c == 0)
  def _():
    h_scr[...] = h0_ref[...]
  if save_starts:
    starts_ref[...] = h_scr[...]
  u = u_ref[...].astype(_F32)
  dt, _ = _chunk_dt(delta_ref, bias_ref, c, st)
  dt_scr[...] = dt
  x_scr[...] = dt * u
  A = A_ref[...]

  def sub_chunk(s, h):
    r = pl.multiple_of(s * _SUB, _SUB)
    dt8, x8 = dt_scr[pl.ds(r, _SUB), :], x_scr[pl.ds(r, _SUB), :]
    B8, C8 = B_ref[pl.ds(r, _SUB), :].T, C_ref[pl.ds(r, _SUB), :].T  # [n, 8]: step j in lane j
    for j in range(_SUB):
      h = jnp.exp(dt8[j:j + 1] * A) * h + B8[:, j:j + 1] * x8[j:j + 1]
      y_scr[pl.ds(r + j, 1), :] = jnp.sum(C8[:, j:j + 1] * h, axis=0, keepdims=True)
    return h
  h = lax.fori_loop(0, st.chunk // _SUB, sub_chunk, h_scr[...])
  h_scr[...] = h
  y = y_scr[...] + D_ref[...] * u
  if st.has_z:
    y = y * jax.nn.silu(z_ref[...].astype(_F32))
  y_ref[...] = y.astype(y_ref.dtype)

  @pl.when(c == pl.num_programs(2) - 1)
  def _():
    h_last_ref[...] = h


def _backward(st, res, dy, dh_last):
  u, delta, z, B, C, A_nd, D, bias, starts = res
  b, lp, d = u.shape
  n, t, bd = A_nd.shape[0], st.chunk, st.block_d
  nd = d // bd
  sp = _specs(st, n, reverse=True)
  ins = [u, delta] + ([z] if st.has_z else []) + [dy, B, C, A_nd, D, bias, starts, dh_last]
  in_specs = ([sp["seq"]] * (3 + st.has_z)
              + [sp["bc"], sp["bc"], sp["param"], sp["row"], sp["row"], sp["start"], sp["state"]])
  seq_grads = [u, delta] + ([z] if st.has_z else [])
  out_shape = ([shape_like(u, x.shape, x.dtype) for x in seq_grads]
               + [shape_like(u, (b, nd, lp, n), _F32)] * 2 + [shape_like(u, (b, n, d), _F32)]
               + [shape_like(u, (b, 1, d), _F32)] * 2 + [shape_like(u, (b, n, d), _F32)])
  out_specs = ([sp["seq"]] * len(seq_grads) + [sp["per_block"]] * 2 + [sp["state"]]
               + [sp["batch_row"]] * 2 + [sp["state"]])
  io_bytes = sum(x.size * x.dtype.itemsize for x in ins + out_shape)
  cost = pl.CostEstimate(flops=20 * b * lp * d * n, transcendentals=2 * b * lp * d * (n + 2),
                         bytes_accessed=io_bytes)
  outs = _call(functools.partial(_backward_kernel, st=st), st, (b, nd, lp // t), in_specs, out_specs,
               out_shape, [(n, bd), (t + 1, n, bd)] + [(t, bd)] * 6, "selective_scan_bwd", cost)(*ins)
  outs = list(outs)
  return outs if st.has_z else outs[:2] + [None] + outs[2:]


def _backward_kernel(*refs, st):
  u_ref, delta_ref, *refs = refs
  z_ref = refs.pop(0) if st.has_z else None
  dout_ref, B_ref, C_ref, A_ref, D_ref, bias_ref, start_ref, dh_last_ref, du_ref, ddelta_ref, *refs = refs
  dz_ref = refs.pop(0) if st.has_z else None
  (dB_ref, dC_ref, dA_ref, dD_ref, dbias_ref, dh0_ref,
   g_scr, hs_scr, dt_scr, x_scr, dy_scr, y_scr, dx_scr, ddt_scr) = refs
  step = pl.program_id(2)
  c = pl.num_programs(2) - 1 - step
  n = A_ref.shape[0]

  @pl.when(step == 0)
  def _():
    g_scr[...] = dh_last_ref[...]
    dA_ref[...] = jnp.zeros_like(dA_ref)
    dD_ref[...] = jnp.zeros_like(dD_ref)
    dbias_ref[...] = jnp.zeros_like(dbias_ref)
  u = u_ref[...].astype(_F32)
  dt, raw = _chunk_dt(delta_ref, bias_ref, c, st)
  dt_scr[...] = dt
  x_scr[...] = dt * u
  A = A_ref[...]
  hs_scr[0] = start_ref[...]

  def recompute(s, h):  # states h_1..h_chunk of this chunk into hs_scr[1:], and y when z needs it
    r = pl.multiple_of(s * _SUB, _SUB)
    dt8, x8 = dt_scr[pl.ds(r, _SUB), :], x_scr[pl.ds(r, _SUB), :]
    B8, C8 = B_ref[pl.ds(r, _SUB), :].T, C_ref[pl.ds(r, _SUB), :].T
    for j in range(_SUB):
      h = jnp.exp(dt8[j:j + 1] * A) * h + B8[:, j:j + 1] * x8[j:j + 1]
      hs_scr[r + j + 1] = h
      if st.has_z:
        y_scr[pl.ds(r + j, 1), :] = jnp.sum(C8[:, j:j + 1] * h, axis=0, keepdims=True)
    return h
  lax.fori_loop(0, st.chunk // _SUB, recompute, start_ref[...])

  dout = dout_ref[...].astype(_F32)
  if st.has_z:
    zf = z_ref[...].astype(_F32)
    gate = jax.nn.sigmoid(zf)
    y = y_scr[...] + D_ref[...] * u
    dz_ref[...] = (dout * y * gate * (1.0 + zf * (1.0 - gate))).astype(dz_ref.dtype)
    dout = dout * zf * gate
  dy_scr[...] = dout  # dL/dy before the gate: the cotangent of C . h + D u

  def reverse(s, carry):  # adjoint recurrence: g_t = dL/dh_t, g_{t-1} = exp(dt_t A) g_t + ...
    g, dA_acc = carry
    r = pl.multiple_of((st.chunk // _SUB - 1 - s) * _SUB, _SUB)
    dt8, x8, dy8 = dt_scr[pl.ds(r, _SUB), :], x_scr[pl.ds(r, _SUB), :], dy_scr[pl.ds(r, _SUB), :]
    B8, C8 = B_ref[pl.ds(r, _SUB), :].T, C_ref[pl.ds(r, _SUB), :].T
    lane = lax.broadcasted_iota(jnp.int32, (n, _SUB), 1)
    dB8 = dC8 = jnp.zeros((n, _SUB), _F32)
    for j in reversed(range(_SUB)):
      g = g + C8[:, j:j + 1] * dy8[j:j + 1]
      dC8 = jnp.where(lane == j, jnp.sum(hs_scr[r + j + 1] * dy8[j:j + 1], axis=1, keepdims=True), dC8)
      dB8 = jnp.where(lane == j, jnp.sum(g * x8[j:j + 1], axis=1, keepdims=True), dB8)
      dx_scr[pl.ds(r + j, 1), :] = jnp.sum(g * B8[:, j:j + 1], axis=0, keepdims=True)
      decay = jnp.exp(dt8[j:j + 1] * A)
      q = g * decay * hs_scr[r + j]  # dL/d(exp(dt A)) * exp(dt A)
      dA_acc = dA_acc + q * dt8[j:j + 1]
      ddt_scr[pl.ds(r + j, 1), :] = jnp.sum(q * A, axis=0, keepdims=True)
      g = g * decay
    dB_ref[pl.ds(r, _SUB), :] = dB8.T
    dC_ref[pl.ds(r, _SUB), :] = dC8.T
    return g, dA_acc
  g, dA_acc = lax.fori_loop(0, st.chunk // _SUB, reverse, (g_scr[...], jnp.zeros_like(A)))
  g_scr[...] = g
  dA_ref[...] += dA_acc

  dx = dx_scr[...]  # dL/d(dt * u)
  ddt = ddt_scr[...] + dx * u
  if st.softplus:
    ddt = ddt * jax.nn.sigmoid(raw)
  ddt = _mask_padding(ddt, c, st)
  du_ref[...] = (dx * dt + dout * D_ref[...]).astype(du_ref.dtype)
  ddelta_ref[...] = ddt.astype(ddelta_ref.dtype)
  dD_ref[...] += jnp.sum(dout * u, axis=0, keepdims=True)
  dbias_ref[...] += jnp.sum(ddt, axis=0, keepdims=True)

  @pl.when(step == pl.num_programs(2) - 1)
  def _():
    dh0_ref[...] = g
