"""The Hugging Face model families a `GPT` reads and writes: config.json <-> `GPTConfig`, and tensor layouts.

Llama (2, 3, 3.1, 3.2), Mistral, Qwen2/Qwen2.5, Gemma-2 and Phi-3 are one decoder with options
(`lwjax.models.gpt`); each family here says which options its `config.json` sets and where its tensors go.
HF stores torch `Linear` weights as [out, in]; the NNX model keeps [in, out] with the heads split out. All
five use the half-split (`rotate_half`) RoPE layout, so q/k need no permutation. Phi-3 fuses q/k/v and
gate/up into one tensor each: a layout entry then lists the row ranges of its parts.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from lwjax.models.gpt import DTYPES, GPTConfig, RopeScaling

_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


class UnsupportedCheckpoint(ValueError):
  """A config.json this GPT cannot represent; the message names the key and the allowed values."""


@dataclasses.dataclass(frozen=True)
class Family:
  """What a family's `config.json` says beyond Llama's keys, and its defaults where a key is absent."""
  model_type: str
  architecture: str
  defaults: dict[str, Any]
  fused: bool = False  # Phi-3: qkv_proj and gate_up_proj


FAMILIES = {
    "llama": Family("llama", "LlamaForCausalLM", {"rms_norm_eps": 1e-6, "hidden_act": "silu"}),
    "mistral": Family("mistral", "MistralForCausalLM",
                      {"rms_norm_eps": 1e-6, "hidden_act": "silu", "sliding_window": 4096}),
    "qwen2": Family("qwen2", "Qwen2ForCausalLM", {"rms_norm_eps": 1e-6, "hidden_act": "silu"}),
    "gemma2": Family("gemma2", "Gemma2ForCausalLM", {
        "rms_norm_eps": 1e-6, "hidden_activation": "gelu_pytorch_tanh", "head_dim": 256, "sliding_window": 4096,
        "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 256,
        "tie_word_embeddings": True}),
    "phi3": Family("phi3", "Phi3ForCausalLM", {"rms_norm_eps": 1e-5, "hidden_act": "silu"}, fused=True),
}
_ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


def family_of(cfg: GPTConfig) -> str:
  """The family whose config.json expresses `cfg` (Mistral for a windowed Llama; Phi-3 only when asked)."""
  if cfg.post_norms or cfg.norm_offset or cfg.embed_scale:
    return "gemma2"
  if cfg.qkv_bias:
    return "qwen2"
  return "mistral" if cfg.sliding_window is not None else "llama"


def _rope(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
  """(rope_theta, scaling) from `rope_scaling` or transformers-5 `rope_parameters`; only "llama3" scales."""
  key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
  params = dict(hf.get(key) or {})
  theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
  rope_type = params.get("rope_type", params.get("type"))
  if rope_type in (None, "default"):
    return theta, None
  if rope_type != "llama3":
    raise UnsupportedCheckpoint(f"{key}.rope_type: {rope_type!r} is not supported; allowed: 'default', 'llama3'")
  missing = [k for k in _LLAMA3_KEYS if k not in params]
  if missing:
    raise UnsupportedCheckpoint(f"{key}: llama3 scaling needs {missing}")
  return theta, RopeScaling(factor=float(params["factor"]), low_freq_factor=float(params["low_freq_factor"]),
                            high_freq_factor=float(params["high_freq_factor"]),
                            original_max_position_embeddings=int(params["original_max_position_embeddings"]))


def _window_options(hf: dict[str, Any], model_type: str, n_layers: int) -> dict[str, Any]:
  """`sliding_window` and `full_attention_every` from the family's keys and `layer_types`, if any."""
  window = hf.get("sliding_window")
  if model_type == "qwen2":
    if hf.get("use_sliding_window"):
      raise UnsupportedCheckpoint("use_sliding_window: true (windows on the layers from max_window_layers on) is "
                                  "not supported; allowed: false")
    window = None
  if model_type == "llama":
    window = None
  if window is None:
    return {"sliding_window": None, "full_attention_every": 0}
  every = 2 if model_type == "gemma2" else 0
  layer_types = hf.get("layer_types")
  if layer_types is not None:
    expected = ["full_attention" if every and i % every == every - 1 else "sliding_attention" for i in range(n_layers)]
    if list(layer_types) != expected:
      raise UnsupportedCheckpoint(f"layer_types: {list(layer_types)[:4]}... is not supported for {model_type}; "
                                  f"allowed: {expected[:4]}...")
  return {"sliding_window": int(window), "full_attention_every": every}


def config_from_hf(hf_config: dict[str, Any], **overrides) -> GPTConfig:
  """Maps a HF config.json dict of a supported family to a `GPTConfig`; `overrides` replace fields afterwards.

  `param_dtype` follows the checkpoint's `torch_dtype` (`dtype` in transformers 5; float32 when absent); the
  compute `dtype` keeps the `GPTConfig` default unless overridden.
  """
  model_type = hf_config.get("model_type", "llama")
  if model_type not in FAMILIES:
    raise UnsupportedCheckpoint(f"model_type: {model_type!r} is not supported; allowed: {sorted(FAMILIES)}")
  family = FAMILIES[model_type]
  hf = {**family.defaults, **hf_config}
  if model_type in ("llama", "mistral", "phi3"):
    for key in ("attention_bias", "mlp_bias"):
      if hf.get(key, False):
        raise UnsupportedCheckpoint(f"{key}: true is not supported for {model_type}; allowed: false")
  partial = (hf.get("rope_parameters") or {}).get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
  if float(partial) != 1.0:
    raise UnsupportedCheckpoint(f"partial_rotary_factor: {partial} is not supported; allowed: 1.0")
  if hf.get("use_bidirectional_attention"):
    raise UnsupportedCheckpoint("use_bidirectional_attention: true is not supported; allowed: false (causal)")
  act_key = "hidden_activation" if model_type == "gemma2" else "hidden_act"
  if hf.get(act_key) not in _ACTIVATIONS:
    raise UnsupportedCheckpoint(f"{act_key}: {hf.get(act_key)!r} is not supported; allowed: {sorted(_ACTIVATIONS)}")
  required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
  missing = [k for k in required if hf.get(k) is None]
  if missing:
    raise UnsupportedCheckpoint(f"config.json is missing required keys {missing}")
  param_dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
  if param_dtype not in DTYPES:
    raise UnsupportedCheckpoint(f"torch_dtype: {param_dtype!r} is not supported; allowed: {DTYPES}")

  rope_theta, rope_scaling = _rope(hf)
  heads, hidden, n_layers = hf["num_attention_heads"], hf["hidden_size"], hf["num_hidden_layers"]
  fields = dict(
      vocab_size=hf["vocab_size"], d_model=hidden, n_layers=n_layers, n_heads=heads,
      n_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim") or hidden // heads,
      d_ff=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048), rope_theta=rope_theta,
      rope_scaling=rope_scaling, norm_eps=float(hf["rms_norm_eps"]),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), param_dtype=param_dtype,
      activation=_ACTIVATIONS[hf[act_key]], qkv_bias=model_type == "qwen2",
      **_window_options(hf, model_type, n_layers))
  if model_type == "gemma2":
    fields.update(norm_offset=1.0, post_norms=True, embed_scale=True,
                  attn_logit_softcap=_optional_float(hf.get("attn_logit_softcapping")),
                  final_logit_softcap=_optional_float(hf.get("final_logit_softcapping")),
                  query_pre_attn_scalar=float(hf["query_pre_attn_scalar"]))
  allowed = {f.name for f in dataclasses.fields(GPTConfig)}
  unknown = sorted(set(overrides) - allowed)
  if unknown:
    raise ValueError(f"unknown GPTConfig overrides {unknown}; allowed: {sorted(allowed)}")
  fields.update(overrides)
  if isinstance(fields["rope_scaling"], dict):
    fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
  return GPTConfig(**fields)


def _optional_float(value) -> float | None:
  return None if value is None else float(value)


def config_to_hf(cfg: GPTConfig, family: str | None = None) -> dict[str, Any]:
  """The `config.json` dict of `family` (default `family_of(cfg)`) with `cfg`'s shapes and options."""
  family = family or family_of(cfg)
  if family not in FAMILIES:
    raise ValueError(f"family: {family!r} is not supported; allowed: {sorted(FAMILIES)}")
  if family_of(cfg) not in (family, "mistral" if family == "phi3" else family) or (
      family == "llama" and cfg.sliding_window is not None):
    raise ValueError(f"family: {family!r} cannot express this config (it needs {family_of(cfg)!r})")
  rope_scaling = None
  if cfg.rope_scaling is not None:
    rope_scaling = {"rope_type": "llama3", **dataclasses.asdict(cfg.rope_scaling)}
  out = {
      "architectures": [FAMILIES[family].architecture], "model_type": family, "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.d_ff,
      "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta, "rope_scaling": rope_scaling,
      "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": cfg.param_dtype,
  }
  act = {v: k for k, v in _ACTIVATIONS.items()}[cfg.activation]
  if family == "gemma2":
    out.update(hidden_activation=act, sliding_window=cfg.sliding_window,
               attn_logit_softcapping=cfg.attn_logit_softcap, final_logit_softcapping=cfg.final_logit_softcap,
               query_pre_attn_scalar=cfg.query_pre_attn_scalar or cfg.head_dim,
               layer_types=[("sliding_attention" if cfg.layer_window(i) else "full_attention")
                            for i in range(cfg.n_layers)])
  else:
    out["hidden_act"] = act
  if family in ("llama", "mistral", "phi3"):
    out.update(attention_bias=False, mlp_bias=False)
  if family in ("mistral", "phi3"):
    out["sliding_window"] = cfg.sliding_window
  if family == "qwen2":
    out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers,
               layer_types=["full_attention"] * cfg.n_layers)
  return out


@dataclasses.dataclass(frozen=True)
class Part:
  """One model tensor inside a HF tensor: where it lives in the NNX state and how its layout differs."""
  path: tuple  # into `nnx.to_pure_dict(nnx.state(model))`
  hf_shape: tuple[int, ...]  # of this part: the HF tensor's rows `rows`
  model_shape: tuple[int, ...]
  transpose: bool  # torch Linear [out, in]: the model holds the transpose, heads reshaped out
  rows: slice | None = None  # the part's rows of a fused HF tensor

  def from_hf(self, x: np.ndarray) -> np.ndarray:
    x = x[self.rows] if self.rows is not None else x
    return (x.T if self.transpose else x).reshape(self.model_shape)

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    return np.asarray(x).reshape(self.hf_shape[::-1]).T if self.transpose else np.asarray(x).reshape(self.hf_shape)


@dataclasses.dataclass(frozen=True)
class Tensor:
  """A HF tensor: its shape and the model tensors it holds (one, or the parts of a fused projection)."""
  hf_shape: tuple[int, ...]
  parts: tuple[Part, ...]

  def to_hf(self, values: list[np.ndarray]) -> np.ndarray:
    return np.ascontiguousarray(np.concatenate([p.to_hf(v) for p, v in zip(self.parts, values, strict=True)]))


def _linear(path, out_dims, in_dims) -> Tensor:
  """A torch Linear [prod(out), prod(in)] held as [*in, *out] (attention output: [*in, *out] too)."""
  hf = (int(np.prod(out_dims)), int(np.prod(in_dims)))
  return Tensor(hf, (Part(path, hf, (*in_dims, *out_dims), True),))


def _fused(parts) -> Tensor:
  """A fused Linear: `parts` are (path, out_dims, in_dims) stacked along the HF output rows."""
  out, start = [], 0
  for path, out_dims, in_dims in parts:
    rows = int(np.prod(out_dims))
    out.append(Part(path, (rows, int(np.prod(in_dims))), (*in_dims, *out_dims), True, slice(start, start + rows)))
    start += rows
  return Tensor((start, out[0].hf_shape[1]), tuple(out))


def _vector(path, shape) -> Tensor:
  size = int(np.prod(shape))
  return Tensor((size,), (Part(path, (size,), tuple(shape), False),))


def tensor_layout(cfg: GPTConfig, family: str | None = None) -> dict[str, Tensor]:
  """HF key -> `Tensor` for every tensor of `family`'s causal LM with `cfg`'s shapes, in file order."""
  family = family or family_of(cfg)
  d, h, kvh, hd, f, v = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
  out = {"model.embed_tokens.weight": Tensor((v, d), (Part(("embed",), (v, d), (v, d), False),))}
  for i in range(cfg.n_layers):
    hf, nx = f"model.layers.{i}.", ("layers", i)
    attn, mlp = nx + ("attn",), nx + ("mlp",)
    if FAMILIES[family].fused:
      out[hf + "self_attn.qkv_proj.weight"] = _fused([(attn + ("wq",), (h, hd), (d,)),
                                                      (attn + ("wk",), (kvh, hd), (d,)),
                                                      (attn + ("wv",), (kvh, hd), (d,))])
    else:
      out[hf + "self_attn.q_proj.weight"] = _linear(attn + ("wq",), (h, hd), (d,))
      out[hf + "self_attn.k_proj.weight"] = _linear(attn + ("wk",), (kvh, hd), (d,))
      out[hf + "self_attn.v_proj.weight"] = _linear(attn + ("wv",), (kvh, hd), (d,))
    if cfg.qkv_bias:
      out[hf + "self_attn.q_proj.bias"] = _vector(attn + ("bq",), (h, hd))
      out[hf + "self_attn.k_proj.bias"] = _vector(attn + ("bk",), (kvh, hd))
      out[hf + "self_attn.v_proj.bias"] = _vector(attn + ("bv",), (kvh, hd))
    out[hf + "self_attn.o_proj.weight"] = _linear(attn + ("wo",), (d,), (h, hd))
    if FAMILIES[family].fused:
      out[hf + "mlp.gate_up_proj.weight"] = _fused([(mlp + ("w_gate",), (f,), (d,)), (mlp + ("w_up",), (f,), (d,))])
    else:
      out[hf + "mlp.gate_proj.weight"] = _linear(mlp + ("w_gate",), (f,), (d,))
      out[hf + "mlp.up_proj.weight"] = _linear(mlp + ("w_up",), (f,), (d,))
    out[hf + "mlp.down_proj.weight"] = _linear(mlp + ("w_down",), (d,), (f,))
    out[hf + "input_layernorm.weight"] = _vector(nx + ("attn_norm", "scale"), (d,))
    if cfg.post_norms:  # Gemma-2: post_attention_layernorm is the attention output's norm
      out[hf + "post_attention_layernorm.weight"] = _vector(nx + ("attn_post_norm", "scale"), (d,))
      out[hf + "pre_feedforward_layernorm.weight"] = _vector(nx + ("mlp_norm", "scale"), (d,))
      out[hf + "post_feedforward_layernorm.weight"] = _vector(nx + ("mlp_post_norm", "scale"), (d,))
    else:
      out[hf + "post_attention_layernorm.weight"] = _vector(nx + ("mlp_norm", "scale"), (d,))
  out["model.norm.weight"] = _vector(("final_norm", "scale"), (d,))
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = _linear(("lm_head",), (v,), (d,))
  return out
