"""Flash attention (the Pallas TPU kernel, interpret mode on CPU) against the reference; TPU AOT lowering.

Under LWJAX_KERNEL_IMPL=pallas (tests/kernels/conftest.py) the same checks run the compiled kernel of the
accelerator instead: Mosaic on TPU, Triton on GPU.

Tolerances, as max |kernel - reference| / max |reference| for the output and each gradient:
- float32: 2e-5. Both sides compute in fp32; only the summation order differs (blocked online softmax);
  about 5e-7 is seen.
- bfloat16: 2e-2. Both take bf16 inputs with fp32 accumulation but round different things to bf16 before
  the second matmuls (unnormalised block probabilities and ds here, normalised probabilities there), and
  outputs and gradients are bf16 themselves (relative step 2^-8); about 7e-3 is seen.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import tpu as pltpu

from lwjax import kernels
from lwjax.kernels import reference
from lwjax.kernels.pallas import attention as pallas_attention, attention_triton as pallas_attention_triton
from lwjax.launch import aot
from lwjax.models.gpt import GPT, GPTConfig

TOL = {"float32": 2e-5, "bfloat16": 2e-2}

# name -> (batch, q_len, kv_len, heads, kv_heads, dim, q_offset, causal, window, segments, softcap)
CASES = {
    "prefill_gqa4_offsets": (2, 19, 53, 8, 2, 128, [34, 20], True, None, None, None),
    "packed_gqa8_window": (2, 40, 40, 8, 1, 16, 0, True, 11, "packed", None),
    "cross_segment_pairs": (2, 13, 29, 4, 4, 16, 0, False, None, "pairs", None),
    "decode_window_offsets": (3, 1, 45, 4, 1, 16, [44, 7, 30], True, 16, None, None),
}
# Gemma-2's capped scores with a window that starts and ends inside key blocks (a Gemma-2 sliding layer), GQA;
# the shapes of "prefill_gqa4_offsets" (no new random-number programs to compile).
SOFTCAP_CASE = (2, 19, 53, 8, 2, 128, [17, 5], True, 9, None, 0.8)
SLOW_CASES = {
    "self_ragged": (2, 37, 37, 4, 4, 64, 0, True, None, None, None),
    "long_prefill_gqa8": (2, 70, 200, 8, 1, 16, [130, 3], True, None, None, None),
    "noncausal_window_gqa4_dim128": (1, 64, 64, 4, 1, 128, 0, False, 20, None, None),
    "packed_prefill_window_dim128": (2, 12, 40, 4, 2, 128, [28, 9], True, 12, "pairs", None),
    "softcap_window_gqa4_offsets": SOFTCAP_CASE,
    "softcap_prefill_gqa8_dim128": (2, 19, 53, 8, 1, 128, [34, 20], True, None, None, 50.0),
    "softcap_packed_window_gqa2": (2, 40, 40, 4, 2, 64, 0, True, 7, "packed", 1.0),
    "softcap_noncausal_pairs": (2, 13, 29, 4, 4, 16, 0, False, None, "pairs", 0.5),
    # a window of 2, not 1: a query that sees itself only has an output independent of k (dk: rounding noise)
    "softcap_window_2_decode": (3, 1, 45, 4, 1, 16, [44, 7, 30], True, 2, None, 2.0),
}


def kernel_under_test(kernel_impl):
  """(kernel, its options) for `kernel_impl`; in interpret mode with small blocks so that short sequences
  span many blocks (skipping, clamped index maps and padding all run)."""
  if kernel_impl == "interpret":
    return pallas_attention.attention, dict(interpret=True, block_q=16, block_k=8)
  if jax.default_backend() == "gpu":  # Triton: power-of-two blocks of at least 16
    return pallas_attention_triton.attention, dict(block_q=16, block_k=16)
  return pallas_attention.attention, {}


def inputs(case, dtype, seed=0):
  batch, q_len, kv_len, heads, kv_heads, dim, q_offset, causal, window, segments, softcap = case
  keys = jax.random.split(jax.random.key(seed), 6)
  q = jax.random.normal(keys[0], (batch, q_len, heads, dim), dtype)  # scores of about 1: a cap of 0.8 saturates
  k = jax.random.normal(keys[1], (batch, kv_len, kv_heads, dim), dtype)
  v = jax.random.normal(keys[2], (batch, kv_len, kv_heads, dim), dtype)
  d_out = jax.random.normal(keys[3], q.shape, dtype)
  if segments == "packed":
    segment_ids = jnp.sort(jax.random.randint(keys[4], (batch, q_len), 0, 3), axis=1)
  elif segments == "pairs":  # some query segments have no keys: those rows give zeros
    segment_ids = tuple(jnp.sort(jax.random.randint(key, (batch, n), 0, 4), axis=1)
                        for key, n in ((keys[4], q_len), (keys[5], kv_len)))
  else:
    segment_ids = None
  options = dict(causal=causal, window=window, segment_ids=segment_ids, q_offset=jnp.asarray(q_offset))
  if softcap is not None:
    options["softcap"] = softcap
  return (q, k, v), d_out, options


def rel_err(x, ref):
  x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
  return np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-6)


def check_against_reference(kernel, case, dtype, **kernel_options):
  """Output and dq, dk, dv of `kernel(q, k, v, **options, **kernel_options)` against the reference."""
  qkv, d_out, options = inputs(case, dtype)

  def vjp(f):
    out, pullback = jax.vjp(lambda q, k, v: f(q, k, v, **options), *qkv)
    return (out, *pullback(d_out))

  with jax.default_matmul_precision("highest"):  # fp32 reference without TF32/bf16 passes on GPU/TPU
    got, want = jax.jit(lambda: (vjp(lambda *a, **o: kernel(*a, **o, **kernel_options)),
                                 vjp(reference.attention)))()  # one compilation for both
  for name, x, y in zip(("out", "dq", "dk", "dv"), got, want, strict=False):
    assert x.dtype == y.dtype, name
    assert rel_err(x, y) < TOL[jnp.dtype(dtype).name], (name, rel_err(x, y))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", CASES)
def test_forward_and_gradients_match_reference(kernel_impl, name, dtype):
  kernel, options = kernel_under_test(kernel_impl)
  check_against_reference(kernel, CASES[name], dtype, **options)


@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)])
def test_softcap_and_window_match_reference(kernel_impl, dtype):
  """Forward and the gradients through the cap (1 - tanh^2); more soft-capped cases in SLOW_CASES."""
  kernel, options = kernel_under_test(kernel_impl)
  check_against_reference(kernel, SOFTCAP_CASE, dtype, **options)


@pytest.mark.slow
@pytest.mark.parametrize("blocks", [dict(block_q=8, block_k=32), dict(block_q=32, block_k=16), {}])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", list(CASES) + list(SLOW_CASES))
def test_forward_and_gradients_match_reference_larger_grid(name, dtype, blocks):
  check_against_reference(pallas_attention.attention, {**CASES, **SLOW_CASES}[name], dtype, interpret=True,
                          **blocks)


def test_tpu_interpreter_agrees(kernel_impl):
  """Pallas' TPU interpreter models VMEM/SMEM and the DMAs, and raises on out-of-bounds block reads, which
  the clamped index maps must never cause; slower than the generic interpreter the grid runs on."""
  if kernel_impl == "pallas":
    pytest.skip("a CPU simulation of the TPU kernel")
  case = (2, 12, 40, 2, 1, 128, [28, 9], True, 12, "pairs", None)
  check_against_reference(pallas_attention.attention, case, jnp.float32, interpret=pltpu.InterpretParams(),
                          block_q=16, block_k=8)


def test_invisible_blocks_are_neither_computed_nor_differentiated(kernel_impl):
  # In units of one key block n: queries at [4n, 6n) with a window of n see keys [3n + 1, 6n) only. NaN
  # keys/values in [0, 3n) and [6n, 8n) would poison any block product that touched them, masked or not.
  n = 8 if kernel_impl == "interpret" else 16 if jax.default_backend() == "gpu" else 128
  kernel, options = kernel_under_test(kernel_impl)
  options.update(block_q=n, block_k=n)
  qkv, d_out, case_options = inputs((1, 2 * n, 8 * n, 4, 2, 16, 4 * n, True, n, None, None), jnp.float32)
  q, k, v = qkv
  poison = jnp.zeros(k.shape).at[:, :3 * n].set(jnp.nan).at[:, 6 * n:].set(jnp.nan)
  out, pullback = jax.vjp(lambda q, k, v: kernel(q, k, v, **options, **case_options), q, k + poison, v + poison)
  dq, dk, dv = pullback(d_out)
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(out, reference.attention(q, k, v, **case_options), atol=2e-5)
  assert np.isfinite(dq).all()
  assert np.isfinite(dk[:, 3 * n:6 * n]).all() and np.isfinite(dv[:, 3 * n:6 * n]).all()
  for grad in (dk, dv):  # written as zeros, never computed
    np.testing.assert_array_equal(grad[:, :3 * n], 0.0)
    np.testing.assert_array_equal(grad[:, 6 * n:], 0.0)


def test_dispatch_runs_the_kernel(kernel_impl):
  qkv, _, options = inputs(CASES["prefill_gqa4_offsets"], jnp.float32)
  with jax.default_matmul_precision("highest"):
    got = jax.jit(lambda *a: kernels.attention(*a, **options, impl=kernel_impl))(*qkv)
    want = jax.jit(lambda *a: kernels.attention(*a, **options, impl="reference"))(*qkv)
  np.testing.assert_allclose(got, want, atol=2e-5)
  with pytest.raises(ValueError, match="impl"):
    kernels.attention(*qkv, impl="flash")


def test_gpt_with_the_kernel_gives_reference_logits(kernel_impl):
  cfg = dict(vocab_size=61, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48,
             max_seq_len=64)
  tokens = jax.random.randint(jax.random.key(1), (2, 21), 0, 61)
  forward = nnx.jit(lambda model, tokens: model(tokens))
  with jax.default_matmul_precision("highest"):
    logits = {impl: forward(GPT(GPTConfig(**cfg, attention_impl=impl), rngs=nnx.Rngs(0)), tokens)
              for impl in (kernel_impl, "reference")}
  np.testing.assert_allclose(logits[kernel_impl], logits["reference"], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("q_len,kv_len,q_offset,window", [(1024, 1024, 0, None), (1024, 1024, 0, 256),
                                                         (256, 1024, 300, None), (256, 1024, 300, 200)])
def test_cost_estimate_counts_the_pairs_of_the_blocks_the_kernels_visit(q_len, kv_len, q_offset, window):
  """The blocks holding a visible (query, key) pair, by brute force over positions; causal self-attention over
  n blocks of B: n (n + 1) / 2 blocks, T (T + B) / 2 pairs."""
  block = 128
  cfg = pallas_attention.FlashConfig(causal=True, window=window, softcap=None, sm_scale=1.0, block_q=block,
                                     block_k=block, kv_len=kv_len, groups=1, dim=64, segments=False,
                                     interpret=False, q_offset=q_offset)
  q_pos, k_pos = q_offset + np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
  visible = (k_pos <= q_pos) & ((q_pos - k_pos < window) if window else True)
  blocks = visible.reshape(q_len // block, block, kv_len // block, block).any(axis=(1, 3)).sum()
  assert pallas_attention.visited_pairs(cfg, q_len, kv_len) == blocks * block * block
  if q_len == kv_len and window is None:
    assert blocks * block * block == q_len * (q_len + block) // 2
  traced = dataclasses.replace(cfg, q_offset=None)  # an offset per sequence (chunked prefill): every pair
  assert pallas_attention.visited_pairs(traced, q_len, kv_len) == q_len * kv_len


AOT_AVAILABLE, AOT_WHY = aot.libtpu_available()


@pytest.mark.skipif(not AOT_AVAILABLE, reason=f"libtpu cannot load: {AOT_WHY}")
@pytest.mark.parametrize("topology,dim", [("v5e:1x1", 64), ("v5p:2x2x1", 128)])
def test_forward_and_backward_compile_for_tpu(topology, dim):
  """The Mosaic lowering of all three kernels: bf16, GQA 4, segment ids, per-sequence offsets, a window,
  Gemma-2's soft cap and a ragged length (the blocks of 512 pad 1000 to 1024).

  On several chips a Mosaic call must sit inside `shard_map` (XLA cannot partition it): here the batch is
  split over the chips, as data parallelism would.
  """
  devices = aot.tpu_devices(topology)
  mesh = jax.sharding.Mesh(devices, ("x",))
  batch, length, heads, kv_heads = 2 * len(devices), 1000, 8, 2
  spec = jax.sharding.PartitionSpec("x")

  def per_shard(q, k, v, segment_ids, q_offset):
    def loss(q, k, v):
      out = pallas_attention.attention(q, k, v, segment_ids=segment_ids, q_offset=q_offset, window=512,
                                       softcap=50.0)
      return jnp.sum(out.astype(jnp.float32) ** 2)
    value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
    return value[None], grads

  shapes = [jax.ShapeDtypeStruct((batch, length, heads, dim), jnp.bfloat16)]
  shapes += [jax.ShapeDtypeStruct((batch, length, kv_heads, dim), jnp.bfloat16)] * 2
  shapes += [jax.ShapeDtypeStruct((batch, length), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.int32)]
  sharded = jax.sharding.NamedSharding(mesh, spec)
  compiled = aot.compile_for_tpu(jax.shard_map(per_shard, mesh=mesh, in_specs=spec, out_specs=spec), *shapes,
                                 topology=topology, in_shardings=sharded, out_shardings=sharded)
  hlo = compiled.as_text()
  assert all(f"flash_attention_{name}" in hlo for name in ("fwd", "dq", "dkv"))
  grads_bytes_per_chip = sum(np.prod(s.shape) * 2 for s in shapes[:3]) // len(devices)
  assert compiled.memory_analysis().output_size_in_bytes >= grads_bytes_per_chip


@pytest.mark.skipif(not AOT_AVAILABLE, reason=f"libtpu cannot load: {AOT_WHY}")
def test_gpt_gradient_with_the_kernel_compiles_for_tpu():
  """The kernel plugs into the model on TPU: a GPT loss gradient with attention_impl="pallas" lowers."""
  cfg = GPTConfig(vocab_size=128, d_model=128, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=128, d_ff=256,
                  max_seq_len=1024, attention_impl="pallas")
  graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))

  def loss(state, tokens):
    logits = nnx.merge(graphdef, state)(tokens)
    return jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[..., 0])

  abstract_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  compiled = aot.compile_for_tpu(jax.grad(loss), abstract_state, jax.ShapeDtypeStruct((1, 1000), jnp.int32))
  hlo = compiled.as_text()
  assert all(f"flash_attention_{name}" in hlo for name in ("fwd", "dq", "dkv"))
