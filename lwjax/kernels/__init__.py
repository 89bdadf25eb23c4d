"""One dispatch function per kernel op: Pallas on TPU/GPU, the plain-JAX reference elsewhere.

Only the reference exists so far; the Pallas kernels (chunked flash attention, paged decode attention,
selective scan) plug in here, selected by `impl`.
"""

from __future__ import annotations

from lwjax.kernels import reference

IMPLS = ("auto", "reference")


def attention(q, k, v, *, causal=True, segment_ids=None, q_offset=0, sm_scale=None, window=None,
              impl="auto"):
  """Attention `[b, q_len, heads, d] x [b, kv_len, kv_heads, d] -> [b, q_len, heads, d]`.

  See `lwjax.kernels.reference.attention` for the argument semantics. `impl` picks the implementation:
  "auto" (the fastest available for the backend) or "reference".
  """
  if impl not in IMPLS:
    raise ValueError(f"attention impl must be one of {IMPLS}, got {impl!r}")
  return reference.attention(q, k, v, causal=causal, segment_ids=segment_ids, q_offset=q_offset,
                             sm_scale=sm_scale, window=window)
