"""HF checkpoint import/export: Llama against a NumPy forward written from the HF weight layout, sharded files,
round trips and errors."""

import json
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from lwjax.models import hf_checkpoint, hf_families
from lwjax.models.gpt import GPTConfig, RopeScaling

HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 61, "hidden_size": 32,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48,
    "max_position_embeddings": 512, "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "hidden_act": "silu", "torch_dtype": "float32",
}
# head_dim 8 gives wavelengths 2*pi * [1, 10, 100, 1000]: one high, one smoothed, two low frequencies.
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 8.0,
                  "original_max_position_embeddings": 256}


def random_hf_tensors(c, seed=0):
  """A `LlamaForCausalLM` state dict in HF layout ([out, in] Linear weights), float32."""
  rng = np.random.default_rng(seed)
  d, f, v, h = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_attention_heads"]
  kvh, hd = c["num_key_value_heads"], c["hidden_size"] // c["num_attention_heads"]

  def w(*shape, scale):
    return (scale * rng.standard_normal(shape)).astype(np.float32)

  t = {"model.embed_tokens.weight": w(v, d, scale=1.0)}
  for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}."
    t[p + "self_attn.q_proj.weight"] = w(h * hd, d, scale=d ** -0.5)
    t[p + "self_attn.k_proj.weight"] = w(kvh * hd, d, scale=d ** -0.5)
    t[p + "self_attn.v_proj.weight"] = w(kvh * hd, d, scale=d ** -0.5)
    t[p + "self_attn.o_proj.weight"] = w(d, h * hd, scale=(h * hd) ** -0.5)
    t[p + "mlp.gate_proj.weight"] = w(f, d, scale=d ** -0.5)
    t[p + "mlp.up_proj.weight"] = w(f, d, scale=d ** -0.5)
    t[p + "mlp.down_proj.weight"] = w(d, f, scale=f ** -0.5)
    t[p + "input_layernorm.weight"] = 1 + w(d, scale=0.1)
    t[p + "post_attention_layernorm.weight"] = 1 + w(d, scale=0.1)
  t["model.norm.weight"] = 1 + w(d, scale=0.1)
  if not c["tie_word_embeddings"]:
    t["lm_head.weight"] = w(v, d, scale=d ** -0.5)
  return t


def write_checkpoint(path, c, tensors, shards=1):
  """Writes config.json and `tensors` as HF does: one file, or `shards` files plus an index."""
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(c))
  if shards == 1:
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
  keys, weight_map = list(tensors), {}
  for i, group in enumerate(np.array_split(np.arange(len(keys)), shards)):
    name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
    save_file({keys[j]: tensors[keys[j]] for j in group}, str(path / name), metadata={"format": "pt"})
    weight_map.update({keys[j]: name for j in group})
  total = sum(x.nbytes for x in tensors.values())
  (path / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
  return path


def read_tensors(path):
  out = {}
  for file in sorted(path.glob("*.safetensors")):
    with safe_open(str(file), framework="np") as f:
      out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118  safe_open is not iterable
  return out


def reference_inv_freq(c):
  """HF's default RoPE frequencies, with `_compute_llama3_parameters` applied when configured."""
  hd = c["hidden_size"] // c["num_attention_heads"]
  inv_freq = 1.0 / c["rope_theta"] ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
  s = c.get("rope_scaling")
  if not s:
    return inv_freq
  old_len = s["original_max_position_embeddings"]
  out = []
  for freq in inv_freq:
    wavelen = 2 * math.pi / freq
    if wavelen < old_len / s["high_freq_factor"]:
      out.append(freq)
    elif wavelen > old_len / s["low_freq_factor"]:
      out.append(freq / s["factor"])
    else:
      smooth = (old_len / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
      out.append((1 - smooth) * freq / s["factor"] + smooth * freq)
  return np.array(out)


def reference_logits(c, t, tokens_bt, positions_bt):
  """HF `LlamaForCausalLM.forward` in float64 NumPy: [b, t] tokens -> [b, t, vocab] logits."""
  t = {k: v.astype(np.float64) for k, v in t.items()}
  b, n = tokens_bt.shape
  h, kvh = c["num_attention_heads"], c["num_key_value_heads"]
  hd = c["hidden_size"] // h

  def rms_norm(x, weight):
    return weight * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + c["rms_norm_eps"])

  def rotate_half(x):
    return np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], axis=-1)

  angles = positions_bt[..., None] * reference_inv_freq(c)  # [b, t, hd/2]
  emb = np.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = np.cos(emb), np.sin(emb)
  causal = np.tril(np.ones((n, n), bool))
  x = t["model.embed_tokens.weight"][tokens_bt]
  for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}."
    y = rms_norm(x, t[p + "input_layernorm.weight"])
    q = (y @ t[p + "self_attn.q_proj.weight"].T).reshape(b, n, h, hd)
    k = (y @ t[p + "self_attn.k_proj.weight"].T).reshape(b, n, kvh, hd)
    v = (y @ t[p + "self_attn.v_proj.weight"].T).reshape(b, n, kvh, hd)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k, v = np.repeat(k, h // kvh, axis=2), np.repeat(v, h // kvh, axis=2)  # HF `repeat_kv`
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    scores = np.where(causal, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attn = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, n, h * hd)
    x = x + attn @ t[p + "self_attn.o_proj.weight"].T
    y = rms_norm(x, t[p + "post_attention_layernorm.weight"])
    gate, up = y @ t[p + "mlp.gate_proj.weight"].T, y @ t[p + "mlp.up_proj.weight"].T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ t[p + "mlp.down_proj.weight"].T
  x = rms_norm(x, t["model.norm.weight"])
  head = t["model.embed_tokens.weight"] if c["tie_word_embeddings"] else t["lm_head.weight"]
  return x @ head.T


def tokens_and_positions(c, offset=0, seed=1):
  tokens = np.random.default_rng(seed).integers(0, c["vocab_size"], size=(2, 10))
  return tokens, np.broadcast_to(offset + np.arange(10), tokens.shape)


def model_logits(model, tokens, positions):
  return np.asarray(model(jnp.asarray(tokens), positions_bt=jnp.asarray(positions)))


def params(model):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def assert_same_params(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y, strict=True), params(a), params(b))


@pytest.mark.parametrize("tied", [False, True])
def test_load_matches_numpy_llama(tmp_path, tied):
  c = {**HF_CONFIG, "tie_word_embeddings": tied}
  tensors = random_hf_tensors(c)
  model = hf_checkpoint.load(write_checkpoint(tmp_path, c, tensors))
  assert model.cfg.tie_embeddings == tied and hasattr(model, "lm_head") != tied
  tokens, positions = tokens_and_positions(c)
  np.testing.assert_allclose(model_logits(model, tokens, positions),
                             reference_logits(c, tensors, tokens, positions), atol=1e-4, rtol=1e-4)


def test_llama3_rope_scaling_matches_numpy_llama(tmp_path):
  c = {**HF_CONFIG, "rope_scaling": LLAMA3_SCALING}
  tensors = random_hf_tensors(c)
  path = write_checkpoint(tmp_path, c, tensors)
  model = hf_checkpoint.load(path)
  assert model.cfg.rope_scaling == RopeScaling(8.0, 1.0, 8.0, 256)
  tokens, positions = tokens_and_positions(c, offset=90)
  got = model_logits(model, tokens, positions)
  np.testing.assert_allclose(got, reference_logits(c, tensors, tokens, positions), atol=1e-4, rtol=1e-4)
  unscaled = model_logits(hf_checkpoint.load(path, rope_scaling=None), tokens, positions)
  assert np.abs(got - unscaled).max() > 1e-2  # the scaling is visible at these positions


def test_sharded_checkpoint_loads(tmp_path):
  tensors = random_hf_tensors(HF_CONFIG)
  sharded = hf_checkpoint.load(write_checkpoint(tmp_path / "sharded", HF_CONFIG, tensors, shards=3))
  old_buffers = {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}  # ignored
  single = hf_checkpoint.load(write_checkpoint(tmp_path / "single", HF_CONFIG, {**tensors, **old_buffers}))
  assert_same_params(sharded, single)
  tokens, positions = tokens_and_positions(HF_CONFIG)
  np.testing.assert_allclose(model_logits(sharded, tokens, positions),
                             reference_logits(HF_CONFIG, tensors, tokens, positions), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tied", [False, True])
def test_export_import_round_trip(tmp_path, tied):
  c = {**HF_CONFIG, "tie_word_embeddings": tied, "rope_scaling": LLAMA3_SCALING}
  tensors = random_hf_tensors(c)
  model = hf_checkpoint.load(write_checkpoint(tmp_path / "in", c, tensors))
  hf_checkpoint.save(model, tmp_path / "out")
  written = read_tensors(tmp_path / "out")
  assert sorted(written) == sorted(tensors)
  for key, x in tensors.items():
    np.testing.assert_array_equal(written[key], x, strict=True, err_msg=key)
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert {k: config[k] for k in c} == c
  assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
  assert_same_params(hf_checkpoint.load(tmp_path / "out"), model)


def test_bfloat16_checkpoint_round_trip(tmp_path):
  c = {**HF_CONFIG, "torch_dtype": "bfloat16"}
  tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in random_hf_tensors(c).items()}
  model = hf_checkpoint.load(write_checkpoint(tmp_path / "in", c, tensors))
  assert model.cfg.param_dtype == "bfloat16" and model.embed[...].dtype == jnp.bfloat16
  hf_checkpoint.save(model, tmp_path / "out")
  with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="np") as f:
    assert f.get_slice("model.norm.weight").get_dtype() == "BF16"
  for key, x in read_tensors(tmp_path / "out").items():
    np.testing.assert_array_equal(x, tensors[key], strict=True, err_msg=key)
  upcast = hf_checkpoint.load(tmp_path / "out", param_dtype="float32")
  assert upcast.embed[...].dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(upcast.embed[...]), tensors["model.embed_tokens.weight"].astype(
      np.float32))


def test_sharded_export_writes_index_and_reloads(tmp_path):
  tensors = random_hf_tensors(HF_CONFIG)
  model = hf_checkpoint.load(write_checkpoint(tmp_path / "in", HF_CONFIG, tensors))
  out = tmp_path / "out"
  hf_checkpoint.save(model, out, max_shard_bytes=10_000)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  shard_files = sorted(p.name for p in out.glob("*.safetensors"))
  assert len(shard_files) > 2 and not (out / "model.safetensors").exists()
  assert sorted(index["weight_map"]) == sorted(tensors)
  assert sorted(set(index["weight_map"].values())) == shard_files
  assert index["metadata"]["total_size"] == sum(x.nbytes for x in tensors.values())
  for name in shard_files:  # a shard only exceeds the limit when one tensor does
    with safe_open(str(out / name), framework="np") as f:
      sizes = [f.get_tensor(k).nbytes for k in f.keys()]  # noqa: SIM118  safe_open is not iterable
    assert sum(sizes) <= 10_000 or len(sizes) == 1
  assert_same_params(hf_checkpoint.load(out), model)

  hf_checkpoint.save(model, out)  # an unsharded save over it removes the stale index and shards
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
  assert_same_params(hf_checkpoint.load(out), model)


@pytest.mark.parametrize("edit, key", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "model.layers.1.mlp.up_proj.weight"),
    (lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)}),
     "model.layers.0.self_attn.q_norm.weight"),
    (lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": np.zeros((8, 32), np.float32)}),
     "model.layers.0.self_attn.k_proj.weight"),
])
def test_bad_tensors_raise_naming_the_key(tmp_path, edit, key):
  tensors = random_hf_tensors(HF_CONFIG)
  edit(tensors)
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    hf_checkpoint.load(write_checkpoint(tmp_path, HF_CONFIG, tensors))


def test_tied_checkpoint_with_lm_head_raises_with_hint(tmp_path):
  tensors = random_hf_tensors(HF_CONFIG)
  path = write_checkpoint(tmp_path, {**HF_CONFIG, "tie_word_embeddings": True}, tensors)
  with pytest.raises(ValueError, match=r"lm_head\.weight.*tie_embeddings=False"):
    hf_checkpoint.load(path)
  assert not hf_checkpoint.load(path, tie_embeddings=False).cfg.tie_embeddings


def test_index_pointing_at_wrong_shard_raises(tmp_path):
  path = write_checkpoint(tmp_path, HF_CONFIG, random_hf_tensors(HF_CONFIG), shards=2)
  index = json.loads((path / "model.safetensors.index.json").read_text())
  index["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"
  (path / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(ValueError, match=r"model\.norm\.weight"):
    hf_checkpoint.load(path)


@pytest.mark.parametrize("change, key", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "gpt_neox"}, "model_type"),
    ({"torch_dtype": "float64"}, "torch_dtype"),
])
def test_unsupported_config_raises_naming_the_key(change, key):
  with pytest.raises(ValueError, match=key):
    hf_families.config_from_hf({**HF_CONFIG, **change})


def test_unknown_override_raises():
  with pytest.raises(ValueError, match="n_experts"):
    hf_families.config_from_hf(HF_CONFIG, n_experts=8)


def test_config_defaults_and_round_trip():
  minimal = {k: HF_CONFIG[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                       "num_attention_heads", "intermediate_size")}
  cfg = hf_families.config_from_hf(minimal)
  assert (cfg.n_kv_heads, cfg.head_dim, cfg.param_dtype, cfg.rope_scaling) == (4, 8, "float32", None)
  cfg = GPTConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=16, d_ff=48,
                  max_seq_len=4096, rope_theta=5e5, rope_scaling=RopeScaling(), norm_eps=1e-6,
                  tie_embeddings=True, param_dtype="bfloat16")
  hf = hf_families.config_to_hf(cfg)
  assert hf["architectures"] == ["LlamaForCausalLM"] and hf["torch_dtype"] == "bfloat16"
  assert hf["rope_scaling"]["rope_type"] == "llama3"
  assert hf_families.config_from_hf(json.loads(json.dumps(hf))) == cfg
  v5 = {**minimal, "rope_parameters": {"rope_theta": 5e5, **hf["rope_scaling"]}}  # transformers >= 5
  assert hf_families.config_from_hf(v5).rope_scaling == RopeScaling() and hf_families.config_from_hf(
      v5).rope_theta == 5e5


def test_matches_transformers_llama(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  c = {**HF_CONFIG, "rope_scaling": LLAMA3_SCALING}
  path = write_checkpoint(tmp_path / "in", c, random_hf_tensors(c))
  model = hf_checkpoint.load(path)
  hf_checkpoint.save(model, tmp_path / "out", max_shard_bytes=20_000)
  tokens, positions = tokens_and_positions(c)
  want = model_logits(model, tokens, positions)
  for checkpoint in (path, tmp_path / "out"):
    reference = transformers.LlamaForCausalLM.from_pretrained(str(checkpoint), attn_implementation="eager")
    with torch.no_grad():
      got = reference.float().eval()(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
