"""Multi-step Mamba state update for decoding and speculative verification, Pallas/Mosaic for TPU.

Advances the `[dim, state]` SSM state by k tokens in one kernel (Mamba in the Llama, arXiv 2408.15237,
Sec. 4: verification replays the accepted draft tokens from one checkpointed state). The grid is
(batch, channel blocks); each cell reads its `[block_d, state]` state once, runs the k steps statically
unrolled in VMEM/vregs and writes either the state after `accepted[b]` steps (scalar-prefetched into SMEM;
the state buffer is updated in place) or the state after every step. The state keeps its `[b, dim,
state]` layout in HBM (no extra pass over the largest decoding operand) and is transposed on chip, so that
channels lie on lanes for the arithmetic. Mamba-2 heads use it with dim = heads * headdim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lwjax.kernels.pallas.selective_scan import pad_axis, pick_block, round_up, shape_like, softplus

_F32 = jnp.float32


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True,
                           accepted=None, return_all_states=False, block_d=512, interpret=False):
  """Same arguments and results as `lwjax.kernels.reference.selective_state_update`.

  state [batch, dim, state]; x, dt, z [batch, k, dim]; A [dim, state]; B, C [batch, k, state] or
  [batch, k, groups, state]; D, dt_bias [dim]; accepted int [batch] (steps kept, default k).
  `block_d`: channels per grid cell (a multiple of 128 dividing dim // groups on TPU, or all of dim).
  """
  b, d, n = state.shape
  k = x.shape[1]
  B_bkgn, C_bkgn = (a[:, :, None] if a.ndim == 3 else a for a in (B, C))
  g = B_bkgn.shape[2]
  bd = pick_block(d // g, block_d)
  if g > 1 and bd % 128 and not interpret:
    raise ValueError(f"on TPU dim // groups ({d // g}) must be a multiple of 128 when groups > 1")
  # B, C as [b, g, k', n] float32, k padded to a sublane tile so that the on-chip transpose is aligned.
  def bc(a):
    return pad_axis(a.astype(_F32), 1, 8).transpose(0, 2, 1, 3)
  def vec(a):
    return jnp.zeros((1, d), _F32) if a is None else a.astype(_F32).reshape(1, d)
  accepted = jnp.full((b,), k, jnp.int32) if accepted is None else jnp.asarray(accepted, jnp.int32)
  blocks_per_group = d // g // bd

  seq = pl.BlockSpec((None, k, bd), lambda i, j, acc: (i, 0, j))  # [b, k, d]
  bc_spec = pl.BlockSpec((None, None, round_up(k, 8), n),
                         lambda i, j, acc: (i, lax.div(j, blocks_per_group), 0, 0))
  row = pl.BlockSpec((1, bd), lambda i, j, acc: (0, j))
  state_spec = pl.BlockSpec((None, bd, n), lambda i, j, acc: (i, j, 0))
  param = pl.BlockSpec((n, bd), lambda i, j, acc: (0, j))  # A^T [n, d]
  has_z = z is not None
  ins = [state, x, dt] + ([z] if has_z else []) + [bc(B_bkgn), bc(C_bkgn), A.astype(_F32).T, vec(D), vec(dt_bias)]
  in_specs = [state_spec] + [seq] * (2 + has_z) + [bc_spec, bc_spec, param, row, row]
  if return_all_states:
    out_state = (shape_like(x, (b, k, d, n), state.dtype),
                 pl.BlockSpec((None, k, bd, n), lambda i, j, acc: (i, 0, j, 0)))
  else:
    out_state = (shape_like(x, state.shape, state.dtype), state_spec)
  kernel = functools.partial(_kernel, k=k, softplus_dt=dt_softplus, has_z=has_z,
                             all_states=return_all_states)
  state_bytes = state.size * state.dtype.itemsize * (1 + (k if return_all_states else 1))
  y, new_state = pl.pallas_call(
      kernel,
      out_shape=[shape_like(x, x.shape, x.dtype), out_state[0]],
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(b, d // bd), in_specs=in_specs, out_specs=[seq, out_state[1]]),
      # Operand 1 (after the prefetched counts) is the state: updated in place unless all steps are kept.
      input_output_aliases={} if return_all_states else {1: 1},
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
      interpret=interpret, name="selective_state_update",
      cost_estimate=pl.CostEstimate(flops=7 * b * k * d * n, transcendentals=b * k * d * (n + 2),
                                    bytes_accessed=state_bytes + 4 * x.size * x.dtype.itemsize),
  )(accepted, *ins)
  return y, new_state


def _kernel(acc_ref, state_ref, x_ref, dt_ref, *refs, k, softplus_dt, has_z, all_states):
  z_ref = refs[0] if has_z else None
  B_ref, C_ref, A_ref, D_ref, bias_ref, y_ref, new_state_ref = refs[has_z:]
  accepted = acc_ref[pl.program_id(0)]
  A = A_ref[...]  # [n, bd]
  h = state_ref[...].astype(_F32).T  # [n, bd]: channels on lanes
  x = x_ref[...].astype(_F32)  # [k, bd]
  dt = dt_ref[...].astype(_F32) + bias_ref[...]
  dt = softplus(dt) if softplus_dt else dt
  dtx = dt * x
  B_nk, C_nk = B_ref[...].T, C_ref[...].T  # [n, k']: step j in lane j
  rows = lax.broadcasted_iota(jnp.int32, x.shape, 0)
  y = jnp.zeros_like(x)
  kept = h  # the state after `accepted` steps
  for j in range(k):
    h = jnp.exp(dt[j:j + 1] * A) * h + B_nk[:, j:j + 1] * dtx[j:j + 1]
    y = jnp.where(rows == j, jnp.sum(C_nk[:, j:j + 1] * h, axis=0, keepdims=True), y)
    if all_states:
      new_state_ref[j] = h.T.astype(new_state_ref.dtype)
    else:
      kept = jnp.where(accepted == j + 1, h, kept)
  y = y + D_ref[...] * x
  if has_z:
    y = y * jax.nn.silu(z_ref[...].astype(_F32))
  y_ref[...] = y.astype(y_ref.dtype)
  if not all_states:
    new_state_ref[...] = kept.T.astype(new_state_ref.dtype)
