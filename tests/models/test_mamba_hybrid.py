"""Hybrid Mamba/attention GPTs (The Mamba in the Llama, arXiv 2408.15237): the attention initialisation, the
linear-attention view it relies on, and the recurrent decode / speculative verification against the scan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lwjax.config import ConfigError, validate
from lwjax.kernels import reference
from lwjax.models import gpt, mamba_hybrid as mh

TINY = gpt.GPTConfig(vocab_size=50, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                     max_seq_len=64)


HYBRID = mh.HybridConfig(gpt=TINY, mamba_layers=mh.every_other_layer(4, 0.5), chunk_size=8)
# Jitted once per shape: eager op-by-op dispatch of these models costs minutes of compilation on CPU.
forward = nnx.jit(lambda model, tokens: model(tokens))
prefill = nnx.jit(lambda model, tokens, cache, num_new: model.prefill(tokens, cache, num_new))
verify = nnx.jit(lambda model, tokens, cache, accepted: model.verify(tokens, cache, accepted))
decode = nnx.jit(lambda model, tokens, cache: model.decode_step(tokens, cache))


@pytest.fixture(scope="module")
def teacher():
  return nnx.jit(lambda: gpt.GPT(TINY, rngs=nnx.Rngs(0)))()


@pytest.fixture(scope="module")
def hybrid(teacher):
  @nnx.jit
  def make(teacher):
    model = mh.HybridGPT.from_teacher(teacher, HYBRID, rngs=nnx.Rngs(1))
    # Larger dt than the initialisation, so that the state carries information further.
    for block in model.layers:
      if isinstance(block, mh.MambaBlock):
        block.mixer.dt_bias[...] = jnp.full_like(block.mixer.dt_bias[...], 0.5)
    return model
  return make(teacher)


def _tokens(shape, seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 0, TINY.vocab_size)


def test_layer_choice():
  assert mh.every_other_layer(4, 0.5) == (0, 2)
  assert mh.every_other_layer(8, 0.25) == (0, 1, 2, 4, 5, 6)
  assert mh.every_other_layer(8, 0.125) == (0, 1, 2, 3, 4, 5, 6)
  assert mh.every_other_layer(4, 0.0) == (0, 1, 2, 3)
  assert mh.every_other_layer(4, 1.0) == ()


def test_config_round_trip_and_errors():
  cfg = mh.HybridConfig(gpt=TINY, mamba_layers=(2, 0, 2))
  assert cfg.mamba_layers == (0, 2) and cfg.attention_layers == (1, 3)
  assert mh.HybridConfig.from_dict(cfg.to_dict()) == cfg
  validate(cfg.to_dict(), mh.CONFIG_SCHEMA)
  with pytest.raises(ConfigError, match=r"^scan_impl: 'fast' is not a valid choice"):
    validate({**cfg.to_dict(), "scan_impl": "fast"}, mh.CONFIG_SCHEMA)
  with pytest.raises(ValueError, match="mamba_layers \\[7\\]"):
    mh.HybridConfig(gpt=TINY, mamba_layers=(7,))


def test_attention_init_maps_v_k_q_o_and_copies_the_rest(teacher, hybrid):
  for i, (mine, theirs) in enumerate(zip(hybrid.layers, teacher.layers, strict=True)):
    if i in hybrid.cfg.mamba_layers:
      mixer = mine.mixer
      for ours, attn in (("w_x", "wv"), ("w_b", "wk"), ("w_c", "wq"), ("w_o", "wo")):
        np.testing.assert_array_equal(getattr(mixer, ours)[...], getattr(theirs.attn, attn)[...])
      assert mixer.w_x.shape == (32, 2, 8) and mixer.w_c.shape == (32, 4, 8)  # x, B at the KV width (GQA)
      np.testing.assert_array_equal(mine.mlp.w_down[...], theirs.mlp.w_down[...])
      np.testing.assert_array_equal(mine.attn_norm.scale[...], theirs.attn_norm.scale[...])
      a = -np.exp(np.asarray(mixer.a_log[...]))
      assert np.all((a <= -1.0) & (a >= -16.0))
      dt = np.asarray(jax.nn.softplus(mh.MambaMixer(hybrid.cfg, rngs=nnx.Rngs(3)).dt_bias[...]))
      assert np.all((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001))
    else:
      np.testing.assert_array_equal(mine.attn.wq[...], theirs.attn.wq[...])
  np.testing.assert_array_equal(hybrid.embed[...], teacher.embed[...])
  # With no Mamba layer the hybrid is the teacher.
  same = nnx.jit(lambda t: mh.HybridGPT.from_teacher(t, mh.HybridConfig(gpt=TINY), rngs=nnx.Rngs(2)))(teacher)
  tokens = _tokens((2, 20))
  np.testing.assert_allclose(forward(same, tokens), forward(teacher, tokens), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_random_init_baseline_keeps_mlps_but_not_attention(teacher):
  cfg = mh.HybridConfig(gpt=TINY, mamba_layers=(0, 2))
  model = nnx.jit(lambda t: mh.HybridGPT.from_teacher(t, cfg, rngs=nnx.Rngs(1), attention_init=False))(teacher)
  assert not np.array_equal(model.layers[0].mixer.w_x[...], teacher.layers[0].attn.wv[...])
  np.testing.assert_array_equal(model.layers[0].mlp.w_up[...], teacher.layers[0].mlp.w_up[...])
  with pytest.raises(ConfigError, match="model.gpt"):
    mh.HybridGPT.from_teacher(teacher, mh.HybridConfig(gpt=gpt.GPTConfig(**{**TINY.__dict__, "d_ff": 32})),
                              rngs=nnx.Rngs(0))


def test_ssm_without_decay_is_causal_linear_attention():
  """The correspondence behind the initialisation: x = V, B = K, C = Q, A = 0, dt = 1 gives sum_s (q_t.k_s) v_s."""
  b, t, h, kvh, p = 2, 10, 4, 2, 8
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (b, t, h, p))
  k = jax.random.normal(keys[1], (b, t, kvh, p))
  v = jax.random.normal(keys[2], (b, t, kvh, p))
  k_h, v_h = jnp.repeat(k, h // kvh, axis=2), jnp.repeat(v, h // kvh, axis=2)
  y = reference.ssd(v_h, jnp.ones((b, t, h)), jnp.zeros((h,)), k_h, q, dt_softplus=False, chunk_size=4)
  scores = jnp.einsum("bthp,bshp->bhts", q, k_h) * jnp.tril(jnp.ones((t, t)))
  np.testing.assert_allclose(y, jnp.einsum("bhts,bshp->bthp", scores, v_h), rtol=1e-4, atol=1e-4)


def test_recurrent_decode_equals_the_scan_forward(hybrid):
  tokens = _tokens((2, 20), seed=1)
  full = forward(hybrid, tokens)
  cache = hybrid.init_cache(2, 32)
  all_new = jnp.array([10, 10])
  logits, cache = prefill(hybrid, tokens[:, :10], cache, jnp.array([7, 7]))  # a chunk through the scan
  np.testing.assert_allclose(logits[:, :7], full[:, :7], rtol=2e-4, atol=2e-4)
  logits, cache = prefill(hybrid, tokens[:, 7:17], cache, all_new)  # chunked prefill continues the state
  np.testing.assert_allclose(logits, full[:, 7:17], rtol=2e-4, atol=2e-4)
  for i in range(17, 20):  # then token by token through the recurrent path
    logits, cache = decode(hybrid, tokens[:, i], cache)
    np.testing.assert_allclose(logits, full[:, i], rtol=2e-4, atol=2e-4)
  assert np.all(np.asarray(cache.lengths) == 20)


def test_ragged_prefill_leaves_padding_out(hybrid):
  tokens = _tokens((2, 10), seed=2)
  logits, cache = prefill(hybrid, tokens, hybrid.init_cache(2, 32), jnp.array([10, 5]))
  nxt = _tokens((2,), seed=3)
  step, _ = decode(hybrid, nxt, cache)
  # Each row alone, unpadded, then the next token (causal: what follows position n does not matter).
  filler = _tokens((2, 20), seed=9)
  alone = jnp.stack([jnp.concatenate([tokens[row, :n], nxt[row:row + 1], filler[row, :19 - n]])
                     for row, n in enumerate([10, 5])])
  ref = forward(hybrid, alone)
  for row, n in enumerate([10, 5]):
    np.testing.assert_allclose(logits[row, :n], ref[row, :n], rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(step[row], ref[row, n], rtol=2e-4, atol=2e-4)


def test_verify_keeps_the_state_after_the_accepted_tokens(hybrid):
  """Speculative verification: k draft tokens in one pass; the state rolls back to the accepted prefix."""
  prompt, draft = _tokens((2, 10), seed=4), _tokens((2, 4), seed=5)
  _, cache = prefill(hybrid, prompt, hybrid.init_cache(2, 32), jnp.array([10, 10]))
  verify_logits, after = verify(hybrid, draft, cache, jnp.array([1, 3]))
  filler = _tokens((2, 9), seed=8)
  full = forward(hybrid, jnp.concatenate([prompt, draft, filler[:, :6]], axis=1))
  np.testing.assert_allclose(verify_logits, full[:, 10:14], rtol=2e-4, atol=2e-4)
  nxt = _tokens((2,), seed=6)
  logits, _ = decode(hybrid, nxt, after)
  seqs = jnp.stack([jnp.concatenate([prompt[row], draft[row, :a], nxt[row:row + 1], filler[row, :9 - a]])
                    for row, a in enumerate([1, 3])])
  ref = forward(hybrid, seqs)
  for row, a in enumerate([1, 3]):
    np.testing.assert_allclose(logits[row], ref[row, 10 + a], rtol=2e-4, atol=2e-4)


@pytest.mark.slow
def test_gradients_reach_every_mixer_parameter(hybrid):
  tokens = _tokens((2, 21), seed=7)

  def loss(model):
    logits = model(tokens[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1))
  grads = nnx.jit(nnx.grad(loss))(hybrid)
  mixer = grads.layers[0].mixer
  for name in ("w_x", "w_b", "w_c", "w_o", "w_z", "w_dt", "conv_x", "dt_bias", "a_log", "d_skip", "norm"):
    g = np.asarray(getattr(mixer, name)[...])
    assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0, name
