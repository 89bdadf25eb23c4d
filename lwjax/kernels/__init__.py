"""One dispatch function per kernel op: Pallas on TPU/GPU, the plain-JAX reference (or a native kernel) on CPU.

The Pallas kernels (chunked flash attention, paged decode attention, Mamba selective scan, SSD and state
update) plug in here, selected by `impl`. On GPU each runs as a Triton kernel (paged decode attention picks its
GPU form inside its module).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import numbers

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from lwjax.kernels import cpu, reference
from lwjax.kernels.pallas import (
  attention as pallas_attention,
  attention_triton as pallas_attention_triton,
  decode_attention as pallas_decode_attention,
  selective_scan as pallas_selective_scan,
  selective_scan_triton as pallas_selective_scan_triton,
  ssd as pallas_ssd,
  ssd_triton as pallas_ssd_triton,
  state_update as pallas_state_update,
  state_update_triton as pallas_state_update_triton,
)

IMPLS = ("auto", "pallas", "interpret", "reference")
# Per thread and task (a context variable): one thread lowering for a TPU never changes another's kernels.
_target_platform: contextvars.ContextVar[str | None] = contextvars.ContextVar("lwjax_target_platform", default=None)


def backend() -> str:
  """The platform programs are built for: `jax.default_backend()`, or the one `target_platform` names while
  compiling ahead of time for another (a TPU slice lowered on a CPU host). "auto" kernels resolve by it."""
  return _target_platform.get() or jax.default_backend()


@contextlib.contextmanager
def target_platform(platform: str):
  """Within the block, "auto" kernels and the models' backend-specific paths resolve for `platform` ("tpu",
  "gpu", "cpu") whatever this process runs on: `lwjax.launch.compile` lowers TPU steps on a CPU host with it."""
  token = _target_platform.set(platform)
  try:
    yield
  finally:
    _target_platform.reset(token)


# Up to this length "auto" on CPU runs causal self-attention as `reference.blocked_causal_attention` (unrolled
# over query blocks: longer sequences would grow the program).
CPU_BLOCKED_MAX_LEN = 1024


def _window_and_softcap(op, window, softcap):
  """(window as an int, softcap as a float), or None for either: static values the kernels specialise on.
  Rejects a window that is not a positive integer and a softcap that is not a positive number."""
  if window is not None:
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
      raise ValueError(f"{op} window must be a positive int or None, got {window!r}")
    window = int(window)
  if softcap is not None:
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real) or not softcap > 0:
      raise ValueError(f"{op} softcap must be a positive number or None, got {softcap!r}")
    softcap = float(softcap)
  return window, softcap


def attention(q, k, v, *, causal=True, segment_ids=None, q_offset=0, sm_scale=None, window=None, softcap=None,
              impl="auto"):
  """Attention `[b, q_len, heads, d] x [b, kv_len, kv_heads, d] -> [b, q_len, heads, d]`.

  See `lwjax.kernels.reference.attention` for the argument semantics (`window`: Mistral's sliding window, a
  positive int; `softcap`: Gemma-2's logit soft-capping, a positive number). `impl`: "auto" (the Pallas flash
  kernel on TPU and GPU; elsewhere the reference, or its block-causal form for causal self-attention from
  position 0 up to `CPU_BLOCKED_MAX_LEN` tokens), "pallas" (the Mosaic kernel on TPU, the Triton one on
  GPU), "interpret" (the TPU kernel in Pallas' TPU interpret mode, on CPU: how the tests run it) or
  "reference".
  """
  if impl not in IMPLS:
    raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
  window, softcap = _window_and_softcap("attention", window, softcap)
  if impl == "auto":
    impl = "pallas" if backend() in ("tpu", "gpu") else "reference"
    self_attention = q.shape[1] == k.shape[1] <= CPU_BLOCKED_MAX_LEN and isinstance(q_offset, int) and not q_offset
    if impl == "reference" and causal and self_attention and not isinstance(segment_ids, tuple):
      return reference.blocked_causal_attention(q, k, v, segment_ids=segment_ids, sm_scale=sm_scale, window=window,
                                                softcap=softcap)
  if impl == "reference":
    return reference.attention(q, k, v, causal=causal, segment_ids=segment_ids, q_offset=q_offset,
                               sm_scale=sm_scale, window=window, softcap=softcap)
  gpu = impl == "pallas" and backend() == "gpu"
  return (pallas_attention_triton if gpu else pallas_attention).attention(
      q, k, v, causal=causal, segment_ids=segment_ids, q_offset=q_offset, sm_scale=sm_scale, window=window,
      softcap=softcap, interpret=pltpu.InterpretParams() if impl == "interpret" else False)


def decode_attention(q, k_pages, v_pages, page_table, lengths, *, sm_scale=None, window=None, softcap=None,
                     impl="auto"):
  """Paged attention of the newest `q_tokens` tokens: `q [b, q_tokens, heads, d]` over KV pages
  `[kv_heads, num_pages, page_size, d]` found by `page_table [b, max_pages]`, `lengths [b]` keys each.

  See `lwjax.kernels.reference.decode_attention` for the semantics (`window` and `softcap` as in `attention`).
  `impl`: "auto" (Pallas on TPU/GPU; on CPU the native kernel `lwjax.kernels.cpu.paged_attention` for float32
  when it builds, else the reference), "pallas", "interpret" (the Pallas kernel in interpret mode) or
  "reference".
  """
  if impl not in IMPLS:
    raise ValueError(f"decode_attention impl must be one of {IMPLS}, got {impl!r}")
  window, softcap = _window_and_softcap("decode_attention", window, softcap)
  options = dict(sm_scale=sm_scale, window=window, softcap=softcap)
  if impl == "auto":
    impl = "pallas" if backend() in ("tpu", "gpu") else "reference"
    if impl == "reference" and backend() == "cpu" and cpu.supports(q, k_pages, v_pages):
      return cpu.paged_attention(q, k_pages, v_pages, page_table, lengths, **options)
  if impl == "reference":
    return reference.decode_attention(q, k_pages, v_pages, page_table, lengths, **options)
  return pallas_decode_attention.decode_attention(q, k_pages, v_pages, page_table, lengths, **options,
                                                  interpret=impl == "interpret",
                                                  backend="gpu" if backend() == "gpu" else "tpu")


def decode_attention_ignores_table_width(dtype, impl="auto") -> bool:
  """Whether `decode_attention(..., impl=impl)` on `dtype` inputs costs what the lengths ask whatever the page
  table's width (the native CPU kernel reads a row's pages up to its length only): a caller can then pass every
  table at its widest and compile one program where bucketed widths would compile several."""
  return (impl == "auto" and backend() == "cpu" and jnp.dtype(dtype) == jnp.float32 and cpu.available())


def _mamba_impl(op, impl):
  """Resolves `impl` for a Mamba kernel: "auto" is "pallas" on TPU and GPU, else "reference". Returns
  (impl, whether "pallas" means the Triton kernel, the `interpret` argument of the TPU kernel)."""
  if impl not in IMPLS:
    raise ValueError(f"{op} impl must be one of {IMPLS}, got {impl!r}")
  platform = backend()
  if impl == "auto":
    impl = "pallas" if platform in ("tpu", "gpu") else "reference"
  return impl, impl == "pallas" and platform == "gpu", pltpu.InterpretParams() if impl == "interpret" else False


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
                   initial_state=None, return_state=False, impl="auto"):
  """Mamba-1 selective scan: u, delta [b, l, d], A [d, n], B, C [b, l, n] or [b, l, groups, n] -> y [b, l, d]
  (and the float32 final state [b, d, n] when return_state).

  See `lwjax.kernels.reference.selective_scan` for the semantics. `impl`: "auto" (the fused Pallas scan on
  TPU and GPU, the reference elsewhere), "pallas" (the Mosaic kernel on TPU, the Triton one on GPU),
  "interpret" (the TPU kernel in Pallas' TPU interpret mode, on CPU) or "reference".
  """
  impl, gpu, interpret = _mamba_impl("selective_scan", impl)
  if impl == "reference":
    fn = reference.selective_scan
  elif gpu:
    fn = pallas_selective_scan_triton.selective_scan
  else:
    fn = functools.partial(pallas_selective_scan.selective_scan, interpret=interpret)
  return fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
            initial_state=initial_state, return_state=return_state)


def ssd(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True, initial_state=None,
        return_state=False, chunk_size=128, impl="auto"):
  """Mamba-2 SSD: x [b, l, heads, headdim], dt [b, l, heads], A [heads], B, C [b, l, groups, n] -> y like x
  (and the float32 final state [b, heads, headdim, n] when return_state).

  See `lwjax.kernels.reference.ssd`; every impl uses the chunked form with `chunk_size` (for the Triton
  kernel a power of two >= 16; the Mosaic kernel on a TPU rounds it up to a multiple of 128). `impl` as for
  `selective_scan` (Pallas forward and backward kernels: Mosaic on TPU, Triton on GPU).
  """
  impl, gpu, interpret = _mamba_impl("ssd", impl)
  if impl == "reference":
    fn = reference.ssd
  elif gpu:
    fn = pallas_ssd_triton.ssd
  else:
    fn = functools.partial(pallas_ssd.ssd, interpret=interpret)
    if impl == "pallas" and chunk_size % 128:
      # Mosaic tiles a chunk's [1, chunk] rows in lanes of 128: a longer chunk, the same exact result.
      chunk_size = -(-chunk_size // 128) * 128
  return fn(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, initial_state=initial_state,
            return_state=return_state, chunk_size=chunk_size)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=True,
                           accepted=None, return_all_states=False, impl="auto"):
  """k decoding steps of a Mamba state [b, d, n] from x, dt [b, k, d], B, C [b, k, (groups,) n] ->
  (y [b, k, d], the state after `accepted [b]` steps, default k, or every step's state [b, k, d, n]).

  See `lwjax.kernels.reference.selective_state_update`. `impl` as for `selective_scan` (Mosaic on TPU,
  Triton on GPU; no gradient).
  """
  impl, gpu, interpret = _mamba_impl("selective_state_update", impl)
  if impl == "reference":
    fn = reference.selective_state_update
  elif gpu:
    fn = pallas_state_update_triton.selective_state_update
  else:
    fn = functools.partial(pallas_state_update.selective_state_update, interpret=interpret)
  return fn(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, accepted=accepted,
            return_all_states=return_all_states)
