"""Block visibility for flash attention: which key blocks a query block sees, and the mask inside a block.

Shared by the TPU (`attention.py`) and GPU (`attention_triton.py`) kernels of FlashAttention-2 (Dao 2023,
arXiv:2307.08691). Positions are absolute: row r of query block i sits at `q_offset + i * block_q + r`
(chunked prefill), key j of key block i at `i * block_k + j`. A block is *visible* when some entry of it is
(it must be computed) and *full* when every entry is (it needs no mask). All block-range arithmetic divides
non-negative scalars only, so truncating division is floor division and lowers to one scalar op on both.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class FlashConfig:
  """Everything the kernels specialise on (hashable: a `custom_vjp` non-differentiable argument)."""
  causal: bool
  window: int | None
  softcap: float | None  # Gemma-2's logit soft-capping
  sm_scale: float
  block_q: int
  block_k: int
  kv_len: int  # before padding: keys at or after it are masked
  groups: int  # query heads per kv head
  dim: int  # head dim
  segments: bool
  interpret: Any
  q_offset: int | None = None  # the queries' offset when static (a Python int), for the cost estimate


def round_up(n, multiple):
  return -(-n // multiple) * multiple


def pad_to(x, axis, block):
  """Zero-pads `axis` of `x` to a multiple of `block`."""
  pad = round_up(x.shape[axis], block) - x.shape[axis]
  return jnp.pad(x, [(0, pad if a == axis else 0) for a in range(x.ndim)]) if pad else x


def shape_like(x, shape, dtype):
  """An output shape varying over the same `shard_map` mesh axes as `x` (required under check_vma)."""
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(x).manual_axis_type)


def div(a, b):
  """a // b for a non-negative int32 scalar `a`."""
  return jax.lax.div(a, jnp.int32(b))


def kv_block_range(cfg, q_first, num_k_blocks):
  """First and last key block visible to the query block starting at position `q_first`."""
  lo, hi = 0, num_k_blocks - 1
  if cfg.causal:  # k_first <= q_last
    hi = jnp.minimum(hi, div(q_first + cfg.block_q - 1, cfg.block_k))
  if cfg.window is not None:  # k_last > q_first - window
    lo = div(jnp.maximum(q_first - cfg.window + 1, 0), cfg.block_k)
  return lo, hi


def q_block_range(cfg, offset, k_first, num_q_blocks):
  """First and last query block that sees the key block starting at `k_first`."""
  lo, hi = 0, num_q_blocks - 1
  if cfg.causal:
    lo = div(jnp.maximum(k_first - offset, 0), cfg.block_q)
  if cfg.window is not None:
    hi = jnp.minimum(hi, div(jnp.maximum(k_first + cfg.block_k + cfg.window - 2 - offset, 0), cfg.block_q))
  return lo, hi


def needs_mask(cfg):
  return cfg.causal or cfg.window is not None or cfg.segments or cfg.kv_len % cfg.block_k != 0


def full_kv_block_range(cfg, q_first, num_k_blocks):
  """Key blocks the query block at `q_first` sees entirely (first, last; none when last < first)."""
  if cfg.segments:
    return num_k_blocks, num_k_blocks - 1
  lo, hi = 0, num_k_blocks - 1 if cfg.kv_len % cfg.block_k == 0 else num_k_blocks - 2
  if cfg.causal:  # k_last <= q_first
    hi = jnp.minimum(hi, div(q_first + 1, cfg.block_k) - 1)
  if cfg.window is not None:  # k_first > q_last - window
    lo = div(jnp.maximum(q_first + cfg.block_q - 1 - cfg.window + cfg.block_k, 0), cfg.block_k)
  return lo, hi


def full_q_block_range(cfg, offset, k_first, num_q_blocks):
  """Query blocks that see the key block at `k_first` entirely (first, last)."""
  if cfg.segments:
    return num_q_blocks, num_q_blocks - 1
  k_last = k_first + cfg.block_k - 1
  lo, hi = 0, num_q_blocks - 1
  if cfg.kv_len % cfg.block_k:  # the last key block holds padding: no query block sees all of it
    hi = num_q_blocks * (k_last < cfg.kv_len).astype(jnp.int32) - 1  # (a scalar select trips Triton)
  if cfg.causal:  # q_first >= k_last
    lo = div(jnp.maximum(k_last - offset + cfg.block_q - 1, 0), cfg.block_q)
  if cfg.window is not None:  # q_last < k_first + window
    hi = jnp.minimum(hi, div(jnp.maximum(k_first + cfg.window - offset, 0), cfg.block_q) - 1)
  return lo, hi


def visible(cfg, shape, q_axis, q_first, k_first, q_seg, kv_seg):
  """Boolean mask of one block; queries run along `q_axis`. Segment ids come shaped to broadcast."""
  q_pos = q_first + jax.lax.broadcasted_iota(jnp.int32, shape, q_axis)
  k_pos = k_first + jax.lax.broadcasted_iota(jnp.int32, shape, 1 - q_axis)
  conditions = []
  if cfg.causal:
    conditions.append(q_pos >= k_pos)
  if cfg.window is not None:
    conditions.append(q_pos - k_pos < cfg.window)
  if cfg.kv_len % cfg.block_k:
    conditions.append(k_pos < cfg.kv_len)
  if cfg.segments:
    conditions.append(q_seg == kv_seg)
  return functools.reduce(jnp.logical_and, conditions)


def scores(cfg, s):
  """Scaled scores `s` soft-capped as `softcap * tanh(s / softcap)` (Gemma-2), and tanh(s / softcap) for the
  backward pass (d capped / d s = 1 - tanh^2); without a cap, `s` and None."""
  if cfg.softcap is None:
    return s, None
  t = jnp.tanh(s / cfg.softcap)
  return cfg.softcap * t, t


def uncap(ds, t):
  """The gradient `ds` of capped scores taken back through the cap (`t` from `scores`; None: no cap)."""
  return ds if t is None else ds * (1.0 - t * t)


def dot_nt(a, b):
  """[m, d] x [n, d] -> [m, n]."""
  return _matmul(a, b, 1)


def dot(a, b):
  """[m, k] x [k, n] -> [m, n]."""
  return _matmul(a, b, 0)


def _matmul(a, b, b_contracting_dim):
  # fp32 accumulation always; fp32 inputs also multiply in fp32 (not one bf16/tf32 pass).
  precision = jax.lax.Precision.HIGHEST if a.dtype == F32 else None
  return jax.lax.dot_general(a, b, (((1,), (b_contracting_dim,)), ((), ())), precision=precision,
                             preferred_element_type=F32)
