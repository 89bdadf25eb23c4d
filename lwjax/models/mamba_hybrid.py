"""Hybrid Mamba / attention GPTs distilled from a trained GPT (The Mamba in the Llama, arXiv 2408.15237, Sec. 2-3).

Linear attention without the softmax, y_t = sum_s (q_t . k_s) v_s, is a state space model with no decay:
h_t = h_{t-1} + k_t v_t^T, y_t = h_t^T q_t. The paper turns a trained attention layer into a Mamba-2 mixer by
reading that correspondence as an initialisation: V -> x, K -> B, Q -> C, O -> the output projection (x and
B at the KV width under GQA, repeated to the query heads as attention does), and new parameters for what
linear attention lacks: the per-head decay A (log-uniform A in [1, 16], Mamba-2's initialisation), the step
dt (a projection from the input plus a bias that is the inverse softplus of a log-uniform dt in [0.001, 0.1]),
the skip D (ones), the causal depthwise convolution over x, B, C (width 4, with SiLU), and the output gate z
with a per-head gated RMSNorm (norm(y * silu(z))). Heads = the attention's query heads, head dim = state
size = the attention's head dim, as the paper's Mamba-2 variant. The MLPs, norms, embeddings and the
attention layers that stay are copied from the teacher (`HybridGPT.from_teacher`).

`HybridGPT` is a GPT whose layers in `mamba_layers` use the mixer. Training runs the chunked SSD scan
(`lwjax.kernels.ssd`, `impl="auto"`: Pallas on TPU/GPU, the reference on CPU); decoding keeps, per Mamba
layer, the convolution's last inputs and the SSM state next to the KV cache of the attention layers
(`HybridCache`), and advances them with the multi-step state update (`lwjax.kernels.selective_state_update`),
whose `accepted` argument is what speculative decoding's verification needs (Sec. 4). Every parameter has
logical axes, so a hybrid shards like the GPT.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lwjax import kernels
from lwjax.config import ConfigError, option, schema_of
from lwjax.models import gpt, logical
from lwjax.models.gpt import GPTConfig, dense
from lwjax.models.logical import constrain
from lwjax.training import checkpoint

_BTHP = ("batch", "length", "heads", "head_dim")
# The axes a Mamba kernel's operands are split over on a mesh: batch rows and heads only (never the sequence,
# which the scan runs along, nor a head's channels).
_BTH_ = ("batch", None, "heads", None)  # x, B, C grouped to the heads: [b, t, h, p or n]
_BTH = ("batch", None, "heads")  # dt [b, t, h]
_H = ("heads",)  # A, D [h]
_STATE = ("batch", "heads", None, None)  # SSM state [b, h, p, n]


@dataclasses.dataclass(frozen=True)
class HybridConfig:
  """A GPT shape plus which layers are Mamba mixers and how those are initialised."""
  gpt: GPTConfig
  mamba_layers: tuple[int, ...] = option((), doc="indices of the layers whose attention becomes a Mamba mixer")
  d_conv: int = option(4, min=1, doc="width of the causal depthwise convolution over x, B, C")
  dt_min: float = option(0.001, min=1e-6)
  dt_max: float = option(0.1, min=1e-6)
  dt_init_floor: float = option(1e-4, min=0.0)
  a_init_min: float = option(1.0, min=1e-6, doc="A is drawn uniformly from [a_init_min, a_init_max]")
  a_init_max: float = option(16.0, min=1e-6)
  chunk_size: int = option(64, min=1, doc="chunk of the SSD scan in training and prefill")
  scan_impl: str = option("auto", choices=kernels.IMPLS)

  def __post_init__(self):
    object.__setattr__(self, "mamba_layers", tuple(sorted(set(int(i) for i in self.mamba_layers))))
    bad = [i for i in self.mamba_layers if not 0 <= i < self.gpt.n_layers]
    if bad:
      raise ValueError(f"mamba_layers {bad} are not layers of a {self.gpt.n_layers}-layer GPT")
    if self.dt_min > self.dt_max or self.a_init_min > self.a_init_max:
      raise ValueError("dt_min <= dt_max and a_init_min <= a_init_max are required")

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> HybridConfig:
    d = dict(d)
    return cls(**{**d, "gpt": GPTConfig.from_dict(d["gpt"]), "mamba_layers": tuple(d.get("mamba_layers", ()))})

  def to_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "gpt": self.gpt.to_dict(), "mamba_layers": list(self.mamba_layers)}

  @property
  def attention_layers(self) -> tuple[int, ...]:
    return tuple(i for i in range(self.gpt.n_layers) if i not in self.mamba_layers)


CONFIG_SCHEMA = schema_of(HybridConfig)


def every_other_layer(n_layers: int, attention_fraction: float) -> tuple[int, ...]:
  """The Mamba layers that keep `attention_fraction` of `n_layers` as attention, spread evenly (the paper keeps
  attention in every 2nd layer at 50%, every 4th at 25%, ...). 0 makes every layer Mamba."""
  keep = round(n_layers * attention_fraction)
  if keep <= 0:
    return tuple(range(n_layers))
  stride = n_layers / keep
  attention = {min(n_layers - 1, int(math.floor(j * stride + stride - 1))) for j in range(keep)}
  return tuple(i for i in range(n_layers) if i not in attention)


def _uniform(rngs, shape, low, high):
  return jax.random.uniform(rngs.params(), shape, jnp.float32, low, high)


def _per_shard(fn, args, axes, out_axes):
  """`fn(*args)`, run per shard under a multi-device mesh: XLA cannot partition a Pallas kernel, so each operand is
  split as the installed rules split its logical `axes` (rows and heads: a head's scan needs no other head), the
  rest whole on each shard. `out_axes` name the outputs' axes, each shaped like the operand of the same axes."""
  mesh = logical.current_mesh()
  if mesh is None or mesh.size == 1:
    return fn(*args)
  shapes = {a: arg.shape for a, arg in zip(axes, args, strict=True)}
  in_specs = tuple(logical.spec_for(a, arg.shape) for a, arg in zip(axes, args, strict=True))
  out_specs = tuple(logical.spec_for(a, shapes[a]) for a in out_axes)
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)


class MambaMixer(nnx.Module):
  """A Mamba-2 mixer whose x, B, C and output projections have the shapes of an attention layer's V, K, Q, O."""

  def __init__(self, cfg: HybridConfig, *, rngs: nnx.Rngs):
    g = cfg.gpt
    self.cfg = cfg
    d, h, kvh, p, pd = g.d_model, g.n_heads, g.n_kv_heads, g.head_dim, g.param_dtype
    param = gpt._param
    self.w_x = param(rngs, (d, kvh, p), ("embed", "kv_heads", "head_dim"), pd, fan_in=d)  # <- V
    self.w_b = param(rngs, (d, kvh, p), ("embed", "kv_heads", "head_dim"), pd, fan_in=d)  # <- K
    self.w_c = param(rngs, (d, h, p), ("embed", "heads", "head_dim"), pd, fan_in=d)  # <- Q
    self.w_o = param(rngs, (h, p, d), ("heads", "head_dim", "embed"), pd, fan_in=h * p)  # <- O
    self.w_z = param(rngs, (d, h, p), ("embed", "heads", "head_dim"), pd, fan_in=d)
    self.w_dt = param(rngs, (d, h), ("embed", "heads"), pd, fan_in=d)
    # PyTorch's Conv1d default: uniform(+-1/sqrt(fan_in)), fan_in = kernel width for a depthwise conv.
    bound = cfg.d_conv ** -0.5

    def conv(heads):
      return nnx.Param(_uniform(rngs, (cfg.d_conv, heads, p), -bound, bound).astype(pd),
                       logical_axes=("conv_width", "kv_heads" if heads == kvh else "heads", "head_dim"))

    def conv_bias(heads):
      return nnx.Param(_uniform(rngs, (heads, p), -bound, bound).astype(pd),
                       logical_axes=("kv_heads" if heads == kvh else "heads", "head_dim"))
    self.conv_x, self.conv_b, self.conv_c = conv(kvh), conv(kvh), conv(h)
    self.conv_x_bias, self.conv_b_bias, self.conv_c_bias = conv_bias(kvh), conv_bias(kvh), conv_bias(h)
    log_dt = _uniform(rngs, (h,), math.log(cfg.dt_min), math.log(cfg.dt_max))
    dt = jnp.maximum(jnp.exp(log_dt), cfg.dt_init_floor)
    self.dt_bias = nnx.Param(dt + jnp.log(-jnp.expm1(-dt)), logical_axes=("heads",))  # inverse softplus
    self.a_log = nnx.Param(jnp.log(_uniform(rngs, (h,), cfg.a_init_min, cfg.a_init_max)), logical_axes=("heads",))
    self.d_skip = nnx.Param(jnp.ones((h,), jnp.float32), logical_axes=("heads",))
    self.norm = nnx.Param(jnp.ones((h, p), pd), logical_axes=("heads", "head_dim"))

  # -- pieces shared by the scan (training, prefill) and the recurrent (decode) paths --

  def _inputs(self, x_btd):
    """Projections: (xs, B [b, t, kvh, p], C, z [b, t, h, p], dt [b, t, h] before the softplus)."""
    dt_ = self.cfg.gpt.dtype

    def proj(w):
      return dense(x_btd, w[...].astype(dt_))
    return proj(self.w_x), proj(self.w_b), proj(self.w_c), proj(self.w_z), proj(self.w_dt)

  def _conv(self, xbc, conv_state):
    """Causal depthwise conv + SiLU of (xs, B, C) continuing from `conv_state` (the last d_conv - 1 inputs of
    each, [b, d_conv - 1, heads, p]). Returns the three outputs and the inputs with the state prepended."""
    outs, full = [], []
    for seq, prev, w, bias in zip(xbc, conv_state, (self.conv_x, self.conv_b, self.conv_c),
                                  (self.conv_x_bias, self.conv_b_bias, self.conv_c_bias), strict=True):
      padded = jnp.concatenate([prev.astype(seq.dtype), seq], axis=1)  # [b, k - 1 + t, heads, p]
      t, k = seq.shape[1], self.cfg.d_conv
      kernel = w[...].astype(seq.dtype)
      y = sum(padded[:, j:j + t] * kernel[j] for j in range(k)) + bias[...].astype(seq.dtype)
      outs.append(jax.nn.silu(y))
      full.append(padded)
    return outs, full

  def _groups(self, a_bthp):
    """[b, t, kvh, p] -> [b, t, h, p]: each KV head serves its group of query heads (GQA)."""
    g = self.cfg.gpt
    return jnp.repeat(a_bthp, g.n_heads // g.n_kv_heads, axis=2)

  def _output(self, y_bthp, z_bthp):
    """Gated per-head RMSNorm, norm(y * silu(z)) (Mamba-2's norm_before_gate=False), then the O projection."""
    g = self.cfg.gpt
    y = y_bthp.astype(jnp.float32) * jax.nn.silu(z_bthp.astype(jnp.float32))
    y = y * jax.lax.rsqrt(jnp.mean(y * y, axis=-1, keepdims=True) + g.norm_eps)
    y = (y * self.norm[...].astype(jnp.float32)).astype(g.dtype)
    return dense(constrain(y, _BTHP), self.w_o[...].astype(g.dtype), in_dims=2)

  def _dt(self, dt_raw_bth, valid_bt):
    """softplus(dt + bias) [b, t, h] float32, 0 at padding steps (a zero step leaves the state unchanged)."""
    dt = jax.nn.softplus(dt_raw_bth.astype(jnp.float32) + self.dt_bias[...])
    return dt if valid_bt is None else dt * valid_bt[..., None]

  # The logical axes of `init_state`'s arrays: the conv states of x, B (kv heads) and C (heads), the SSM state.
  STATE_AXES = ((("batch", None, "kv_heads", None),) * 2 + (("batch", None, "heads", None),), _STATE)

  def init_state(self, batch: int, dtype=jnp.float32):
    """(conv state: three [b, d_conv - 1, heads, p] arrays for x, B, C; SSM state [b, h, p, n=p] float32)."""
    g = self.cfg.gpt
    k = self.cfg.d_conv - 1
    conv = tuple(jnp.zeros((batch, k, heads, g.head_dim), dtype) for heads in (g.n_kv_heads, g.n_kv_heads,
                                                                                g.n_heads))
    return conv, jnp.zeros((batch, g.n_heads, g.head_dim, g.head_dim), jnp.float32)

  def __call__(self, x_btd, state=None, num_new=None):
    """The scan path: x [b, t, d] -> (y [b, t, d], new state). `state` continues a sequence (chunked prefill);
    `num_new [b]` advances row b by its first num_new[b] tokens only (right padding after them is ignored)."""
    b, t, _ = x_btd.shape
    if state is None:
      state = self.init_state(b, x_btd.dtype)
    conv_state, ssm_state = state
    xs, bs, cs, z, dt_raw = self._inputs(x_btd)
    (xs, bs, cs), full = self._conv((xs, bs, cs), conv_state)
    valid = None if num_new is None else (jnp.arange(t)[None, :] < jnp.asarray(num_new)[:, None]).astype(
        jnp.float32)
    a = -jnp.exp(self.a_log[...])
    y, ssm_state = self._ssd(self._groups(xs), self._dt(dt_raw, valid), a, self._groups(bs), cs, ssm_state)
    return self._output(y, z), (self._next_conv_state(full, num_new, t), ssm_state)

  def _ssd(self, x, dt, a, b, c, h0):
    """`kernels.ssd` over x [b, t, h, p] (B, C grouped to the heads) -> (y like x, final state [b, h, p, n])."""
    def ssd(x, dt, a, b, c, d, h0):
      return kernels.ssd(x, dt, a, b, c, D=d, dt_softplus=False, initial_state=h0, return_state=True,
                         chunk_size=self.cfg.chunk_size, impl=self.cfg.scan_impl)
    return _per_shard(ssd, (x, dt, a, b, c, self.d_skip[...], h0),
                      (_BTH_, _BTH, _H, _BTH_, _BTH_, _H, _STATE), (_BTH_, _STATE))

  def _next_conv_state(self, full, num_new, t):
    """The last d_conv - 1 real inputs of each of x, B, C: positions [n, n + k - 1) of the padded sequence."""
    k = self.cfg.d_conv - 1
    if num_new is None:
      return tuple(f[:, t:] for f in full)
    starts = jnp.asarray(num_new, jnp.int32)
    return tuple(jax.vmap(lambda f_, s: jax.lax.dynamic_slice_in_dim(f_, s, k, axis=0))(f, starts) for f in full)

  def step(self, x_bkd, state, accepted=None):
    """The recurrent path over k new tokens (decoding, speculative verification): -> (y [b, k, d], state after
    `accepted [b]` of the k tokens, all k by default). Equal to `__call__` on the same tokens."""
    b, k_new, _ = x_bkd.shape
    conv_state, ssm_state = state
    xs, bs, cs, z, dt_raw = self._inputs(x_bkd)
    (xs, bs, cs), full = self._conv((xs, bs, cs), conv_state)
    kept = jnp.broadcast_to(jnp.asarray(k_new if accepted is None else accepted, jnp.int32), (b,))
    args = (ssm_state, self._groups(xs), self._dt(dt_raw, None), -jnp.exp(self.a_log[...]), self._groups(bs), cs,
            self.d_skip[...])
    axes = (_STATE, _BTH_, _BTH, _H, _BTH_, _BTH_, _H)
    if accepted is not None:
      args, axes = (*args, kept), (*axes, ("batch",))
    y, ssm_state = _per_shard(self._state_update, args, axes, (_BTH_, _STATE))
    return self._output(y, z), (self._next_conv_state(full, kept, k_new), ssm_state)

  def _state_update(self, state_bhpn, x_bkhp, dt_bkh, a_h, b_bkhn, c_bkhn, d_h, accepted_b=None):
    """`kernels.selective_state_update` of per-head states: heads x head dim flattened to the kernel's channels,
    A, dt and D repeated over a head's channels."""
    b, k, h, p = x_bkhp.shape
    n = state_bhpn.shape[-1]
    y, state = kernels.selective_state_update(
        state_bhpn.reshape(b, h * p, n), x_bkhp.reshape(b, k, h * p), jnp.repeat(dt_bkh, p, axis=-1),
        jnp.repeat(a_h, p)[:, None] * jnp.ones((1, n), jnp.float32), b_bkhn, c_bkhn, D=jnp.repeat(d_h, p),
        dt_softplus=False, accepted=accepted_b, impl=self.cfg.scan_impl)
    return y.reshape(b, k, h, p), state.reshape(b, h, p, n)

  def init_from_attention(self, attn: gpt.Attention) -> None:
    """V -> x, K -> B, Q -> C, O -> output projection (Sec. 2.2); the rest keeps its Mamba initialisation."""
    self.w_x[...] = attn.wv[...]
    self.w_b[...] = attn.wk[...]
    self.w_c[...] = attn.wq[...]
    self.w_o[...] = attn.wo[...]


class MambaBlock(nnx.Module):
  """A GPT block whose attention is a `MambaMixer`: norm, mixer, residual; norm, MLP, residual."""

  def __init__(self, cfg: HybridConfig, *, rngs: nnx.Rngs):
    g = cfg.gpt
    self.attn_norm = gpt.RMSNorm(g.d_model, g.norm_eps, g, rngs=rngs)
    self.mixer = MambaMixer(cfg, rngs=rngs)
    self.mlp_norm = gpt.RMSNorm(g.d_model, g.norm_eps, g, rngs=rngs)
    self.mlp = gpt.MLP(g, rngs=rngs)

  def _mlp_residual(self, x, mixed):
    x = constrain(x + mixed, ("batch", "length", "embed"))
    return constrain(x + self.mlp(self.mlp_norm(x)), ("batch", "length", "embed"))

  def __call__(self, x, state=None, num_new=None):
    h, state = self.mixer(self.attn_norm(x), state, num_new)
    return self._mlp_residual(x, h), state

  def step(self, x, state, accepted=None):
    h, state = self.mixer.step(self.attn_norm(x), state, accepted)
    return self._mlp_residual(x, h), state


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class HybridCache:
  """Decoding state of a hybrid: a KV cache per attention layer, (conv, SSM) state per Mamba layer, `lengths`.

  `kv[i]` is None for a Mamba layer, `ssm[i]` None for an attention layer (tuples indexed by layer).
  """
  kv: tuple[Any, ...]
  ssm: tuple[Any, ...]
  lengths: jax.Array

  @property
  def max_len(self) -> int:
    """The KV caches' length; unbounded (2**31 - 1) for a hybrid with no attention layer."""
    lengths = [kv[0].shape[2] for kv in self.kv if kv is not None]
    return lengths[0] if lengths else 2 ** 31 - 1

  def map_batch(self, fn) -> HybridCache:
    """`fn` applied along the batch axis of every array (e.g. repeating a prefilled prompt for N samples)."""
    return HybridCache(jax.tree.map(fn, self.kv), jax.tree.map(fn, self.ssm), fn(self.lengths))


class HybridGPT(nnx.Module):
  """A GPT whose `cfg.mamba_layers` are Mamba mixers. Same interface as `GPT`: `__call__` (training forward),
  `hidden`, `init_cache`, `prefill`, `decode_step`; plus `verify` for speculative decoding."""

  def __init__(self, cfg: HybridConfig, *, rngs: nnx.Rngs):
    g = cfg.gpt
    self.cfg, self.gpt_cfg = cfg, g
    self.embed = gpt._param(rngs, (g.vocab_size, g.d_model), ("vocab", "embed"), g.param_dtype)
    self.layers = nnx.List([MambaBlock(cfg, rngs=rngs) if i in cfg.mamba_layers else gpt.Block(g, rngs=rngs, layer=i)
                            for i in range(g.n_layers)])
    self.final_norm = gpt.RMSNorm(g.d_model, g.norm_eps, g, rngs=rngs)
    if not g.tie_embeddings:
      self.lm_head = gpt._param(rngs, (g.d_model, g.vocab_size), ("embed", "vocab"), g.param_dtype,
                                fan_in=g.d_model)

  def gpt_config(self) -> gpt.GPTConfig:
    """The shape of the GPT whose layers this hybrid keeps or replaces."""
    return self.gpt_cfg

  @classmethod
  def from_teacher(cls, teacher: gpt.GPT, cfg: HybridConfig, *, rngs: nnx.Rngs, attention_init: bool = True):
    """A hybrid whose embeddings, norms, MLPs and kept attention layers are the teacher's; its Mamba mixers
    initialised from the teacher's attention at the same layer (or, `attention_init=False`, left random: the
    paper's baseline)."""
    if dataclasses.replace(teacher.cfg, scan_layers=cfg.gpt.scan_layers) != cfg.gpt:  # either layout
      raise ConfigError("model.gpt", "differs from the teacher's GPT config", f"the teacher's: {teacher.cfg}")
    model = cls(cfg, rngs=rngs)
    model.embed[...] = teacher.embed[...]
    model.final_norm.scale[...] = teacher.final_norm.scale[...]
    if not cfg.gpt.tie_embeddings:
      model.lm_head[...] = teacher.lm_head[...]
    for i, (mine, theirs) in enumerate(zip(model.layers, teacher.blocks(), strict=True)):
      if i in cfg.mamba_layers:
        for name in ("attn_norm", "mlp_norm", "mlp"):
          nnx.update(getattr(mine, name), nnx.state(getattr(theirs, name)))
        if attention_init:
          mine.mixer.init_from_attention(theirs.attn)
      else:
        nnx.update(mine, nnx.state(theirs))
    return model

  def _logits(self, x_btd):
    return gpt.output_logits(self, self.gpt_cfg, x_btd)

  def _embed(self, tokens_bt):
    return gpt.embed_tokens(self, self.gpt_cfg, tokens_bt)

  def hidden(self, tokens_bt, *, positions_bt=None, segment_ids_bt=None):
    """The last block's output [b, t, d]. Packed sequences (segment ids) are not supported by the Mamba layers."""
    if segment_ids_bt is not None and self.cfg.mamba_layers:
      raise ValueError("a hybrid with Mamba layers trains on unpacked rows (segment_ids_bt must be None)")
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
    inv_freq = gpt.rope_frequencies(self.gpt_cfg)
    x = self._embed(tokens_bt)
    for block in self.layers:
      mamba = isinstance(block, MambaBlock)
      x = block(x)[0] if mamba else block(x, positions_bt, inv_freq, segment_ids_bt)[0]
    return x

  def __call__(self, tokens_bt, *, positions_bt=None, segment_ids_bt=None):
    return self._logits(self.hidden(tokens_bt, positions_bt=positions_bt, segment_ids_bt=segment_ids_bt))

  def init_cache(self, batch: int, max_len: int | None = None, dtype=None) -> HybridCache:
    g = self.gpt_cfg
    max_len = max_len or g.max_seq_len
    dtype = dtype or g.dtype
    shape = (batch, g.n_kv_heads, max_len, g.head_dim)
    kv = tuple(None if isinstance(block, MambaBlock) else (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
               for block in self.layers)
    ssm = tuple(block.mixer.init_state(batch, dtype) if isinstance(block, MambaBlock) else None
                for block in self.layers)
    return HybridCache(kv, ssm, jnp.zeros((batch,), jnp.int32))

  def prefill(self, tokens_bt, cache: HybridCache, num_new=None):
    """Appends `tokens_bt` to every sequence (chunked prefill when called repeatedly): -> (logits, cache).

    `num_new [b]` advances row b by its first num_new[b] tokens (right padding after them writes KV past the
    new length, hidden by causal masking, and leaves the Mamba states untouched)."""
    return self._advance(tokens_bt, cache, num_new, recurrent=False)

  def decode_step(self, tokens_b, cache: HybridCache):
    """One token per sequence through the recurrent path: -> (logits [b, vocab], cache)."""
    logits, cache = self.verify(tokens_b[:, None], cache)
    return logits[:, 0], cache

  def verify(self, tokens_bk, cache: HybridCache, accepted=None):
    """k tokens per sequence in one pass (speculative verification, Sec. 4): -> (logits [b, k, vocab], cache
    advanced by `accepted [b]` tokens, all k by default).

    The Mamba layers advance their state from the checkpointed one and keep the state after the accepted
    tokens only; the attention layers write all k keys/values, and those past the accepted ones are hidden by
    the shorter length and overwritten by the next tokens."""
    return self._advance(tokens_bk, cache, accepted, recurrent=True)

  # -- serving (lwjax.serving.engine): paged KV for the attention layers, per-slot states for the Mamba ones --

  @property
  def attention_layers(self) -> tuple[int, ...]:
    return tuple(i for i, block in enumerate(self.layers) if not isinstance(block, MambaBlock))

  def init_slot_states(self, num_slots: int, dtype=None) -> tuple[Any, ...]:
    """Recurrent state pools for serving: per layer, None (attention) or the (conv, SSM) state of `num_slots`
    sequences (`MambaMixer.init_state` with the slots as the batch)."""
    dtype = dtype or self.gpt_cfg.dtype
    return tuple(block.mixer.init_state(num_slots, dtype) if isinstance(block, MambaBlock) else None
                 for block in self.layers)

  def slot_state_axes(self) -> tuple[Any, ...]:
    """The logical axes of `init_slot_states`' arrays, per layer (the slots on the batch axis): where a mesh puts
    them (`lwjax.serving.tensor_parallel`: over heads)."""
    return tuple(MambaMixer.STATE_AXES if isinstance(block, MambaBlock) else None for block in self.layers)

  def paged_step(self, tokens_bt, k_pools, v_pools, slots, page_table, lengths, nano_batches: int = 1,
                 last_only: bool = False, *, states, state_slots, fresh, num_new):
    """`GPT.paged_step` for a hybrid: the attention layers read and write the paged KV cache (k_pools, v_pools
    hold the attention layers' pools only, in layer order); each Mamba layer gathers row b's state from
    `states` at `state_slots[b]` (zeros where `fresh[b]`: the row starts its sequence), advances it by the
    row's `num_new[b]` real tokens and scatters it back. Rows are left-padded as for the GPT; the Mamba
    layers see them shifted to the left so the padding comes after the real tokens and leaves the state as
    it was. Returns (logits, k_pools, v_pools, states)."""
    if nano_batches != 1:
      raise ValueError(f"nano_batches={nano_batches}: a hybrid serves with 1 (no nano-batch overlap)")
    attention = self.attention_layers
    if len(k_pools) != len(attention) or len(v_pools) != len(attention):
      raise ValueError(f"k_pools/v_pools: {len(k_pools)}/{len(v_pools)} pools for {len(attention)} attention layers")
    b, t = tokens_bt.shape
    positions = jnp.maximum(lengths[:, None] - t + jnp.arange(t)[None, :], 0)
    inv_freq = gpt.rope_frequencies(self.gpt_cfg)
    num_new = jnp.asarray(num_new, jnp.int32)
    shift = (t - num_new)[:, None]  # left-padding columns of each row
    to_left = (jnp.arange(t)[None, :] + shift) % t  # real tokens first, padding after
    to_right = (jnp.arange(t)[None, :] - shift) % t

    def roll(x_btd, index_bt):
      return jnp.take_along_axis(x_btd, index_bt[..., None], axis=1)

    def gather(state):
      fresh_mask = jnp.asarray(fresh, bool)
      return jax.tree.map(lambda pool: jnp.where(fresh_mask.reshape(-1, *([1] * (pool.ndim - 1))), 0,
                                                 pool[state_slots]).astype(pool.dtype), state)

    x = self._embed(tokens_bt)
    k_new, v_new, new_states = list(k_pools), list(v_pools), list(states)
    for i, block in enumerate(self.layers):
      if isinstance(block, MambaBlock):
        state = gather(states[i])
        if t == 1:  # decode rows: the recurrent update; a padding row (num_new 0) keeps its state
          x, state = block.step(x, state, num_new)
        else:
          y, state = block(roll(x, to_left), state, num_new)
          x = roll(y, to_right)
        new_states[i] = jax.tree.map(lambda pool, new: pool.at[state_slots].set(new.astype(pool.dtype)),
                                     states[i], state)
      else:
        j = attention.index(i)
        x, (k_new[j], v_new[j]) = block.paged(x, positions, inv_freq, (k_pools[j], v_pools[j]), slots, page_table,
                                              lengths)
    logits = self._logits(x[:, -1:] if last_only else x)
    return logits, tuple(k_new), tuple(v_new), tuple(new_states)

  def _advance(self, tokens_bt, cache: HybridCache, keep, *, recurrent: bool):
    """Runs t tokens from the cache's lengths; the Mamba layers by the scan or (`recurrent`) the multi-step
    update; every state advances by `keep [b]` tokens (all t when None)."""
    batch, t = tokens_bt.shape
    start = cache.lengths
    positions = start[:, None] + jnp.arange(t)[None, :]
    inv_freq = gpt.rope_frequencies(self.gpt_cfg)
    x = self._embed(tokens_bt)
    kv, ssm = list(cache.kv), list(cache.ssm)
    for i, block in enumerate(self.layers):
      if isinstance(block, MambaBlock):
        x, ssm[i] = block.step(x, ssm[i], keep) if recurrent else block(x, ssm[i], keep)
      else:
        x, kv[i] = block(x, positions, inv_freq, cache_kv=kv[i], q_offset=start)
    advance = jnp.full((batch,), t, jnp.int32) if keep is None else jnp.asarray(keep, jnp.int32)
    return self._logits(x), HybridCache(tuple(kv), tuple(ssm), start + advance)


HYBRID_CONFIG_FILE = "hybrid.json"  # next to a hybrid run's checkpoints/: what loads it as a HybridGPT


def save_config(run_dir: str, cfg: HybridConfig) -> None:
  os.makedirs(run_dir, exist_ok=True)
  with open(os.path.join(run_dir, HYBRID_CONFIG_FILE), "w") as f:
    json.dump(cfg.to_dict(), f, indent=2)


def load_config(run_dir: str) -> HybridConfig:
  """The hybrid config a run directory keeps (`hybrid.json`): its shape, no weights."""
  with open(os.path.join(run_dir, HYBRID_CONFIG_FILE)) as f:
    return HybridConfig.from_dict(json.load(f))


def load(run_dir: str) -> HybridGPT:
  """The trained hybrid of a run directory (its `hybrid.json` and latest checkpoint)."""
  cfg = load_config(run_dir)
  model, _, _ = checkpoint.load_model(os.path.join(run_dir, "checkpoints"),
                                      lambda saved: HybridGPT(cfg, rngs=nnx.Rngs(0)))
  return model
