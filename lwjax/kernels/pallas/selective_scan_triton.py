"""Fused Mamba-1 selective scan for GPU in Pallas/Triton, forward and backward (Gu & Dao 2023, Sec. 3.3.2).

The hardware-aware scan of the Mamba paper on a GPU, as in the mamba_ssm CUDA kernel: the `[b, l, d, n]`
states never reach HBM; u, delta, z, B and C are read once and y is written once. One program per (batch,
block of `block_d` channels) keeps that block's state `[block_d, n]` in float32 registers and walks the
whole sequence. GPU programs run in parallel, so the state cannot carry from one grid step to the next as
on TPU: the walk is an in-kernel loop over chunks of `chunk` steps, each chunk statically unrolled. A step
reads its rows at a dynamic offset of the whole-sequence block (`[block_d]` of u, delta, z; `[n]` of the
channel block's B and C group); unrolling lets those loads be issued ahead of the serial recurrence.
Softplus, the D skip and the z gate are fused per step. A ragged last chunk rereads the last row with
dt = 0 (no decay, no input) and its stores are masked off, so inputs are never padded along the sequence.

Backward (`jax.custom_vjp`). The forward also writes the state at each chunk start (`[b, chunks, d, n]`
float32: 1/chunk of the states). The backward kernel walks the chunks last to first: it recomputes the
chunk's states from its saved start, keeping all `chunk + 1` of them in registers (the chunk is unrolled),
then runs the adjoint recurrence backwards in time, carrying dL/dh across chunks. Per-step dB and dC are
sums over the channel block, written per block (`[b, l, d / block_d, n]`) and summed over the group's
blocks by XLA; dA, dD and d(delta_bias) accumulate in registers over the sequence, summed over the batch
by XLA.

Triton tensors have power-of-two sizes: `block_d` becomes the largest power of two up to it dividing
dim // groups, and the state size is zero-padded to a power of two (A = B = C = 0 there, so those entries
stay zero). Defaults: chunk 16 and block_d 32 with 4 warps, one pipeline stage (the unrolled chunk is the
prefetch); in the backward the chunk's 17 states of [32, 16] take ~68 registers a thread. A guess for
H100/H200-class GPUs, untuned and never compiled to PTX here: no GPU was available.
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


@dataclasses.dataclass(frozen=True)
class _Static:
  """What the kernels specialise on (hashable: a `custom_vjp` non-differentiable argument)."""
  length: int
  chunk: int
  block_d: int
  blocks_per_group: int  # channel blocks reading the same B/C group
  softplus: bool
  has_z: bool
  num_warps: int
  interpret: bool

  @property
  def chunks(self):
    return -(-self.length // self.chunk)

  @property
  def ragged(self):
    return self.length % self.chunk != 0


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                   initial_state=None, return_state=False, chunk=16, block_d=32, num_warps=4,
                   interpret=False):
  """Mamba-1 selective scan; same arguments and results as `lwjax.kernels.reference.selective_scan`.

  u, delta, z [batch, len, dim]; A [dim, state]; B, C [batch, len, state] or [batch, len, groups, state];
  D, delta_bias [dim]; initial_state [batch, dim, state]. `chunk`: steps unrolled per loop iteration, and
  the spacing of the states saved for the backward. `block_d`: channels per program (rounded down to a
  power of two dividing dim // groups). `interpret`: False on GPU, True on CPU.
  """
  b, seq_len, d = u.shape
  n = A.shape[1]
  B, C, bd, blocks_per_group = grouped_blocks(B, C, d, block_d)
  st = _Static(length=seq_len, chunk=max(1, min(chunk, seq_len)), block_d=bd, blocks_per_group=blocks_per_group,
               softplus=delta_softplus, has_z=z is not None, num_warps=num_warps, interpret=interpret)
  def vec(x):
    return jnp.zeros((d,), _F32) if x is None else x.astype(_F32)
  h0 = (jnp.zeros((b, d, pl.next_power_of_2(n)), _F32) if initial_state is None
        else pad_state(initial_state.astype(_F32)))
  y, h_last = _scan(st, u, delta, z, pad_state(B), pad_state(C), pad_state(A.astype(_F32)), vec(D),
                    vec(delta_bias), h0)
  return (y, h_last[..., :n]) if return_state else y


def grouped_blocks(B, C, dim, block_d):
  """(B, C as [batch, len, groups, state], the channel block, blocks per group). The block is the largest
  power of two up to `block_d` dividing dim // groups (Triton blocks are powers of two)."""
  B, C = (x[:, :, None] if x.ndim == 3 else x for x in (B, C))
  groups = B.shape[2]
  if dim % groups:
    raise ValueError(f"dim ({dim}) must be a multiple of groups ({groups})")
  block = 1
  while block * 2 <= block_d and dim // groups % (block * 2) == 0:
    block *= 2
  return B, C, block, dim // groups // block


def pad_state(x):
  """Zero-pads the last (state) axis to a power of two."""
  return pad_axis(x, x.ndim - 1, pl.next_power_of_2(x.shape[-1]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(st, u, delta, z, B, C, A, D, bias, h0):
  """(y [b, l, d], final state [b, d, n]); B, C [b, l, g, n]; A [d, n]; D, bias [d]; h0 [b, d, n]."""
  return _forward(st, u, delta, z, B, C, A, D, bias, h0, save_starts=False)[:2]


def _scan_fwd(st, u, delta, z, B, C, A, D, bias, h0):
  y, h_last, starts = _forward(st, u, delta, z, B, C, A, D, bias, h0, save_starts=True)
  return (y, h_last), (u, delta, z, B, C, A, D, bias, h0, starts)


def _scan_bwd(st, res, cotangents):
  dy, dh_last = cotangents
  *primals, starts = res
  du, ddelta, dz, dB, dC, dA, dD, dbias, dh0 = _backward(st, *primals[:-1], starts, dy, dh_last)
  b, seq_len, g, n = primals[3].shape
  def by_group(part, like):
    return part.reshape(b, seq_len, g, st.blocks_per_group, n).sum(3).astype(like.dtype)
  grads = (du, ddelta, dz, by_group(dB, primals[3]), by_group(dC, primals[4]), dA.sum(0), dD.sum(0),
           dbias.sum(0), dh0)
  return tuple(ct if p is None else match_varying(ct, p) for ct, p in zip(grads, primals, strict=False))


_scan.defvjp(_scan_fwd, _scan_bwd)


def _specs(st, n):
  """BlockSpecs over the grid (batch, channel block): whole-sequence blocks, rows read in the kernels."""
  return dict(
      seq=pl.BlockSpec((None, st.length, st.block_d), lambda i, j: (i, 0, j)),  # [b, l, d]
      bc=pl.BlockSpec((None, st.length, None, n),  # [b, l, g, n]: the block's group
                      lambda i, j: (i, 0, lax.div(j, st.blocks_per_group), 0)),
      per_block=pl.BlockSpec((None, st.length, None, n), lambda i, j: (i, 0, j, 0)),  # [b, l, d / bd, n]
      starts=pl.BlockSpec((None, st.chunks, st.block_d, n), lambda i, j: (i, 0, j, 0)),  # [b, chunks, d, n]
      state=pl.BlockSpec((None, st.block_d, n), lambda i, j: (i, j, 0)),  # [b, d, n]
      param=pl.BlockSpec((st.block_d, n), lambda i, j: (j, 0)),  # A [d, n]
      row=pl.BlockSpec((st.block_d,), lambda i, j: (j,)),  # D, bias [d]
      batch_row=pl.BlockSpec((None, st.block_d), lambda i, j: (i, j)),  # [b, d]
  )


def _call(kernel, st, grid, in_specs, out_specs, out_shape, name):
  return pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, in_specs=in_specs, out_specs=out_specs,
      compiler_params=pltriton.CompilerParams(num_warps=st.num_warps, num_stages=1),
      interpret=st.interpret, name=name)


def _step(u_ref, delta_ref, B_ref, C_ref, bias, t, st):
  """Step t's row index and float32 (u, delta + bias, dt, B, C) rows. Past the length (a ragged last
  chunk) the last row is read again with dt = 0, which leaves the state as it is."""
  r = jnp.minimum(t, st.length - 1) if st.ragged else t
  u = u_ref[r].astype(_F32)
  raw = delta_ref[r].astype(_F32) + bias
  dt = softplus(raw) if st.softplus else raw
  if st.ragged:
    dt = jnp.where(t < st.length, dt, 0.0)
  return r, u, raw, dt, B_ref[r].astype(_F32), C_ref[r].astype(_F32)


def _store_row(ref, r, value, t, st):
  """ref[r] = value, skipped for steps past the length."""
  value = value.astype(ref.dtype)
  if st.ragged:
    pltriton.store(ref.at[r], value, mask=jnp.full(value.shape, t < st.length))
  else:
    ref[r] = value


def _forward(st, u, delta, z, B, C, A, D, bias, h0, save_starts):
  b, seq_len, d = u.shape
  n = A.shape[1]
  sp = _specs(st, n)
  ins = [u, delta] + ([z] if st.has_z else []) + [B, C, A, D, bias, h0]
  in_specs = [sp["seq"]] * (2 + st.has_z) + [sp["bc"], sp["bc"], sp["param"], sp["row"], sp["row"], sp["state"]]
  out_shape = [shape_like(u, u.shape, u.dtype), shape_like(u, (b, d, n), _F32)]
  out_specs = [sp["seq"], sp["state"]]
  if save_starts:
    out_shape.append(shape_like(u, (b, st.chunks, d, n), _F32))
    out_specs.append(sp["starts"])
  outs = _call(functools.partial(_forward_kernel, st=st, save_starts=save_starts), st, (b, d // st.block_d),
               in_specs, out_specs, out_shape, "selective_scan_fwd")(*ins)
  return outs if save_starts else (*outs, None)


def _forward_kernel(*refs, st, save_starts):
  u_ref, delta_ref, *refs = refs
  z_ref = refs.pop(0) if st.has_z else None
  B_ref, C_ref, A_ref, D_ref, bias_ref, h0_ref, y_ref, h_last_ref, *refs = refs
  A, D, bias = A_ref[...], D_ref[...], bias_ref[...]  # [bd, n], [bd], [bd]

  def chunk(c, h):
    if save_starts:
      refs[0][c] = h
    for j in range(st.chunk):
      t = c * st.chunk + j
      r, u, _, dt, B, C = _step(u_ref, delta_ref, B_ref, C_ref, bias, t, st)
      h = jnp.exp(dt[:, None] * A) * h + (dt * u)[:, None] * B[None, :]
      y = jnp.sum(h * C[None, :], axis=1) + D * u
      if st.has_z:
        y = y * jax.nn.silu(z_ref[r].astype(_F32))
      _store_row(y_ref, r, y, t, st)
    return h
  h_last_ref[...] = lax.fori_loop(0, st.chunks, chunk, h0_ref[...])


def _backward(st, u, delta, z, B, C, A, D, bias, starts, dy, dh_last):
  b, seq_len, d = u.shape
  n = A.shape[1]
  nd = d // st.block_d
  sp = _specs(st, n)
  ins = [u, delta] + ([z] if st.has_z else []) + [dy, B, C, A, D, bias, starts, dh_last]
  in_specs = ([sp["seq"]] * (3 + st.has_z)
              + [sp["bc"], sp["bc"], sp["param"], sp["row"], sp["row"], sp["starts"], sp["state"]])
  seq_grads = [u, delta] + ([z] if st.has_z else [])
  out_shape = ([shape_like(u, x.shape, x.dtype) for x in seq_grads]
               + [shape_like(u, (b, seq_len, nd, n), _F32)] * 2 + [shape_like(u, (b, d, n), _F32)]
               + [shape_like(u, (b, d), _F32)] * 2 + [shape_like(u, (b, d, n), _F32)])
  out_specs = ([sp["seq"]] * len(seq_grads) + [sp["per_block"]] * 2 + [sp["state"]] + [sp["batch_row"]] * 2
               + [sp["state"]])
  outs = list(_call(functools.partial(_backward_kernel, st=st), st, (b, nd), in_specs, out_specs, out_shape,
                    "selective_scan_bwd")(*ins))
  return outs if st.has_z else outs[:2] + [None] + outs[2:]


def _backward_kernel(*refs, st):
  u_ref, delta_ref, *refs = refs
  z_ref = refs.pop(0) if st.has_z else None
  dout_ref, B_ref, C_ref, A_ref, D_ref, bias_ref, starts_ref, dh_last_ref, du_ref, ddelta_ref, *refs = refs
  dz_ref = refs.pop(0) if st.has_z else None
  dB_ref, dC_ref, dA_ref, dD_ref, dbias_ref, dh0_ref = refs
  A, D, bias = A_ref[...], D_ref[...], bias_ref[...]
  def step(t):
    return _step(u_ref, delta_ref, B_ref, C_ref, bias, t, st)

  def chunk(i, carry):
    g, dA, dD, dbias = carry  # g = dL/dh after the chunk
    c = st.chunks - 1 - i
    hs = [starts_ref[c]]  # hs[j] is the state before step j of the chunk
    for j in range(st.chunk):
      _, u, _, dt, B, _ = step(c * st.chunk + j)
      hs.append(jnp.exp(dt[:, None] * A) * hs[-1] + (dt * u)[:, None] * B[None, :])
    for j in reversed(range(st.chunk)):
      t = c * st.chunk + j
      r, u, raw, dt, B, C = step(t)
      dout = dout_ref[r].astype(_F32)
      if st.ragged:
        dout = jnp.where(t < st.length, dout, 0.0)
      if st.has_z:
        zf = z_ref[r].astype(_F32)
        gate = jax.nn.sigmoid(zf)
        y = jnp.sum(hs[j + 1] * C[None, :], axis=1) + D * u
        _store_row(dz_ref, r, dout * y * gate * (1.0 + zf * (1.0 - gate)), t, st)
        dout = dout * zf * gate  # dL/dy before the gate: the cotangent of C . h + D u
      g = g + dout[:, None] * C[None, :]
      _store_row(dC_ref, r, jnp.sum(hs[j + 1] * dout[:, None], axis=0), t, st)
      _store_row(dB_ref, r, jnp.sum(g * (dt * u)[:, None], axis=0), t, st)
      dx = jnp.sum(g * B[None, :], axis=1)  # dL/d(dt * u)
      decay = jnp.exp(dt[:, None] * A)
      q = g * decay * hs[j]  # dL/d(exp(dt A)) * exp(dt A)
      dA = dA + q * dt[:, None]
      ddt = jnp.sum(q * A, axis=1) + dx * u
      if st.softplus:
        ddt = ddt * jax.nn.sigmoid(raw)
      if st.ragged:
        ddt = jnp.where(t < st.length, ddt, 0.0)
      _store_row(du_ref, r, dx * dt + dout * D, t, st)
      _store_row(ddelta_ref, r, ddt, t, st)
      dD, dbias = dD + dout * u, dbias + ddt
      g = g * decay
    return g, dA, dD, dbias

  zeros = jnp.zeros(A.shape, _F32), jnp.zeros(D.shape, _F32)
  g, dA, dD, dbias = lax.fori_loop(0, st.chunks, chunk, (dh_last_ref[...], zeros[0], zeros[1], zeros[1]))
  dh0_ref[...], dA_ref[...], dD_ref[...], dbias_ref[...] = g, dA, dD, dbias
