"""LoRA over the GPT params: zero-init is the base model, only adapters train, merged equals adapted."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

from configs import gpt
from lwjax.models.gpt import GPT, GPTConfig
from lwjax.training import lora


def _model():
  cfg = GPTConfig.from_dict(gpt.get("gpt_tiny"))
  graphdef, state = nnx.split(GPT(cfg, rngs=nnx.Rngs(0)))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
  return graphdef, nnx.to_pure_dict(state), tokens


def _logits(graphdef, params, tokens):
  return nnx.merge(graphdef, params)(tokens)


@pytest.mark.slow
def test_zero_initialised_adapters_leave_the_forward_unchanged():
  graphdef, base, tokens = _model()
  adapters = lora.init(base, lora.LoRAConfig(rank=4), jax.random.key(2))
  assert len(traverse_util.flatten_dict(adapters)) == 2 * 2 * len(lora.TARGETS)  # an (a, b) per weight, 2 layers
  assert adapters["layers"][0]["attn"]["wo"]["a"].shape == (4, 16, 4)  # [heads, head_dim, rank]
  merged = lora.merge(base, adapters, lora.LoRAConfig(rank=4))
  np.testing.assert_array_equal(_logits(graphdef, merged, tokens), _logits(graphdef, base, tokens))


def test_only_adapters_train_and_merged_weights_equal_the_adapter_forward():
  graphdef, base, tokens = _model()
  config = lora.LoRAConfig(rank=2, alpha=4.0, targets=("wq", "w_down"))
  adapters = lora.init(base, config, jax.random.key(3))

  def loss(ad, params):
    logits = _logits(graphdef, lora.merge(params, ad, config), tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  base_grads = jax.grad(loss, argnums=1)(adapters, base)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(base_grads))
  grads = jax.grad(loss)(adapters, base)
  flat_grads = traverse_util.flatten_dict(grads)
  assert all(float(jnp.abs(g).max()) > 0 for path, g in flat_grads.items() if path[-1] == "b")  # b = 0: a waits
  tx = optax.adam(1e-2)
  opt_state = tx.init(adapters)
  frozen = jax.tree.map(np.array, base)
  for _ in range(3):
    updates, opt_state = tx.update(jax.grad(loss)(adapters, base), opt_state, adapters)
    adapters = optax.apply_updates(adapters, updates)
  jax.tree.map(np.testing.assert_array_equal, base, frozen)
  assert lora.num_params(adapters) == 2 * ((64 * 2 + 2 * 4 * 16) + (128 * 2 + 2 * 64))  # 2 layers

  merged = jax.tree.map(np.asarray, lora.merge(base, adapters, config))
  delta = merged["layers"][0]["mlp"]["w_down"] - base["layers"][0]["mlp"]["w_down"]
  assert np.linalg.matrix_rank(delta, tol=1e-6) == 2  # a rank-2 update that did change the weight
  np.testing.assert_array_equal(merged["layers"][0]["attn"]["wk"], base["layers"][0]["attn"]["wk"])
  fresh = GPT(GPTConfig.from_dict(gpt.get("gpt_tiny")), rngs=nnx.Rngs(9))
  nnx.replace_by_pure_dict(state := nnx.state(fresh), merged)
  nnx.update(fresh, state)
  np.testing.assert_allclose(fresh(tokens), _logits(graphdef, lora.merge(base, adapters, config), tokens),
                             rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(fresh(tokens) - _logits(graphdef, base, tokens)).max()) > 1e-4


def test_rejects_unknown_targets():
  with pytest.raises(ValueError, match="targets"):
    lora.LoRAConfig(targets=("wq", "embed"))


def test_adapter_factors_take_the_weights_input_and_output_axes():
  """`a` covers the input axes of the weight, `b` its output axes: a b is laid out (and sharded) like W."""
  _, base, _ = _model()
  axes = {"layers": {0: {"attn": {"wq": ("embed", "heads", "head_dim"), "wo": ("heads", "head_dim", "embed"),
                                  "wk": ("embed", "kv_heads", "head_dim")}}}}
  config = lora.LoRAConfig(rank=2, targets=("wq", "wo"))
  assert lora.logical_axes(axes, config) == {"layers": {0: {"attn": {
      "wq": {"a": ("embed", None), "b": (None, "heads", "head_dim")},
      "wo": {"a": ("heads", "head_dim", None), "b": (None, "embed")}}}}}
  adapters = lora.init(jax.eval_shape(lambda: base), config, jax.random.key(0))  # shapes are all it reads
  for name in ("wq", "wo"):
    w, pair = base["layers"][0]["attn"][name], adapters["layers"][0]["attn"][name]
    assert pair["a"].shape == (*w.shape[:len(pair["a"].shape) - 1], 2) and lora.delta(pair, config).shape == w.shape
