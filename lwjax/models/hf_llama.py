"""Hugging Face Llama checkpoints (`config.json` + safetensors) to and from a `GPT`.

HF stores torch `Linear` weights as [out, in]; the NNX model keeps [in, out] with the heads split out.
Both use the half-split (`rotate_half`) RoPE layout, so q/k need no permutation. Tensors are read and
written through numpy: jax registers ml_dtypes' `bfloat16` with numpy, which safetensors uses for BF16.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from lwjax.models.gpt import DTYPES, GPT, GPTConfig, RopeScaling

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' `save_pretrained` default ("5GB")
_SHARD_FILE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# Non-persistent RoPE buffers that old checkpoints still carry; recomputed from the config.
_DERIVED_KEY = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope_scaling_from_hf(scaling: dict[str, Any] | None, key: str) -> RopeScaling | None:
  """HF `rope_scaling` (or transformers-5 `rope_parameters`) -> `RopeScaling`; only "llama3" is known."""
  if not scaling:
    return None
  rope_type = scaling.get("rope_type", scaling.get("type"))
  if rope_type in (None, "default"):
    return None
  if rope_type != "llama3":
    raise ValueError(f"{key}: rope_type {rope_type!r} is not supported; allowed: 'llama3' (or no scaling)")
  missing = [k for k in _LLAMA3_KEYS if k not in scaling]
  if missing:
    raise ValueError(f"{key}: llama3 scaling needs {missing}")
  return RopeScaling(factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
                     high_freq_factor=float(scaling["high_freq_factor"]),
                     original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))


def config_from_hf(hf_config: dict[str, Any], **overrides) -> GPTConfig:
  """Maps a HF `LlamaConfig` dict to a `GPTConfig`; `overrides` replace `GPTConfig` fields afterwards.

  `param_dtype` follows the checkpoint's `torch_dtype` (float32 when absent); the compute `dtype` keeps
  the `GPTConfig` default unless overridden.
  """
  hf = dict(hf_config)
  model_type = hf.get("model_type", "llama")
  if model_type != "llama":
    raise ValueError(f"model_type: {model_type!r} is not supported; allowed: 'llama'")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key, False):
      raise ValueError(f"{key}: biases are not supported by GPT; it must be false")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act: {hf['hidden_act']!r} is not supported; allowed: 'silu'")
  required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
  missing = [k for k in required if hf.get(k) is None]
  if missing:
    raise ValueError(f"HF config is missing required keys {missing}")

  rope_parameters = hf.get("rope_parameters")  # transformers >= 5 folds rope_theta and scaling in here
  if rope_parameters:
    rope_theta = rope_parameters.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_scaling = _rope_scaling_from_hf(rope_parameters, "rope_parameters")
  else:
    rope_theta = hf.get("rope_theta", 10000.0)
    rope_scaling = _rope_scaling_from_hf(hf.get("rope_scaling"), "rope_scaling")
  param_dtype = hf.get("torch_dtype") or hf.get("dtype") or "float32"
  if param_dtype not in DTYPES:
    raise ValueError(f"torch_dtype: {param_dtype!r} is not supported; allowed: {DTYPES}")

  heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
  fields = dict(
      vocab_size=hf["vocab_size"], d_model=hidden, n_layers=hf["num_hidden_layers"], n_heads=heads,
      n_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=hf.get("head_dim") or hidden // heads,
      d_ff=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
      rope_theta=float(rope_theta), rope_scaling=rope_scaling, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), param_dtype=param_dtype)
  allowed = {f.name for f in dataclasses.fields(GPTConfig)}
  unknown = sorted(set(overrides) - allowed)
  if unknown:
    raise ValueError(f"unknown GPTConfig overrides {unknown}; allowed: {sorted(allowed)}")
  fields.update(overrides)
  if isinstance(fields["rope_scaling"], dict):
    fields["rope_scaling"] = RopeScaling(**fields["rope_scaling"])
  return GPTConfig(**fields)


def config_to_hf(cfg: GPTConfig) -> dict[str, Any]:
  """The `config.json` dict of a `LlamaForCausalLM` with `cfg`'s shapes; `torch_dtype` is `param_dtype`."""
  rope_scaling = None
  if cfg.rope_scaling is not None:
    rope_scaling = {"rope_type": "llama3", **dataclasses.asdict(cfg.rope_scaling)}
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model,
      "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads,
      "head_dim": cfg.head_dim,
      "intermediate_size": cfg.d_ff,
      "max_position_embeddings": cfg.max_seq_len,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": rope_scaling,
      "rms_norm_eps": cfg.norm_eps,
      "tie_word_embeddings": cfg.tie_embeddings,
      "hidden_act": "silu",
      "attention_bias": False,
      "mlp_bias": False,
      "torch_dtype": cfg.param_dtype,
  }


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One HF tensor: where it lives in the NNX state and how its layout differs."""
  path: tuple  # into `nnx.to_pure_dict(nnx.state(model))`
  hf_shape: tuple[int, ...]
  model_shape: tuple[int, ...]
  transpose: bool  # torch Linear [out, in]: the model holds the transpose, heads reshaped out

  def from_hf(self, x: np.ndarray) -> np.ndarray:
    return x.T.reshape(self.model_shape) if self.transpose else x

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.reshape(self.hf_shape[::-1]).T if self.transpose else x)


def tensor_layout(cfg: GPTConfig) -> dict[str, _Tensor]:
  """HF key -> `_Tensor` for every tensor of a `LlamaForCausalLM` with `cfg`'s shapes, in file order."""
  d, h, kvh, hd, f, v = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
  out = {"model.embed_tokens.weight": _Tensor(("embed",), (v, d), (v, d), False)}
  for i in range(cfg.n_layers):
    hf, nx = f"model.layers.{i}.", ("layers", i)
    out.update({
        hf + "self_attn.q_proj.weight": _Tensor(nx + ("attn", "wq"), (h * hd, d), (d, h, hd), True),
        hf + "self_attn.k_proj.weight": _Tensor(nx + ("attn", "wk"), (kvh * hd, d), (d, kvh, hd), True),
        hf + "self_attn.v_proj.weight": _Tensor(nx + ("attn", "wv"), (kvh * hd, d), (d, kvh, hd), True),
        hf + "self_attn.o_proj.weight": _Tensor(nx + ("attn", "wo"), (d, h * hd), (h, hd, d), True),
        hf + "mlp.gate_proj.weight": _Tensor(nx + ("mlp", "w_gate"), (f, d), (d, f), True),
        hf + "mlp.up_proj.weight": _Tensor(nx + ("mlp", "w_up"), (f, d), (d, f), True),
        hf + "mlp.down_proj.weight": _Tensor(nx + ("mlp", "w_down"), (d, f), (f, d), True),
        hf + "input_layernorm.weight": _Tensor(nx + ("attn_norm", "scale"), (d,), (d,), False),
        hf + "post_attention_layernorm.weight": _Tensor(nx + ("mlp_norm", "scale"), (d,), (d,), False),
    })
  out["model.norm.weight"] = _Tensor(("final_norm", "scale"), (d,), (d,), False)
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = _Tensor(("lm_head",), (v, d), (d, v), True)
  return out


def _weight_files(path: str) -> dict[str, str]:
  """HF key -> safetensors file name, from the shard index or the single file's header."""
  index = os.path.join(path, INDEX_FILE)
  if os.path.exists(index):
    with open(index) as fh:
      weight_map = json.load(fh).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index}: no 'weight_map' dict")
    return dict(weight_map)
  single = os.path.join(path, SINGLE_FILE)
  if not os.path.exists(single):
    raise FileNotFoundError(f"{path}: neither {INDEX_FILE} nor {SINGLE_FILE} found")
  with safe_open(single, framework="np") as f:
    return {key: SINGLE_FILE for key in f.keys()}  # noqa: SIM118  safe_open is not iterable


def _check_keys(layout: dict[str, _Tensor], available, cfg: GPTConfig) -> None:
  available = {k for k in available if not _DERIVED_KEY.fullmatch(k)}
  missing = sorted(set(layout) - available)
  if missing:
    raise ValueError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {missing[:5]}")
  unexpected = sorted(available - set(layout))
  if unexpected:
    hint = ""
    if cfg.tie_embeddings and "lm_head.weight" in unexpected:
      hint = " (lm_head.weight with tie_word_embeddings=true: load with tie_embeddings=False to keep it)"
    raise ValueError(f"checkpoint has {len(unexpected)} unexpected tensor(s), e.g. {unexpected[:5]}{hint}")


def _get(tree: dict, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def load(path: str | os.PathLike, **overrides) -> GPT:
  """Reads a HF Llama checkpoint directory (`config.json` + one or sharded safetensors) into a `GPT`.

  The model is built abstractly and its parameters are filled tensor by tensor, cast to `param_dtype`;
  `overrides` replace `GPTConfig` fields (e.g. `param_dtype="float32"`, `max_seq_len=8192`).
  """
  path = os.fspath(path)
  with open(os.path.join(path, CONFIG_FILE)) as fh:
    cfg = config_from_hf(json.load(fh), **overrides)
  layout = tensor_layout(cfg)
  files = _weight_files(path)
  _check_keys(layout, files, cfg)

  abstract = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  values = nnx.to_pure_dict(state)
  dtype = jnp.dtype(cfg.param_dtype)
  by_file: dict[str, list[str]] = {}
  for key in layout:
    by_file.setdefault(files[key], []).append(key)
  for file_name, keys in by_file.items():
    with safe_open(os.path.join(path, file_name), framework="np") as f:
      present = set(f.keys())
      for key in keys:
        if key not in present:
          raise ValueError(f"{key}: listed in {INDEX_FILE} under {file_name}, which does not contain it")
        x = f.get_tensor(key)
        spec = layout[key]
        if tuple(x.shape) != spec.hf_shape:
          raise ValueError(f"{key}: shape {tuple(x.shape)} in {file_name}, expected {spec.hf_shape}")
        _get(values, spec.path[:-1])[spec.path[-1]] = jnp.asarray(spec.from_hf(x).astype(dtype))
  nnx.replace_by_pure_dict(state, values)
  return nnx.merge(graphdef, state)


def _remove_stale_weights(path: str) -> None:
  """Deletes weights a previous save left, so an old index can't point the loader at old shards."""
  for name in os.listdir(path):
    if name in (SINGLE_FILE, INDEX_FILE) or _SHARD_FILE.fullmatch(name):
      os.remove(os.path.join(path, name))


def save(model: GPT, path: str | os.PathLike, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
  """Writes `model` as a HF Llama checkpoint: `config.json` and safetensors in `param_dtype`.

  Above `max_shard_bytes` the tensors go to `model-0000i-of-0000n.safetensors` shards with a
  `model.safetensors.index.json`, as `save_pretrained` does. Earlier weight files in `path` are removed.
  """
  path = os.fspath(path)
  cfg = model.cfg
  layout = tensor_layout(cfg)
  itemsize = jnp.dtype(cfg.param_dtype).itemsize
  shards: list[list[str]] = [[]]
  shard_bytes, total = 0, 0
  for key, spec in layout.items():
    nbytes = int(np.prod(spec.hf_shape)) * itemsize
    if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
      shards.append([])
      shard_bytes = 0
    shards[-1].append(key)
    shard_bytes += nbytes
    total += nbytes

  os.makedirs(path, exist_ok=True)
  _remove_stale_weights(path)
  with open(os.path.join(path, CONFIG_FILE), "w") as fh:
    json.dump(config_to_hf(cfg), fh, indent=2)
  values = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  names = [SINGLE_FILE] if len(shards) == 1 else [
      f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  for name, keys in zip(names, shards, strict=False):  # one shard on the host at a time
    tensors = {key: layout[key].to_hf(np.asarray(jax.device_get(_get(values, layout[key].path))))
               for key in keys}
    save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})  # transformers needs the tag
  if len(shards) > 1:
    weight_map = {key: name for name, keys in zip(names, shards, strict=False) for key in keys}
    with open(os.path.join(path, INDEX_FILE), "w") as fh:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh, indent=2)
