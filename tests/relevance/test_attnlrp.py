"""AttnLRP (Achtibat et al. 2024) for the GPT: each rule against hand-derived relevances, the LRP forward against
`GPT.__call__`, conservation (what is conserved exactly and what the softmax rule absorbs), concentration,
batching, jit, sharding, the answer x prompt matrix, and the gradient x input / rollout baselines."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs.mesh
from lwjax.models.gpt import GPT, GPTConfig
from lwjax.models.logical import axis_rules
from lwjax.relevance import attnlrp, baselines, rules
from lwjax.training import mesh as mesh_lib, sharding

TINY = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48, max_seq_len=64)
# Sums of relevance over a layer: float32 rounding of terms of either sign, plus what epsilon = 1e-6 absorbs.
# Measured: rule_error <= 7e-6, head_error <= 8e-7 (random tiny GPTs, and one trained on an induction task).
CONSERVED = 2e-5

relevance = nnx.jit(attnlrp.relevance)
report = nnx.jit(attnlrp.conservation_report)
forward = nnx.jit(lambda model, tokens: model(tokens))
rollout_fn = nnx.jit(baselines.attention_rollout)


def _gpt(seed=0, **overrides) -> GPT:
  """A GPT with numpy-drawn parameters (no per-shape PRNG compiles): embeddings N(0, 1), projections
  N(0, 1/fan_in), norm scales 1 + N(0, 0.2^2) so that the norms' scales matter."""
  cfg = GPTConfig(**{**TINY, **overrides})
  graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def draw(path, shape):
    name = path[-1].key
    if name == "scale":
      return 1 + 0.2 * rng.standard_normal(shape.shape)
    fan_in = 1 if name == "embed" else math.prod(shape.shape[:2]) if name == "wo" else shape.shape[0]
    return rng.standard_normal(shape.shape) / math.sqrt(fan_in)
  params = jax.tree_util.tree_map_with_path(lambda p, s: jnp.asarray(draw(p, s), jnp.float32),
                                            nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state)


def _tokens(batch=2, length=9, seed=1):
  return jnp.asarray(np.random.default_rng(seed).integers(0, TINY["vocab_size"], (batch, length)), jnp.int32)


def _input_relevance(fn, inputs, g):
  """x * (modified cotangent) for each input x of fn, given the cotangent g at its output (R_y = y * g)."""
  _, vjp = jax.vjp(fn, *inputs)
  return [x * c for x, c in zip(inputs, vjp(g), strict=False)]


# ---- the rules, against relevances derived by hand ----

def test_epsilon_rule_on_a_2x3_linear_layer():
  x = jnp.array([[1.0, 2.0]])
  w = jnp.array([[1.0, 0.0, -3.0], [2.0, 1.0, 1.0]])
  b = jnp.array([0.0, 1.0, 0.0])  # y = x W + b = [5, 3, -1]
  # Explaining output 0 (R_y = [5, 0, 0]): R_x_i = x_i W_i0 * 5 / 5 = [1, 4], all of it (no bias on output 0).
  r_x, r_w, r_b = _input_relevance(lambda x, w, b: rules.epsilon_dense(x, w, b), (x, w, b),
                                   jnp.array([[1.0, 0.0, 0.0]]))
  np.testing.assert_allclose(r_x, [[1.0, 4.0]], rtol=1e-6)
  assert not r_w.any() and not r_b.any()  # parameters are constants of the rules
  # Explaining output 1 (R_y1 = 3): x_1 W_11 = 0, x_2 W_21 = 2; the bias absorbs the remaining 1.
  np.testing.assert_allclose(_input_relevance(lambda x: rules.epsilon_dense(x, w, b), (x,),
                                              jnp.array([[0.0, 1.0, 0.0]]))[0], [[0.0, 2.0]], rtol=1e-6)
  # All three outputs with epsilon = 1, sign-aware denominators y + sign(y) = [6, 4, -2]:
  # R_x1 = 1 (1 * 5/6 + 0 * 3/4 - 3 * 1/2) = -2/3;  R_x2 = 2 (2 * 5/6 + 1 * 3/4 + 1 * 1/2) = 35/6.
  np.testing.assert_allclose(_input_relevance(lambda x: rules.epsilon_dense(x, w, b, epsilon=1.0), (x,),
                                              jnp.ones((1, 3)))[0], [[-2 / 3, 35 / 6]], rtol=1e-6)


def test_uniform_rule_splits_a_product_in_half():
  a, b = jnp.array([2.0, -1.0]), jnp.array([3.0, 4.0])  # y = [6, -4]
  r_a, r_b = _input_relevance(rules.uniform_product, (a, b), jnp.ones(2))
  np.testing.assert_allclose(r_a, [3.0, -2.0])
  np.testing.assert_allclose(r_b, [3.0, -2.0])
  # A . B = 1 * 3 + 2 * 4 = 11: each product term's share goes half to each factor.
  r_a, r_b = _input_relevance(lambda a, b: rules.uniform_einsum("ik,kj->ij", a, b, epsilon=0.0),
                              (jnp.array([[1.0, 2.0]]), jnp.array([[3.0], [4.0]])), jnp.ones((1, 1)))
  np.testing.assert_allclose(r_a, [[1.5, 4.0]])
  np.testing.assert_allclose(r_b, [[1.5], [4.0]])


def test_identity_rule_on_rms_norm_and_silu():
  x, scale = jnp.array([3.0, 4.0]), jnp.array([2.0, 1.0])
  y = x * scale / jnp.sqrt(12.5 + 1e-5)
  r_x, r_scale = _input_relevance(lambda x, s: rules.rms_norm_identity(x, s, 1e-5), (x, scale), jnp.array([1.0, 0.0]))
  np.testing.assert_allclose(r_x, [y[0], 0.0], rtol=1e-6)  # R_x = R_y element by element
  assert not r_scale.any()
  plain = x * jax.grad(lambda x: (x * scale / jnp.sqrt(jnp.mean(x * x) + 1e-5))[0])(x)
  assert abs(plain[1]) > 0.1  # the ordinary gradient would move relevance across dimensions
  x = jnp.array([-1.0, 0.0, 2.0])
  (r_x,) = _input_relevance(lambda x: rules.elementwise_identity(jax.nn.silu, x), (x,), jnp.ones(3))
  np.testing.assert_allclose(r_x, jax.nn.silu(x), rtol=1e-6)


def test_softmax_rule_is_taylor_at_x_with_bias():
  x = jnp.array([0.0, math.log(3.0)])  # s = [1/4, 3/4]
  # Cotangent [2, 0]: R_s = s * g = [1/2, 0], sum 1/2; R_x = x (R_s - s sum R_s) = [0, -(3/4)(1/2) ln 3].
  (r_x,) = _input_relevance(rules.softmax_rule, (x,), jnp.array([2.0, 0.0]))
  np.testing.assert_allclose(r_x, [0.0, -0.375 * math.log(3.0)], rtol=1e-6)
  # A logit masked to a huge negative value gets no relevance (and no inf * 0 = nan).
  (r_x,) = _input_relevance(rules.softmax_rule, (jnp.array([1.0, -0.7 * 3.4e38]),), jnp.array([1.0, 5.0]))
  np.testing.assert_array_equal(r_x, [0.0, 0.0])


# ---- the GPT ----

@pytest.mark.parametrize("tie", [False, True])
def test_lrp_forward_is_the_gpt_forward(tie):
  model, tokens = _gpt(tie_embeddings=tie), _tokens()
  logits, _ = nnx.jit(attnlrp.lrp_forward)(model, tokens)
  np.testing.assert_allclose(logits, forward(model, tokens), atol=2e-5, rtol=2e-5)


def test_conservation_layer_by_layer():
  model, tokens = _gpt(), _tokens()
  out = report(model, tokens)
  # Final norm (identity) and LM head (epsilon): conserved.
  assert float(out["head_error"].max()) < CONSERVED
  # Each block conserves what its softmax rules do not absorb ...
  assert float(out["rule_error"].max()) < CONSERVED
  # ... and those absorb a real share (measured 3-36% per layer on random tiny GPTs), so the input relevance
  # sums to the logit minus the absorbed terms, not to the logit.
  assert float(out["layer_error"].min()) > 1e-3
  np.testing.assert_allclose(out["layer_sums"][:, 0], out["logit"] - out["softmax_absorbed"].sum(1),
                             atol=CONSERVED * float(jnp.abs(out["logit"]).max()))
  # The per-token relevance of `layer_relevance` sums to the same layer sums; index 0 is `relevance`.
  pos, tok = jnp.array([8, 8]), jnp.argmax(forward(model, tokens)[:, -1], axis=-1)
  per_layer = nnx.jit(attnlrp.layer_relevance)(model, tokens, pos, tok)
  np.testing.assert_allclose(per_layer.sum(2), out["layer_sums"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(per_layer[:, 0], relevance(model, tokens, pos, tok), rtol=1e-5, atol=1e-6)


def _copy_model():
  """Layer 0's attention copies a value from the marker token 7 to every later position; layer 1 and the MLPs
  write nothing, and the head reads only the attention output (embeddings are 0 on dims 16..31)."""
  model = _gpt()
  rng = np.random.default_rng(3)
  embed = np.zeros((50, 32), np.float32)
  embed[:, 1] = 1.0  # every query reads dim 1 ...
  embed[:, 2:10] = 0.5 * rng.standard_normal((50, 8))
  embed[7, 0] = 1.0  # ... and only the marker's key is non-zero: its score is in the tens, the others' 0
  wq, wk = np.zeros((32, 4, 8), np.float32), np.zeros((32, 2, 8), np.float32)
  wq[1, :, 3] = wk[0, :, 3] = 3.0  # head dim 3: RoPE frequency 1e-3, no rotation to speak of at length 9
  wv = np.zeros((32, 2, 8), np.float32)
  wv[2:10] = rng.standard_normal((8, 2, 8))
  wo, head = np.zeros((4, 8, 32), np.float32), np.zeros((32, 50), np.float32)
  wo[:, :, 16:] = rng.standard_normal((4, 8, 16)) / math.sqrt(32)
  head[16:] = rng.standard_normal((16, 50))
  model.embed[...], model.lm_head[...] = jnp.asarray(embed), jnp.asarray(head)
  first, second = model.layers
  first.attn.wq[...], first.attn.wk[...], first.attn.wv[...] = map(jnp.asarray, (wq, wk, wv))
  first.attn.wo[...] = jnp.asarray(wo)
  for w in (first.mlp.w_down, second.attn.wo, second.mlp.w_down):
    w[...] = jnp.zeros_like(w[...])
  return model


def test_relevance_concentrates_on_the_token_the_logit_depends_on():
  model = _copy_model()
  tokens = jnp.array([[12, 30, 7, 25, 41, 19, 33, 28, 14], [40, 11, 22, 35, 18, 7, 26, 31, 45]])
  marker = jnp.array([2, 5])
  out = report(model, tokens)  # explains the last position's argmax
  tokens_b = jnp.argmax(forward(model, tokens)[:, -1], axis=-1)
  r = relevance(model, tokens, jnp.array([8, 8]), tokens_b)
  at_marker = r[jnp.arange(2), marker]
  assert float((jnp.abs(at_marker) / jnp.abs(r).sum(1)).min()) > 0.999
  # The value path carries half of the logit (uniform rule on weights x values); the other half enters the
  # saturated softmax (s_marker ~ 1), whose rule passes on x R (1 - s) ~ 0: absorbed by its bias term.
  np.testing.assert_allclose(at_marker, out["logit"] / 2, rtol=1e-4)
  np.testing.assert_allclose(out["softmax_absorbed"][:, 0], out["logit"] / 2, rtol=1e-4)
  # Rollout follows the same attention: among the earlier tokens, the marker gets the most.
  rollout = rollout_fn(model, tokens, jnp.array([8, 8]))
  np.testing.assert_array_equal(jnp.argmax(rollout[:, :8], axis=1), marker)


def test_batch_and_jit_equal_per_example_and_later_tokens_get_nothing():
  model, tokens = _gpt(), _tokens()
  pos, tok = jnp.array([8, 4]), jnp.array([5, 17])
  batched = relevance(model, tokens, pos, tok)
  for i in range(2):
    np.testing.assert_allclose(batched[i], relevance(model, tokens[i:i + 1], pos[i], tok[i])[0], rtol=1e-5,
                               atol=1e-7)
  np.testing.assert_array_equal(batched[1, 5:], 0.0)  # causal: tokens after the target position


def test_answer_matrix_rows_are_the_answer_tokens_logits():
  model, tokens = _gpt(), _tokens()
  matrix = nnx.jit(attnlrp.answer_relevance, static_argnums=2)(model, tokens, 6)
  assert matrix.shape == (2, 3, 6)
  chunked = nnx.jit(lambda m, t: attnlrp.answer_relevance(m, t, 6, batch_size=1))(model, tokens)
  np.testing.assert_allclose(chunked, matrix, rtol=1e-5, atol=1e-7)
  for j in range(3):  # answer token j is tokens[:, 6 + j], predicted at position 5 + j
    row = relevance(model, tokens, jnp.full((2,), 5 + j), tokens[:, 6 + j])
    np.testing.assert_allclose(matrix[:, j], row[:, :6], rtol=1e-5, atol=1e-7)


def test_padded_answer_matrix_equals_the_unpadded_one():
  """Rows of three (prompt, answer) lengths right-padded with random tokens into one shape: each row's matrix is
  the unpadded row's, and exactly 0 past its answer rows and prompt columns. (The padded rows' backward passes
  go 3 at a time, 8 = 3 + 3 + 2; the unpadded ones all at once.)"""
  model, rng = _gpt(), np.random.default_rng(4)
  lengths = [(5, 3), (9, 1), (3, 6)]  # (prompt, answer)
  tokens = rng.integers(0, TINY["vocab_size"], (3, 16)).astype(np.int32)  # the padding: random tokens too
  padded = nnx.jit(lambda m, t, p, a: attnlrp.padded_answer_relevance(m, t, p, a, 8, batch_size=3))(
      model, jnp.asarray(tokens), jnp.array([p for p, _ in lengths]), jnp.array([a for _, a in lengths]))
  assert padded.shape == (3, 8, 16)
  for row, (p, a) in enumerate(lengths):
    unpadded = nnx.jit(attnlrp.answer_relevance, static_argnums=2)(model, jnp.asarray(tokens[row:row + 1, :p + a]), p)
    np.testing.assert_allclose(padded[row, :a, :p], unpadded[0], rtol=1e-5, atol=1e-6)
    assert not padded[row, a:].any() and not padded[row, :, p:].any()


def test_sharded_model_gives_the_same_relevance():
  model, tokens = _gpt(), _tokens()
  expected = relevance(model, tokens, jnp.array([8, 8]), jnp.array([5, 5]))
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, jax.devices()[:4])
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  specs = sharding.param_shardings(params, sharding.logical_axes(state), mesh, configs.mesh.DEFAULT_RULES)
  params = jax.device_put(params, specs)
  assert params["layers"][0]["attn"]["wq"].sharding.spec[1] == "tensor"

  @jax.jit
  def run(params, tokens):
    with axis_rules(mesh, configs.mesh.DEFAULT_RULES):
      return attnlrp.relevance(nnx.merge(graphdef, params), tokens, 8, 5)
  np.testing.assert_allclose(run(params, tokens), expected, rtol=1e-4, atol=1e-6)


def test_gradient_x_input_and_rollout_baselines():
  model, tokens = _gpt(), _tokens()
  gi = nnx.jit(baselines.gradient_x_input)(model, tokens, jnp.array([8, 4]), jnp.array([5, 17]))
  rollout = rollout_fn(model, tokens, jnp.array([8, 4]))
  assert gi.shape == rollout.shape == tokens.shape
  np.testing.assert_array_equal(gi[1, 5:], 0.0)
  # GI of a token that occurs once is d logit / d s at s = 1, s scaling its embedding row: a finite difference.
  unique = [i for i in range(9) if int((tokens[0] == tokens[0, i]).sum()) == 1]
  i = max(unique, key=lambda i: abs(float(gi[0, i])))
  table = model.embed[...]

  def logit(s):
    model.embed[...] = table.at[tokens[0, i]].multiply(s)
    return float(forward(model, tokens)[0, 8, 5])
  np.testing.assert_allclose(gi[0, i], (logit(1.05) - logit(0.95)) / 0.1, rtol=1e-2)
  np.testing.assert_allclose(rollout.sum(1), 1.0, rtol=1e-6)
  assert float(rollout.min()) >= 0.0 and not rollout[1, 5:].any()


def test_unsupported_models_are_refused_by_name():
  @dataclasses.dataclass(frozen=True)
  class WindowedConfig(GPTConfig):
    sliding_window: int | None = None

  model = _gpt()
  model.cfg = WindowedConfig(**{**TINY, "sliding_window": 4})
  with pytest.raises(ValueError, match="sliding_window=4"):
    attnlrp.relevance(model, _tokens(), 8, 5)
  with pytest.raises(ValueError, match="GPT"):
    attnlrp.relevance(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), _tokens(), 8, 5)
