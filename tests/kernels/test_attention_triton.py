"""Flash attention, the Pallas GPU (Triton) kernel: interpret mode on CPU against the reference, and its
lowering to Triton IR (which runs on CPU; compiling that to PTX needs a GPU).

Cases and tolerances are those of tests/kernels/test_attention.py. On a GPU, LWJAX_KERNEL_IMPL=pallas runs
that file's checks on this kernel compiled; the interpret runs here are then skipped.
"""

import jax
import jax.numpy as jnp
import pytest
from jax import export

from lwjax.kernels.pallas import attention_triton
from tests.kernels.test_attention import CASES, SLOW_CASES, SOFTCAP_CASE, check_against_reference


@pytest.fixture(autouse=True)
def _interpret_only(kernel_impl):
  if kernel_impl == "pallas":
    pytest.skip("CPU interpretation; the compiled kernel runs in test_attention.py")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", CASES)
def test_forward_and_gradients_match_reference(name, dtype):
  check_against_reference(attention_triton.attention, CASES[name], dtype, interpret=True, block_q=16,
                          block_k=16)


@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)])
def test_softcap_and_window_match_reference(dtype):
  check_against_reference(attention_triton.attention, SOFTCAP_CASE, dtype, interpret=True, block_q=16, block_k=16)


@pytest.mark.slow
@pytest.mark.parametrize("blocks", [dict(block_q=16, block_k=32), dict(block_q=32, block_k=16), {}])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", list(CASES) + list(SLOW_CASES))
def test_forward_and_gradients_match_reference_larger_grid(name, dtype, blocks):
  check_against_reference(attention_triton.attention, {**CASES, **SLOW_CASES}[name], dtype, interpret=True,
                          **blocks)


@pytest.mark.parametrize("dim,window,segments,softcap", [(128, None, False, None), (64, 256, True, 50.0)])
def test_forward_and_backward_lower_to_triton(dim, window, segments, softcap):
  """bf16, causal, GQA 4, per-sequence offsets, length 1000 (padded to the blocks): three Triton kernels."""
  batch, length, heads, kv_heads = 2, 1000, 8, 2

  def loss(q, k, v, segment_ids, q_offset):
    out = attention_triton.attention(q, k, v, q_offset=q_offset, segment_ids=segment_ids if segments else None,
                                     window=window, softcap=softcap)
    return jnp.sum(out.astype(jnp.float32) ** 2)

  shapes = [jax.ShapeDtypeStruct((batch, length, heads, dim), jnp.bfloat16)]
  shapes += [jax.ShapeDtypeStruct((batch, length, kv_heads, dim), jnp.bfloat16)] * 2
  shapes += [jax.ShapeDtypeStruct((batch, length), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.int32)]
  exported = export.export(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))), platforms=["cuda"],
                           disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*shapes)
  assert exported.mlir_module().count("__gpu$xla.gpu.triton") == 3  # forward, dq, dk/dv
