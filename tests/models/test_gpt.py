"""GPT: KV-cache inference equals the training forward; packing, remat and logical axes behave; projections."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs.gpt
from lwjax.models import gpt
from lwjax.models.gpt import GPT, GPTConfig, RopeScaling, rope_frequencies

TOL = dict(atol=2e-5, rtol=2e-5)  # fp32: only summation order differs between the paths


def _model(**overrides):
  cfg = GPTConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48,
                  max_seq_len=64, **overrides)
  return GPT(cfg, rngs=nnx.Rngs(0))


def _tokens(batch=2, length=13, seed=1):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, 61)


@pytest.mark.parametrize("tie", [False, True])
def test_decode_token_by_token_equals_forward(tie):
  model, tokens = _model(tie_embeddings=tie), _tokens()
  full = model(tokens)
  cache = model.init_cache(2, 16)
  steps = []
  for i in range(tokens.shape[1]):
    logits, cache = model.decode_step(tokens[:, i], cache)
    steps.append(logits)
  np.testing.assert_allclose(jnp.stack(steps, 1), full, **TOL)
  np.testing.assert_array_equal(cache.lengths, [13, 13])


def test_chunked_prefill_then_decode_equals_forward():
  model = _model(rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=8))
  tokens = _tokens(length=20)
  full = model(tokens)
  cache = model.init_cache(2, 24)
  outs = []
  for start, stop in ((0, 7), (7, 8), (8, 16)):
    logits, cache = model.prefill(tokens[:, start:stop], cache)
    outs.append(logits)
  for i in range(16, 20):
    logits, cache = model.decode_step(tokens[:, i], cache)
    outs.append(logits[:, None])
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, **TOL)


def test_ragged_prefill_advances_each_sequence_by_its_length():
  model, tokens = _model(), _tokens(length=10)
  cache = model.init_cache(2, 16)
  # Sequence 0 has 10 prompt tokens, sequence 1 only 6 (right-padded with junk).
  logits, cache = model.prefill(tokens, cache, num_new=jnp.array([10, 6]))
  np.testing.assert_array_equal(cache.lengths, [10, 6])
  nxt = jnp.array([5, 7])
  step_logits, cache = model.decode_step(nxt, cache)
  seq1 = jnp.concatenate([tokens[1, :6], nxt[1:]])[None]
  np.testing.assert_allclose(step_logits[1], model(seq1)[0, -1], **TOL)
  np.testing.assert_allclose(logits[0], model(tokens[:1])[0], **TOL)


def test_left_padded_batch_with_kv_start_equals_each_sequence_alone():
  model, tokens = _model(), _tokens(length=9)
  pad = jnp.array([0, 4])  # sequence 1 has 5 real tokens, left-padded with junk
  cache = model.init_cache(2, 12)
  logits, cache = model.prefill(tokens, cache, kv_start=pad)
  nxt = jnp.array([3, 8])
  step_logits, cache = model.decode_step(nxt, cache, kv_start=pad)
  alone = jnp.concatenate([tokens[1, 4:], nxt[1:]])[None]
  np.testing.assert_allclose(logits[1, 4:], model(alone)[0, :5], **TOL)
  np.testing.assert_allclose(step_logits[1], model(alone)[0, -1], **TOL)
  np.testing.assert_allclose(step_logits[0], model(jnp.concatenate([tokens[0], nxt[:1]])[None])[0, -1], **TOL)


def test_packed_segments_equal_separate_sequences():
  model = _model()
  a, b = _tokens(1, 5, seed=2), _tokens(1, 7, seed=3)
  packed = jnp.concatenate([a, b], 1)
  segment_ids = jnp.array([[1] * 5 + [2] * 7])
  positions = jnp.array([list(range(5)) + list(range(7))])
  out = model(packed, positions_bt=positions, segment_ids_bt=segment_ids)
  np.testing.assert_allclose(out[:, :5], model(a), **TOL)
  np.testing.assert_allclose(out[:, 5:], model(b), **TOL)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_keeps_gradients(remat):
  tokens = _tokens()
  def grads(policy):
    model = _model(remat=policy)
    graphdef, params = nnx.split(model)
    def loss(p):
      return jnp.mean(nnx.merge(graphdef, p)(tokens) ** 2)
    return jax.grad(loss)(params)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), grads("none"), grads(remat))


def test_bf16_compute_with_fp32_params_is_close_to_fp32():
  tokens = _tokens()
  full = _model()(tokens)
  mixed = _model(dtype="bfloat16")
  assert mixed.embed[...].dtype == jnp.float32
  np.testing.assert_allclose(mixed(tokens), full, atol=0.1)


def test_every_parameter_has_logical_axes_of_its_rank():
  model = _model()
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param):
      axes = var.get_metadata()["logical_axes"]
      assert len(axes) == var[...].ndim, path


def test_rope_scaling_changes_only_low_frequencies():
  plain = GPTConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=1, n_kv_heads=1, head_dim=64, d_ff=8,
                    rope_theta=500000.0)
  scaled = GPTConfig(**{**plain.__dict__, "rope_scaling": RopeScaling()})
  f0, f1 = rope_frequencies(plain), rope_frequencies(scaled)
  assert f1[0] == f0[0]  # the highest frequency is untouched
  np.testing.assert_allclose(f1[-1], f0[-1] / 8.0, rtol=1e-6)  # the lowest is divided by the factor


def test_presets_have_the_published_sizes():
  sizes = {name: cfg.num_params() for name, cfg in configs.gpt.PRESETS.items()}
  assert abs(sizes["llama3_8b"] - 8.03e9) < 0.01e9
  assert abs(sizes["gpt_1b"] - 1.236e9) < 0.01e9
  assert abs(sizes["llama2_70b"] - 68.98e9) < 0.05e9
  with pytest.raises(ValueError, match="unknown model preset"):
    configs.gpt.get("gpt_2b")


def test_gqa_config_errors_name_the_field():
  with pytest.raises(ValueError, match="n_kv_heads"):
    GPTConfig(vocab_size=8, d_model=8, n_layers=1, n_heads=4, n_kv_heads=3, head_dim=8, d_ff=8)


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_dense_equals_einsum_with_gradients(backend, monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: backend)  # the 2-D CPU form and the dot_general form
  ks = jax.random.split(jax.random.key(0), 4)
  x, w = jax.random.normal(ks[0], (2, 5, 6)), jax.random.normal(ks[1], (6, 3, 4))
  x2, w2 = jax.random.normal(ks[2], (2, 5, 3, 4)), jax.random.normal(ks[3], (3, 4, 6))
  cases = [(x, w, 1, "btd,dhk->bthk"), (x2, w2, 2, "bthk,hkd->btd")]
  for a, b, in_dims, spec in cases:
    np.testing.assert_allclose(gpt.dense(a, b, in_dims), jnp.einsum(spec, a, b), **TOL)
    got = jax.grad(lambda a, b, in_dims=in_dims: jnp.sum(jnp.sin(gpt.dense(a, b, in_dims))), argnums=(0, 1))(a, b)
    want = jax.grad(lambda a, b, spec=spec: jnp.sum(jnp.sin(jnp.einsum(spec, a, b))), argnums=(0, 1))(a, b)
    for g, e in zip(got, want, strict=False):
      np.testing.assert_allclose(g, e, **TOL)
