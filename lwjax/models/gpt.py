"""Llama-3-style decoder-only transformer (RMSNorm, RoPE, SwiGLU, grouped-query attention) in Flax NNX.

The other families are options of the same model, named as transformers names them (`GPTConfig`): q/k/v
biases (Qwen2), sliding-window attention on every layer or on alternate ones (Mistral, Gemma-2), attention-
and final-logit soft-capping, a query scale, RMSNorm with `1 + w`, norms after attention and MLP, GeGLU and
embeddings scaled by sqrt(d_model) (Gemma-2).

Training forward over packed sequences (causal mask + segment ids) and an inference API over a KV cache:
`prefill` (also chunked: it appends a chunk to an existing cache) and `decode_step`. Every parameter
carries `logical_axes` metadata and activations are constrained by logical names (`lwjax.models.logical`).
Attention goes through `lwjax.kernels.attention`. With `scan_layers` the layers' parameters are one stack run by a
scan (`lwjax.models.layer_stack`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from lwjax import kernels
from lwjax.config import Field, option, schema_of
from lwjax.models import layer_stack, logical
from lwjax.models.logical import constrain

REMAT_POLICIES = ("none", "full", "dots")
_CACHE_AXES = ("batch", "kv_heads", None, "head_dim")  # a KVCache array [b, kv_heads, max_len, hd]


DTYPES = ("float32", "bfloat16", "float16")
ACTIVATIONS = ("silu", "gelu_tanh")  # SwiGLU (Llama), GeGLU with tanh-approximated GELU (Gemma)


def _even(value: int) -> str | None:
  return "must be even for RoPE" if value % 2 else None


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3.1 frequency scaling for long contexts (HF `rope_scaling` with rope_type "llama3")."""
  factor: float = option(8.0, min=1.0)
  low_freq_factor: float = option(1.0, min=0.0)
  high_freq_factor: float = option(4.0, min=0.0)
  original_max_position_embeddings: int = option(8192, min=1)


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """Shape and numerics of a GPT. `dtype` is the compute dtype, `param_dtype` the stored one."""
  vocab_size: int = option(min=1)
  d_model: int = option(min=1)
  n_layers: int = option(min=1)
  n_heads: int = option(min=1)
  n_kv_heads: int = option(min=1, doc="divides n_heads")
  head_dim: int = option(min=2, check=_even)
  d_ff: int = option(min=1)
  max_seq_len: int = option(2048, min=1)
  rope_theta: float = option(10000.0, min=1.0)
  rope_scaling: RopeScaling | None = None
  norm_eps: float = option(1e-5, min=0.0)
  tie_embeddings: bool = False
  dtype: str = option("float32", choices=DTYPES)
  param_dtype: str = option("float32", choices=DTYPES)
  remat: str = option("none", choices=REMAT_POLICIES)
  scan_layers: bool = option(False, doc="layers' parameters stacked on a leading axis and run by one scan "
                             "(`lwjax.models.layer_stack`): one compiled layer, one layer's temporaries")
  attention_impl: str = option("auto", choices=kernels.IMPLS)
  qkv_bias: bool = option(False, doc="biases on the query, key and value projections (Qwen2)")
  sliding_window: int | None = option(None, min=1, doc="windowed layers attend to this many keys up to the query")
  full_attention_every: int = option(0, min=0, doc="with sliding_window: layer i attends to the whole context "
                                     "when i % k == k - 1 (Gemma-2: 2); 0: every layer is windowed (Mistral)")
  attn_logit_softcap: float | None = option(None, min=1e-6, doc="attention scores s -> c tanh(s / c) (Gemma-2)")
  final_logit_softcap: float | None = option(None, min=1e-6, doc="output logits z -> c tanh(z / c) (Gemma-2)")
  query_pre_attn_scalar: float | None = option(None, min=1e-6, doc="softmax scale is this ** -0.5 (default: "
                                               "head_dim; Gemma-2 27B: d_model / n_heads)")
  norm_offset: float = option(0.0, doc="RMSNorm multiplies by offset + weight (Gemma: 1.0, weights stored as w)")
  post_norms: bool = option(False, doc="RMSNorms on the attention and MLP outputs too (Gemma-2)")
  activation: str = option("silu", choices=ACTIVATIONS)
  embed_scale: bool = option(False, doc="embeddings multiplied by sqrt(d_model) (Gemma)")

  def __post_init__(self):
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
    if self.head_dim % 2:
      raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
    if self.scan_layers and self.n_layers % layer_stack.period(self):
      raise ValueError(f"scan_layers: n_layers ({self.n_layers}) must be a multiple of full_attention_every "
                       f"({self.full_attention_every}), the layers scanned as one group")

  def layer_window(self, layer: int) -> int | None:
    """The sliding window of layer `layer` (None: it attends to the whole context)."""
    if self.sliding_window is None:
      return None
    k = self.full_attention_every
    return None if k and layer % k == k - 1 else self.sliding_window

  @property
  def sm_scale(self) -> float:
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
    """From a (Config)dict; a `rope_scaling` group with factor 1.0 (or none) means no scaling. The job key
    `pretrained` (the checkpoint a run starts from, `lwjax.models.pretrained`) is not a field and is skipped."""
    d = dict(d)
    d.pop(PRETRAINED_KEY, None)
    scaling = dict(d.get("rope_scaling") or {})
    d["rope_scaling"] = RopeScaling(**scaling) if scaling and scaling.get("factor", 1.0) != 1.0 else None
    return cls(**d)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["rope_scaling"] = dataclasses.asdict(self.rope_scaling or RopeScaling(factor=1.0))
    return d

  def num_params(self, include_embedding: bool = True) -> int:
    attn = self.d_model * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
    if self.qkv_bias:
      attn += self.head_dim * (self.n_heads + 2 * self.n_kv_heads)
    layer = attn + 3 * self.d_model * self.d_ff + (4 if self.post_norms else 2) * self.d_model
    embed = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
    return self.n_layers * layer + self.d_model + (embed if include_embedding else 0)

  def _dense_params(self) -> int:
    return self.num_params(include_embedding=False) + self.d_model * self.vocab_size

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token of a `seq_len` sequence (forward + backward = 3x forward): 6 N plus causal
    attention. A token attends to seq_len / 2 keys on average: QK^T and PV are 2 x 2 x heads x head_dim x
    seq_len / 2 FLOPs a layer forward, 6 L H d T with the backward (MaxText's count, non-causal halved)."""
    return 6.0 * self._dense_params() + 6.0 * self.n_layers * self.n_heads * self.head_dim * seq_len

  def decode_flops_per_token(self, context: int) -> float:
    """Forward FLOPs of one token sampled after `context` tokens: 2 N plus its attention over all of them
    (QK^T and PV, 2 x 2 x heads x head_dim x context a layer)."""
    return 2.0 * self._dense_params() + 4.0 * self.n_layers * self.n_heads * self.head_dim * context


PRETRAINED_KEY = "pretrained"
# A job's `model` section: the GPTConfig fields, and the checkpoint to start from (empty: random initialisation).
CONFIG_SCHEMA = {**schema_of(GPTConfig), PRETRAINED_KEY: Field(
    str, has_default=True, doc="Hugging Face checkpoint directory or lwjax workdir to start from; its shape "
    "replaces the shape fields here (empty: random initialisation)")}


def _param(rngs: nnx.Rngs, shape, axes, dtype, fan_in: int | None = None, init: str = "normal"):
  if init in ("ones", "zeros"):
    value = (jnp.ones if init == "ones" else jnp.zeros)(shape, dtype)
  else:
    std = 1.0 if fan_in is None else fan_in ** -0.5
    value = (std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape)).astype(dtype)
  return nnx.Param(value, logical_axes=tuple(axes))


def dense(x, w, in_dims: int = 1):
  """x [..., *in] . w [*in, *out] -> [..., *out]: a projection contracting x's last `in_dims` dims.

  On CPU it runs as one 2-D matmul over the flattened leading (batch, length) dims: given the contraction over
  both, XLA:CPU computes the weight gradient through transposing copies that fuse their elementwise producers
  (the SwiGLU backward ran several times slower than the matmuls themselves). Elsewhere a `dot_general` over
  the same dims.
  """
  lead, out = x.shape[:x.ndim - in_dims], w.shape[in_dims:]
  if kernels.backend() == "cpu":
    size = math.prod(w.shape[:in_dims])
    return (x.reshape(-1, size) @ w.reshape(size, -1)).reshape(*lead, *out)
  contract = (tuple(range(len(lead), x.ndim)), tuple(range(in_dims)))
  return jax.lax.dot_general(x, w, (contract, ((), ())))


class RMSNorm(nnx.Module):
  """x / rms(x) * (offset + scale), in float32: Llama's (offset 0, scale initialised to 1) or Gemma's (offset 1,
  scale initialised to 0)."""

  def __init__(self, dim: int, eps: float, cfg: GPTConfig, *, rngs: nnx.Rngs):
    self.eps, self.offset = eps, cfg.norm_offset
    self.scale = _param(rngs, (dim,), ("norm",), cfg.param_dtype, init="zeros" if self.offset == 1.0 else "ones")

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(jnp.float32)
    return (y * (scale + self.offset if self.offset else scale)).astype(x.dtype)


def rope_frequencies(cfg: GPTConfig) -> jax.Array:
  """Inverse frequencies [head_dim // 2], with Llama-3.1 scaling when configured."""
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
  s = cfg.rope_scaling
  if s is None:
    return inv_freq
  low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
      s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
  return jnp.where(wavelen > low_wavelen, inv_freq / s.factor,
                   jnp.where(wavelen < high_wavelen, inv_freq, smoothed))


def apply_rope(x, positions, inv_freq):
  """Rotary embedding in the half-split layout (HF Llama's `rotate_half`). x: [b, t, h, d]; positions [b, t]."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [b, t, d/2]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Attention(nnx.Module):
  """Grouped-query attention of layer `layer` (which fixes its sliding window, if any)."""

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs, layer: int = 0):
    self.cfg = cfg
    self.window = cfg.layer_window(layer)
    d, h, kvh, hd, pd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.param_dtype
    self.wq = _param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), pd, fan_in=d)
    self.wk = _param(rngs, (d, kvh, hd), ("embed", "kv_heads", "head_dim"), pd, fan_in=d)
    self.wv = _param(rngs, (d, kvh, hd), ("embed", "kv_heads", "head_dim"), pd, fan_in=d)
    self.wo = _param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), pd, fan_in=h * hd)
    if cfg.qkv_bias:
      self.bq = _param(rngs, (h, hd), ("heads", "head_dim"), pd, init="zeros")
      self.bk = _param(rngs, (kvh, hd), ("kv_heads", "head_dim"), pd, init="zeros")
      self.bv = _param(rngs, (kvh, hd), ("kv_heads", "head_dim"), pd, init="zeros")

  def _scores(self) -> dict:
    """The score options every attention kernel takes: scale, this layer's window, soft-cap."""
    return dict(sm_scale=self.cfg.sm_scale, window=self.window, softcap=self.cfg.attn_logit_softcap)

  def _project(self, x_btd, positions_bt, inv_freq):
    dt = self.cfg.dtype
    q = dense(x_btd, self.wq[...].astype(dt))  # [b, t, heads, head_dim]
    k = dense(x_btd, self.wk[...].astype(dt))
    v = dense(x_btd, self.wv[...].astype(dt))
    if self.cfg.qkv_bias:
      q, k, v = q + self.bq[...].astype(dt), k + self.bk[...].astype(dt), v + self.bv[...].astype(dt)
    q = constrain(apply_rope(q, positions_bt, inv_freq), ("batch", "length", "heads", "head_dim"))
    k = constrain(apply_rope(k, positions_bt, inv_freq), ("batch", "length", "kv_heads", "head_dim"))
    return q, k, constrain(v, ("batch", "length", "kv_heads", "head_dim"))

  def _output(self, out_bthk):
    out = constrain(out_bthk, ("batch", "length", "heads", "head_dim"))
    return dense(out, self.wo[...].astype(self.cfg.dtype), in_dims=2)

  def __call__(self, x_btd, positions_bt, inv_freq, *, segment_ids=None, cache_kv=None, q_offset=0):
    """Returns (output [b, t, d], (k, v)): the new keys/values, or the updated cache when given one.

    With `cache_kv = (k_cache, v_cache)` ([b, kv_heads, max_len, hd]: heads before positions, so that a
    decode step's scores are a plain batched matmul over the cache, with no transposing copy), the new
    keys/values are written at `q_offset` (per sequence) and the queries attend to the whole cache causally.
    """
    dt = self.cfg.dtype
    q, k, v = self._project(x_btd, positions_bt, inv_freq)
    if cache_kv is None:
      return self._output(self._attend(q, k.astype(dt), v.astype(dt), segment_ids, q_offset)), (k, v)
    write = jax.vmap(lambda cache, new, start: jax.lax.dynamic_update_slice_in_dim(cache, new, start, 1))
    offsets = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (x_btd.shape[0],))
    # On a mesh, the cache lies as the keys and values it holds: rows as the batch, over kv heads.
    k_cache = constrain(write(cache_kv[0], jnp.swapaxes(k, 1, 2).astype(cache_kv[0].dtype), offsets), _CACHE_AXES)
    v_cache = constrain(write(cache_kv[1], jnp.swapaxes(v, 1, 2).astype(cache_kv[1].dtype), offsets), _CACHE_AXES)
    if kernels.backend() == "cpu" and self.cfg.attention_impl in ("auto", "reference"):
      out = kernels.reference.attention(q, k_cache.astype(dt), v_cache.astype(dt), segment_ids=segment_ids,
                                        q_offset=q_offset, kv_layout="bhsd", **self._scores())
    else:  # the accelerator kernels take [b, s, kv_heads, hd]
      out = self._attend(q, jnp.swapaxes(k_cache, 1, 2).astype(dt), jnp.swapaxes(v_cache, 1, 2).astype(dt),
                         segment_ids, q_offset)
    return self._output(out), (k_cache, v_cache)

  def _attend(self, q, k, v, segment_ids, q_offset):
    """`kernels.attention`, run per shard under a multi-device mesh.

    XLA cannot partition a Pallas kernel, so under a mesh the call goes through `jax.shard_map`: batch
    split as the rules say, heads split only where query and key/value heads split alike (otherwise a
    shard's GQA groups would not line up), the sequence whole.
    """
    attend = functools.partial(kernels.attention, causal=True, impl=self.cfg.attention_impl, **self._scores())
    mesh = logical.current_mesh()
    if mesh is None or mesh.size == 1:
      return attend(q, k, v, segment_ids=segment_ids, q_offset=q_offset)
    batch = logical.spec_for(("batch",), q.shape[:1])[0]
    q_heads = logical.spec_for(("heads",), q.shape[2:3])[0]
    heads = q_heads if q_heads == logical.spec_for(("kv_heads",), k.shape[2:3])[0] else None
    qkv_spec = P(batch, None, heads, None)
    # A static offset (training's 0) stays static inside: the kernel then skips, and counts, only the causal
    # blocks; a traced one (per-sequence, in decoding) is split with the batch.
    static = isinstance(q_offset, int)
    args, specs = [q, k, v], [qkv_spec, qkv_spec, qkv_spec]
    if not static:
      args.append(jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (q.shape[0],)))
      specs.append(P(batch))
    if segment_ids is not None:
      args.append(segment_ids)
      specs.append((P(batch, None),) * 2 if isinstance(segment_ids, tuple) else P(batch, None))

    def per_shard(q, k, v, *rest):
      offset, rest = (q_offset, rest) if static else (rest[0], rest[1:])
      return attend(q, k, v, segment_ids=rest[0] if rest else None, q_offset=offset)
    return jax.shard_map(per_shard, mesh=mesh, in_specs=tuple(specs), out_specs=qkv_spec,
                         check_vma=False)(*args)

  def paged(self, x_btd, positions_bt, inv_freq, pools, slots, page_table, lengths):
    """Attention over a paged KV cache; returns (output [b, t, d], updated (k_pool, v_pool)).

    pools: (k, v) [kv_heads, num_pages, page_size, hd]; slots: (page [b, t], offset [b, t]) where each
    new token's key/value goes (an out-of-range page drops the write: padding); page_table [b, pages]
    and lengths [b] (keys valid after the write) describe what the queries attend to.
    """
    (out,), pools = self.paged_groups([x_btd], [positions_bt], inv_freq, pools, [slots], [page_table], [lengths])
    return out, pools

  def paged_groups(self, xs, positions, inv_freq, pools, slots, page_tables, lengths):
    """`paged` for several groups of rows at once (e.g. decodes [b, 1] and prefill chunks [b, t]): the
    projections run once over all their tokens (one pass over the weights), attention per group. Every
    argument but `inv_freq` and `pools` is a list with one entry per group; returns ([output per group],
    pools)."""
    q, k, v = self._project(_flatten(xs), _flatten(positions), inv_freq)  # [1, n, heads, hd]
    pages = jnp.concatenate([s[0].reshape(-1) for s in slots])
    offsets = jnp.concatenate([s[1].reshape(-1) for s in slots])
    rows = tuple(x.shape[:2] for x in xs)
    out, pools = self._paged_attention(q, k, v, pools, pages, offsets, tuple(page_tables), tuple(lengths), rows)
    return _unflatten(self._output(out), xs), pools

  def _paged_attention(self, q, k, v, pools, pages, offsets, page_tables, lengths, rows):
    """Writes the new keys/values [1, n, kv_heads, hd] at their (page, offset) slots and attends per group of
    `rows` ([b, t] each); returns (out [1, n, heads, hd], (k_pool, v_pool)).

    Under a multi-device mesh it runs per shard of heads through `jax.shard_map` (XLA partitions neither the
    Pallas kernels nor the native CPU one): each shard writes and reads the pool of its own kv heads, which hold
    the keys of its query heads (heads split as kv heads split, contiguously, so GQA groups stay whole); the page
    tables, slots and lengths are whole on every shard; rows are never split (one scheduler's batch).
    """
    dt = self.cfg.dtype

    def attend(q, k, v, k_pool, v_pool, pages, offsets, page_tables, lengths):
      def write(pool, new_1nhk):
        return pool.at[:, pages, offsets].set(new_1nhk[0].swapaxes(0, 1).astype(pool.dtype), mode="drop")
      k_pool, v_pool = write(k_pool, k), write(v_pool, v)
      outs, start = [], 0
      for (b, t), table, lens in zip(rows, page_tables, lengths, strict=True):
        q_group = q[0, start:start + b * t].reshape(b, t, *q.shape[2:])
        start += b * t
        out = kernels.decode_attention(q_group, k_pool.astype(dt), v_pool.astype(dt), table, lens,
                                       impl=self.cfg.attention_impl, **self._scores())
        outs.append(out.reshape(1, b * t, *out.shape[2:]))
      return (jnp.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]), (k_pool, v_pool)

    args = (q, k, v, *pools, pages, offsets, page_tables, lengths)
    mesh = logical.current_mesh()
    if mesh is None or mesh.size == 1:
      return attend(*args)
    q_heads = logical.spec_for(("heads",), q.shape[2:3])[0]
    heads = q_heads if q_heads == logical.spec_for(("kv_heads",), k.shape[2:3])[0] else None
    qkv, pool = P(None, None, heads, None), P(heads, None, None, None)
    return jax.shard_map(attend, mesh=mesh, in_specs=(qkv, qkv, qkv, pool, pool, P(), P(), P(), P()),
                         out_specs=(qkv, (pool, pool)), check_vma=False)(*args)


def _flatten(arrays_bt):
  """[b_g, t_g, ...] arrays -> one [1, sum b_g t_g, ...] array (rows of several groups as one sequence)."""
  flat = [a.reshape(1, a.shape[0] * a.shape[1], *a.shape[2:]) for a in arrays_bt]
  return jnp.concatenate(flat, axis=1) if len(flat) > 1 else flat[0]


def _unflatten(flat_1n, like_bt):
  """Inverse of `_flatten`: split [1, n, ...] into arrays shaped like `like_bt`'s [b_g, t_g] leading dims."""
  out, start = [], 0
  for a in like_bt:
    b, t = a.shape[:2]
    out.append(flat_1n[0, start:start + b * t].reshape(b, t, *flat_1n.shape[2:]))
    start += b * t
  return out


class MLP(nnx.Module):
  """Gated MLP: down(act(gate(x)) * up(x)), SwiGLU or GeGLU (`GPTConfig.activation`)."""

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
    self.dtype, self.activation = cfg.dtype, cfg.activation
    d, f, pd = cfg.d_model, cfg.d_ff, cfg.param_dtype
    self.w_gate = _param(rngs, (d, f), ("embed", "mlp"), pd, fan_in=d)
    self.w_up = _param(rngs, (d, f), ("embed", "mlp"), pd, fan_in=d)
    self.w_down = _param(rngs, (f, d), ("mlp", "embed"), pd, fan_in=f)

  def __call__(self, x_btd):
    dt = self.dtype
    gate = dense(x_btd, self.w_gate[...].astype(dt))
    up = dense(x_btd, self.w_up[...].astype(dt))
    act = jax.nn.silu(gate) if self.activation == "silu" else jax.nn.gelu(gate, approximate=True)
    h = constrain(act * up, ("batch", "length", "mlp"))
    return dense(h, self.w_down[...].astype(dt))


def embed_tokens(model, cfg: GPTConfig, tokens_bt):
  """[b, t] ids -> [b, t, d] embeddings of `model.embed` (a GPT or a model with its embedding, e.g. a hybrid)."""
  x = jnp.take(model.embed[...], tokens_bt, axis=0).astype(cfg.dtype)
  if cfg.embed_scale:  # Gemma rounds the factor to the compute dtype first
    x = x * jnp.asarray(cfg.d_model ** 0.5, cfg.dtype)
  return constrain(x, ("batch", "length", "embed"))


def output_logits(model, cfg: GPTConfig, x_btd):
  """Final norm and the LM head (the tied embedding or `model.lm_head`): float32 logits [b, t, vocab]."""
  head = model.embed[...].T if cfg.tie_embeddings else model.lm_head[...]
  logits = dense(model.final_norm(x_btd), head.astype(cfg.dtype)).astype(jnp.float32)
  if cfg.final_logit_softcap is not None:
    logits = cfg.final_logit_softcap * jnp.tanh(logits / cfg.final_logit_softcap)
  return constrain(logits, ("batch", "length", "vocab"))


class Block(nnx.Module):
  """Layer `layer`: x + attn(norm(x)), then + mlp(norm(x)); with `post_norms`, each output normed too."""

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs, layer: int = 0):
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs, layer=layer)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)
    self.post_norms = cfg.post_norms
    if cfg.post_norms:
      self.attn_post_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg, rngs=rngs)
      self.mlp_post_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg, rngs=rngs)

  def __call__(self, x, positions, inv_freq, segment_ids=None, cache_kv=None, q_offset=0):
    h, kv = self.attn(self.attn_norm(x), positions, inv_freq, segment_ids=segment_ids,
                      cache_kv=cache_kv, q_offset=q_offset)
    return self._mlp_residual(x, h), kv

  def paged(self, x, positions, inv_freq, pools, slots, page_table, lengths):
    h, pools = self.attn.paged(self.attn_norm(x), positions, inv_freq, pools, slots, page_table, lengths)
    return self._mlp_residual(x, h), pools

  def paged_groups(self, xs, positions, inv_freq, pools, slots, page_tables, lengths):
    """`paged` for several groups of rows (`Attention.paged_groups`): the MLP runs once over all tokens."""
    hs, pools = self.attn.paged_groups([self.attn_norm(x) for x in xs], positions, inv_freq, pools, slots,
                                       page_tables, lengths)
    return _unflatten(self._mlp_residual(_flatten(xs), _flatten(hs)), xs), pools

  def _mlp_residual(self, x, attn_out):
    if self.post_norms:
      attn_out = self.attn_post_norm(attn_out)
    x = constrain(x + attn_out, ("batch", "length", "embed"))
    mlp_out = self.mlp(self.mlp_norm(x))
    if self.post_norms:
      mlp_out = self.mlp_post_norm(mlp_out)
    return constrain(x + mlp_out, ("batch", "length", "embed"))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Keys/values, one `[batch, kv_heads, max_len, head_dim]` array per layer, and fill `lengths [batch]`.

  Per-layer arrays rather than one stacked array: a decode step then writes each layer's new key in place
  and attends to that layer's buffer directly, where a stacked cache is sliced and re-stacked every step
  (a copy of the whole cache per token: decoding at max_len 384 ran 7x slower than at 64 on CPU).
  """
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  lengths: jax.Array

  @property
  def max_len(self) -> int:
    return self.k[0].shape[2]

  def map_batch(self, fn) -> KVCache:
    """`fn` applied along the batch axis of every array (e.g. `lambda a: jnp.repeat(a, n, axis=0)`)."""
    return KVCache(tuple(map(fn, self.k)), tuple(map(fn, self.v)), fn(self.lengths))


class GPT(nnx.Module):
  """The decoder. `__call__` is the training forward; `prefill`/`decode_step` use a `KVCache`."""

  def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.param_dtype)
    if cfg.scan_layers:  # one Block holding every layer's parameters on a leading axis
      self.layers = layer_stack.stacked_blocks(cfg, rngs)
    else:
      self.layers = nnx.List([Block(cfg, rngs=rngs, layer=i) for i in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.param_dtype,
                            fan_in=cfg.d_model)

  def gpt_config(self) -> GPTConfig:
    """The transformer's shape (the same method on a hybrid and on models wrapping a GPT)."""
    return self.cfg

  def _logits(self, x_btd):
    return output_logits(self, self.cfg, x_btd)

  def _embed(self, tokens_bt):
    return embed_tokens(self, self.cfg, tokens_bt)

  def blocks(self) -> list[Block]:
    """The per-layer blocks in order (with `scan_layers`, views reading slices of the stack)."""
    return layer_stack.layer_views(self.layers, self.cfg) if self.cfg.scan_layers else list(self.layers)

  def _block_fn(self):
    """The per-layer function, rematerialised in the backward pass as configured."""
    def run(block, x, positions, inv_freq, segment_ids):
      return block(x, positions, inv_freq, segment_ids)[0]
    if self.cfg.remat == "full":
      return nnx.remat(run)
    if self.cfg.remat == "dots":
      return nnx.remat(run, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    return run

  def __call__(self, tokens_bt, *, positions_bt=None, segment_ids_bt=None):
    """Training forward: logits [b, t, vocab] (float32). Packed sequences pass positions and segment ids."""
    return self._logits(self.hidden(tokens_bt, positions_bt=positions_bt, segment_ids_bt=segment_ids_bt))

  def hidden(self, tokens_bt, *, positions_bt=None, segment_ids_bt=None):
    """The last block's output [b, t, d] (before the final norm): what heads other than the LM head read."""
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
    inv_freq = rope_frequencies(self.cfg)
    x = self._embed(tokens_bt)
    if self.cfg.scan_layers:
      return layer_stack.scan_blocks(self.layers, self.cfg, x, positions_bt, inv_freq, segment_ids_bt)
    run = self._block_fn()
    for block in self.layers:
      x = run(block, x, positions_bt, inv_freq, segment_ids_bt)
    return x

  def init_cache(self, batch: int, max_len: int | None = None, dtype=None) -> KVCache:
    cfg = self.cfg
    max_len = max_len or cfg.max_seq_len
    shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
    dtype = dtype or cfg.dtype
    return KVCache(tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)),
                   tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)), jnp.zeros((batch,), jnp.int32))

  def prefill(self, tokens_bt, cache: KVCache, num_new=None, kv_start=None):
    """Appends `tokens_bt` to the cache at each sequence's current length; returns (logits, cache).

    Calling it on successive chunks is chunked prefill. `num_new [b]` (default: all t) lets sequences of
    a ragged batch advance by fewer tokens; their right padding is written past the new length, where
    causal masking hides it until later tokens overwrite it. `kv_start [b]` hides the cache positions
    before it from every query (a left-padded batch: its padding is never attended to; RoPE scores depend
    on relative positions only, so the real tokens see what they would see unpadded). The caller keeps
    `lengths + t <= max_len` (a traced length cannot be checked here; past the end, writes would clamp
    onto the last slots).
    """
    batch, t = tokens_bt.shape
    if t > cache.max_len:
      raise ValueError(f"prefill of {t} tokens does not fit a KV cache of max_len {cache.max_len}")
    start = cache.lengths
    positions = start[:, None] + jnp.arange(t)[None, :]
    inv_freq = rope_frequencies(self.cfg)
    x = self._embed(tokens_bt)
    segment_ids = None
    if kv_start is not None:  # query segment 1; keys before kv_start segment 0
      kv_start = jnp.asarray(kv_start, jnp.int32)
      segment_ids = (jnp.ones((batch, t), jnp.int32),
                     (jnp.arange(cache.max_len)[None, :] >= kv_start[:, None]).astype(jnp.int32))
    new_k, new_v = [], []
    for i, block in enumerate(self.blocks()):
      x, (k, v) = block(x, positions, inv_freq, segment_ids=segment_ids, cache_kv=(cache.k[i], cache.v[i]),
                        q_offset=start)
      new_k.append(k)
      new_v.append(v)
    advance = jnp.full((batch,), t, jnp.int32) if num_new is None else jnp.asarray(num_new, jnp.int32)
    return self._logits(x), KVCache(tuple(new_k), tuple(new_v), start + advance)

  def paged_step(self, tokens_bt, k_pools, v_pools, slots, page_table, lengths, nano_batches: int = 1,
                 last_only: bool = False):
    """One serving iteration over a paged cache: decodes and prefill chunks in one dense batch.

    Rows are left-padded to t tokens, so row b's real tokens end at column t - 1 at absolute position
    lengths[b] - 1; padding columns write nowhere (their slot page is out of range) and their outputs
    are ignored. k_pools, v_pools: tuples of per-layer pools [kv_heads, num_pages, page_size, hd] (each
    written in place when the caller donates it); slots: (page, offset) [b, t]; page_table [b, pages]
    (any width that covers every row's pages); lengths [b] after this step. Returns (logits [b, t, vocab],
    or [b, 1, vocab] for the last column only when `last_only`, k_pools, v_pools).

    `nano_batches` > 1 splits the rows into that many nano-batches run layer by layer in turn (NanoFlow
    §3), so the scheduler may overlap one nano-batch's projections with another's attention; the
    result is the same.
    """
    b, t = tokens_bt.shape
    if b % nano_batches:
      raise ValueError(f"batch of {b} rows does not split into {nano_batches} nano-batches")
    if len(k_pools) != self.cfg.n_layers or len(v_pools) != self.cfg.n_layers:
      raise ValueError(f"k_pools/v_pools: {len(k_pools)}/{len(v_pools)} per-layer pools for a model of "
                       f"{self.cfg.n_layers} layers")
    positions = jnp.maximum(lengths[:, None] - t + jnp.arange(t)[None, :], 0)
    inv_freq = rope_frequencies(self.cfg)
    xs = jnp.split(self._embed(tokens_bt), nano_batches)
    per_row = (positions, slots[0], slots[1], page_table, lengths)
    # Per nano-batch: (positions, slot pages, slot offsets, page table, lengths).
    parts = list(zip(*(jnp.split(a, nano_batches) for a in per_row), strict=False))
    new_k, new_v = [], []
    for i, block in enumerate(self.blocks()):
      pools = (k_pools[i], v_pools[i])
      for n, (pos, pages, offsets, table, lens) in enumerate(parts):
        xs[n], pools = block.paged(xs[n], pos, inv_freq, pools, (pages, offsets), table, lens)
      new_k.append(pools[0])
      new_v.append(pools[1])
    x = jnp.concatenate(xs)
    return self._logits(x[:, -1:] if last_only else x), tuple(new_k), tuple(new_v)

  def paged_step_groups(self, groups, k_pools, v_pools):
    """`paged_step` for several groups of rows in one pass over the weights (vLLM-style mixed batches: the
    decodes [b, 1] and the prefill chunks [b, t] of one iteration). `groups`: (tokens [b, t], slots, page_table,
    lengths) per group, each laid out as for `paged_step`. Returns ([last-column logits [b, vocab] per group],
    k_pools, v_pools)."""
    inv_freq = rope_frequencies(self.cfg)
    xs = [self._embed(tokens) for tokens, *_ in groups]
    positions = [jnp.maximum(lens[:, None] - t.shape[1] + jnp.arange(t.shape[1])[None, :], 0)
                 for t, _, _, lens in groups]
    slots = [g[1] for g in groups]
    tables = [g[2] for g in groups]
    lengths = [g[3] for g in groups]
    new_k, new_v = [], []
    for i, block in enumerate(self.blocks()):
      xs, pools = block.paged_groups(xs, positions, inv_freq, (k_pools[i], v_pools[i]), slots, tables, lengths)
      new_k.append(pools[0])
      new_v.append(pools[1])
    last = jnp.concatenate([x[:, -1] for x in xs])[None]  # [1, sum b_g, d]
    logits = self._logits(last)[0]
    splits = list(itertools.accumulate(x.shape[0] for x in xs))[:-1]
    return jnp.split(logits, splits), tuple(new_k), tuple(new_v)

  def decode_step(self, tokens_b, cache: KVCache, kv_start=None):
    """One token per sequence: returns (logits [b, vocab], cache). `kv_start` as for `prefill`."""
    logits, cache = self.prefill(tokens_b[:, None], cache, kv_start=kv_start)
    return logits[:, 0], cache


def load_hf_checkpoint(path, **overrides):
  """Reads a Hugging Face checkpoint directory (config.json + *.safetensors) of a supported family into a `GPT`."""
  from lwjax.models import hf_checkpoint
  return hf_checkpoint.load(path, **overrides)
