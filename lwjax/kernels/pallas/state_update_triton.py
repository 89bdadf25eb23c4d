"""Multi-step Mamba state update for decoding and speculative verification, Pallas/Triton for GPU.

Advances the `[dim, state]` SSM state by k tokens in one kernel (Mamba in the Llama, arXiv 2408.15237,
Sec. 4: verification replays the accepted draft tokens from one checkpointed state). One program per
(batch, block of `block_d` channels) reads its `[block_d, state]` state once, runs the k steps statically
unrolled in float32 registers and writes either the state after `accepted[b]` steps (the state buffer is
updated in place) or the state after every step. The GPU counterpart of `state_update.py`; Mamba-2 heads
use it with dim = heads * headdim. Block sizes follow `selective_scan_triton.py` (powers of two; a state
size that is not one is zero-padded, which copies the state).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from lwjax.kernels.pallas.selective_scan import shape_like, softplus
from lwjax.kernels.pallas.selective_scan_triton import grouped_blocks, pad_state

_F32 = jnp.float32


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True,
                           accepted=None, return_all_states=False, block_d=32, num_warps=4, interpret=False):
  """Same arguments and results as `lwjax.kernels.reference.selective_state_update`.

  state [batch, dim, state]; x, dt, z [batch, k, dim]; A [dim, state]; B, C [batch, k, state] or
  [batch, k, groups, state]; D, dt_bias [dim]; accepted int [batch] (steps kept, default k).
  `block_d`: channels per program (rounded down to a power of two dividing dim // groups).
  """
  b, d, n = state.shape
  k = x.shape[1]
  B, C, bd, blocks_per_group = grouped_blocks(B, C, d, block_d)
  np2 = pl.next_power_of_2(n)
  def vec(a):
    return jnp.zeros((d,), _F32) if a is None else a.astype(_F32)
  accepted = jnp.full((b,), k, jnp.int32) if accepted is None else jnp.asarray(accepted, jnp.int32)

  state_spec = pl.BlockSpec((None, bd, np2), lambda i, j: (i, j, 0))  # [b, d, n]
  seq = pl.BlockSpec((None, k, bd), lambda i, j: (i, 0, j))  # [b, k, d]
  bc = pl.BlockSpec((None, k, None, np2), lambda i, j: (i, 0, lax.div(j, blocks_per_group), 0))  # [b, k, g, n]
  param = pl.BlockSpec((bd, np2), lambda i, j: (j, 0))  # A [d, n]
  row = pl.BlockSpec((bd,), lambda i, j: (j,))  # D, dt_bias [d]
  has_z = z is not None
  ins = ([pad_state(state), accepted, x, dt] + ([z] if has_z else [])
         + [pad_state(B), pad_state(C), pad_state(A.astype(_F32)), vec(D), vec(dt_bias)])
  in_specs = [state_spec, pl.no_block_spec] + [seq] * (2 + has_z) + [bc, bc, param, row, row]
  if return_all_states:
    out_state = (shape_like(x, (b, k, d, np2), state.dtype),
                 pl.BlockSpec((None, k, bd, np2), lambda i, j: (i, 0, j, 0)))
  else:
    out_state = (shape_like(x, (b, d, np2), state.dtype), state_spec)
  kernel = functools.partial(_kernel, k=k, softplus_dt=dt_softplus, has_z=has_z, all_states=return_all_states)
  y, new_state = pl.pallas_call(
      kernel, out_shape=[shape_like(x, x.shape, x.dtype), out_state[0]], grid=(b, d // bd),
      in_specs=in_specs, out_specs=[seq, out_state[1]],
      # Operand 0 is the state: updated in place unless every step's state is returned.
      input_output_aliases={} if return_all_states else {0: 1},
      compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret, name="selective_state_update",
  )(*ins)
  return y, new_state[..., :n]


def _kernel(state_ref, acc_ref, x_ref, dt_ref, *refs, k, softplus_dt, has_z, all_states):
  z_ref = refs[0] if has_z else None
  B_ref, C_ref, A_ref, D_ref, bias_ref, y_ref, new_state_ref = refs[has_z:]
  accepted = acc_ref[pl.program_id(0)]
  A, D, bias = A_ref[...], D_ref[...], bias_ref[...]  # [bd, n], [bd], [bd]
  h = state_ref[...].astype(_F32)
  kept = h  # the state after `accepted` steps
  for j in range(k):
    x = x_ref[j].astype(_F32)
    dt = dt_ref[j].astype(_F32) + bias
    dt = softplus(dt) if softplus_dt else dt
    h = jnp.exp(dt[:, None] * A) * h + (dt * x)[:, None] * B_ref[j].astype(_F32)[None, :]
    y = jnp.sum(h * C_ref[j].astype(_F32)[None, :], axis=1) + D * x
    if has_z:
      y = y * jax.nn.silu(z_ref[j].astype(_F32))
    y_ref[j] = y.astype(y_ref.dtype)
    if all_states:
      new_state_ref[j] = h.astype(new_state_ref.dtype)
    else:
      kept = jnp.where(accepted == j + 1, h, kept)
  if not all_states:
    new_state_ref[...] = kept.astype(new_state_ref.dtype)
