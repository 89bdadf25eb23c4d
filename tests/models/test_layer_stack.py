"""Scanned layers (`GPTConfig.scan_layers`): the same logits and gradients as the unrolled GPT, alternating windows
included; layout conversions round-trip; checkpoints and HF checkpoints load into either layout; LoRA stacks."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from lwjax.models import hf_checkpoint, layer_stack
from lwjax.models.gpt import GPT, GPTConfig
from lwjax.models.pretrained import load_pretrained
from lwjax.training import checkpoint, lora, mesh as mesh_lib
from lwjax.training.checkpoint import Checkpointer

TOL = dict(atol=1e-5, rtol=1e-5)  # float32; the scan only changes the order XLA fuses in
BASE = dict(vocab_size=61, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48, max_seq_len=64)
# Gemma-2's options: windows on even layers only, soft-capping, 1 + w norms, post-norms, GeGLU, scaled embeddings.
GEMMA2 = dict(sliding_window=4, full_attention_every=2, attn_logit_softcap=5.0, final_logit_softcap=3.0,
              norm_offset=1.0, post_norms=True, activation="gelu_tanh", embed_scale=True, tie_embeddings=True)


def _pair(**overrides):
  """(unrolled, scanned) GPTs of one config, from the same seed: the scanned one holds the same weights."""
  cfg = GPTConfig(**{**BASE, **overrides})
  return (GPT(cfg, rngs=nnx.Rngs(0)), GPT(dataclasses.replace(cfg, scan_layers=True), rngs=nnx.Rngs(0)))


def _tokens(batch=2, length=11, seed=1):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, BASE["vocab_size"])


def _params(model):
  return nnx.to_pure_dict(nnx.state(model))


def _assert_trees_close(a, b, **tol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **(tol or TOL))


@pytest.mark.parametrize("options", [
    dict(GEMMA2, remat="full"),
    pytest.param(dict(), marks=pytest.mark.slow),
    pytest.param(dict(remat="dots", qkv_bias=True), marks=pytest.mark.slow)],
    ids=["gemma2_remat_full", "llama", "qwen2_remat_dots"])
def test_scanned_logits_and_gradients_equal_unrolled(options):
  unrolled, scanned = _pair(**options)
  tokens, targets = _tokens(), _tokens(seed=2)

  def loss(model):
    logits = model(tokens)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)), logits
  ((_, logits_u), grads_u), ((_, logits_s), grads_s) = (
      jax.jit(nnx.value_and_grad(loss, has_aux=True))(m) for m in (unrolled, scanned))
  np.testing.assert_allclose(logits_s, logits_u, **TOL)
  _assert_trees_close(nnx.to_pure_dict(grads_s), layer_stack.stack_layers(nnx.to_pure_dict(grads_u)))


@pytest.mark.slow
def test_scanned_packed_sequences_equal_unrolled():
  unrolled, scanned = _pair(**GEMMA2)
  tokens = _tokens(length=12)
  segments = jnp.repeat(jnp.array([[1, 2, 3], [1, 1, 2]]), 4, axis=1)
  positions = jnp.tile(jnp.arange(4), (2, 3))
  kwargs = dict(positions_bt=positions, segment_ids_bt=segments)
  np.testing.assert_allclose(scanned(tokens, **kwargs), unrolled(tokens, **kwargs), **TOL)


def test_scanned_model_decodes_like_unrolled():
  unrolled, scanned = _pair(**GEMMA2)
  tokens = _tokens()

  @jax.jit
  def decode(model):
    logits, cache = model.prefill(tokens[:, :-1], model.init_cache(2, 16))
    return logits, model.decode_step(tokens[:, -1], cache)[0]
  _assert_trees_close(decode(scanned), decode(unrolled))


def test_stacked_params_carry_the_layers_axis():
  scanned = nnx.eval_shape(lambda: GPT(GPTConfig(**BASE, scan_layers=True), rngs=nnx.Rngs(0)))
  wq = scanned.layers.attn.wq
  assert wq.shape == (4, 32, 4, 8)
  assert wq.get_metadata()["logical_axes"] == ("layers", "embed", "heads", "head_dim")


def test_layout_conversion_round_trips():
  unrolled, scanned = _pair(**GEMMA2)
  per_layer, stacked = _params(unrolled), _params(scanned)
  assert not layer_stack.is_stacked(per_layer) and layer_stack.is_stacked(stacked)
  _assert_trees_close(layer_stack.stack_layers(per_layer), stacked, atol=0, rtol=0)
  _assert_trees_close(layer_stack.unstack_layers(stacked), per_layer, atol=0, rtol=0)
  _assert_trees_close(layer_stack.to_layout(layer_stack.to_layout(per_layer, True), False), per_layer, atol=0,
                      rtol=0)
  assert layer_stack.to_layout(stacked, True) == stacked  # already in that layout: unchanged


def test_period_must_divide_n_layers():
  with pytest.raises(ValueError, match=r"n_layers \(3\) must be a multiple of full_attention_every \(2\)"):
    GPTConfig(**{**BASE, **GEMMA2, "n_layers": 3, "scan_layers": True})
  GPTConfig(**{**BASE, **GEMMA2, "n_layers": 3})  # unrolled: any depth


def _save_run(directory, model):
  ckpt = Checkpointer(str(directory / "checkpoints"), async_save=False)
  ckpt.save(1, {"params": _params(model)}, config=ml_collections.ConfigDict({"model": model.cfg.to_dict()}),
            force=True)
  ckpt.close()


@pytest.mark.parametrize("saved_scanned", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["unrolled_to_scanned", "scanned_to_unrolled"])
def test_checkpoint_loads_into_the_other_layout(tmp_path, saved_scanned):
  unrolled, scanned = _pair(**GEMMA2)
  _save_run(tmp_path, scanned if saved_scanned else unrolled)
  want = dataclasses.replace(unrolled.cfg, scan_layers=not saved_scanned)
  loaded, _, _ = checkpoint.load_model(str(tmp_path / "checkpoints"), lambda _: GPT(want, rngs=nnx.Rngs(5)))
  assert loaded.cfg.scan_layers == (not saved_scanned)
  _assert_trees_close(_params(loaded), _params(unrolled if saved_scanned else scanned), atol=0, rtol=0)
  # load_pretrained gives per-layer blocks unless asked for the stack; on a mesh the stack's layers axis is whole
  assert not load_pretrained(tmp_path)[0].cfg.scan_layers
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 4, "tensor": 2}, jax.devices()[:8])
  on_mesh = load_pretrained(tmp_path, scan_layers=True, mesh=mesh)[0]
  assert on_mesh.layers.attn.wq[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)


def test_hf_import_and_export_of_a_scanned_model(tmp_path):
  cfg = GPTConfig(**{**BASE, **GEMMA2})
  hf_checkpoint.save_random(cfg, tmp_path / "in", seed=3)
  unrolled = hf_checkpoint.load(tmp_path / "in")
  scanned = hf_checkpoint.load(tmp_path / "in", scan_layers=True)
  assert scanned.cfg.scan_layers and scanned.layers.mlp.w_up.shape == (4, 32, 48)
  _assert_trees_close(_params(scanned), layer_stack.stack_layers(_params(unrolled)), atol=0, rtol=0)
  hf_checkpoint.save(scanned, tmp_path / "out")
  _assert_trees_close(_params(hf_checkpoint.load(tmp_path / "out")), _params(unrolled), atol=0, rtol=0)


def test_lora_adapters_stack_with_the_layers():
  per_layer_params = _params(GPT(GPTConfig(**{**BASE, "n_layers": 2}), rngs=nnx.Rngs(0)))
  stacked_params = layer_stack.stack_layers(per_layer_params)
  config = lora.LoRAConfig(rank=2, targets=("wq", "wo", "w_down"))
  stacked = lora.init(stacked_params, config, jax.random.key(0))
  assert stacked["layers"]["attn"]["wo"]["a"].shape == (2, 4, 8, 2)  # [layers, heads, head_dim, rank]
  assert stacked["layers"]["attn"]["wo"]["b"].shape == (2, 2, 32)
  stacked = jax.tree.map(lambda x: x + 0.1, stacked)  # b = 0 at init: move it, so the merge changes weights
  axes = lora.logical_axes({"layers": {"attn": {"wq": ("layers", "embed", "heads", "head_dim")}}},
                           lora.LoRAConfig(rank=2, targets=("wq",)))
  assert axes["layers"]["attn"]["wq"] == {"a": ("layers", "embed", None), "b": ("layers", None, "heads", "head_dim")}
  merge = jax.jit(functools.partial(lora.merge, config=config))
  _assert_trees_close(merge(stacked_params, stacked),
                      layer_stack.stack_layers(merge(per_layer_params, layer_stack.unstack_layers(stacked))))
