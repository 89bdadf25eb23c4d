"""Mamba-2 SSD, the Pallas GPU (Triton) kernels: interpret mode on CPU against the quadratic reference,
forward and every gradient; their lowering to Triton IR (which runs on CPU; compiling that to PTX needs a GPU).

Inputs and tolerances are those of tests/kernels/test_ssd.py (fp32 2e-5, bf16 2e-2, as max |kernel -
reference| / max |reference|; measured here: fp32 ~1e-6, bf16 ~8e-3). On a GPU, LWJAX_KERNEL_IMPL=pallas
runs the checks here on the compiled kernels instead of interpreting them.
"""

import jax
import jax.numpy as jnp
import pytest
from jax import export

from lwjax.kernels import reference
from lwjax.kernels.pallas import ssd_triton
from tests.kernels.test_ssd import OPTIONS, TOL, _inputs, _outputs_and_grads, _relative_error

# name -> (batch, len, heads, headdim, groups, state, dtype, options, chunk_size, return_state, dt_softplus).
# Headdim 8 and state 6 are zero-padded to 16 (Triton dot tiles); 37 and 45 end in a partial chunk.
CASES = {
    "f32_ragged_grouped_padded_dims_all_options": (2, 37, 4, 8, 2, 6, "float32", OPTIONS, 16, True, True),
    "bf16_ragged_grouped_all_options": (1, 37, 4, 16, 2, 16, "bfloat16", OPTIONS, 16, True, True),
    "f32_one_group_no_options_no_softplus_y_only": (1, 32, 2, 16, 1, 16, "float32", (), 16, False, False),
}
SLOW_CASES = {
    "bf16_one_chunk_shorter_than_chunk_size": (2, 20, 2, 16, 1, 16, "bfloat16", OPTIONS, 128, True, True),
    "f32_z_and_D_only_chunk_32_ragged": (1, 45, 4, 16, 4, 32, "float32", ("D", "z"), 32, False, True),
    "bf16_headdim_64_state_128_chunk_64": (1, 150, 2, 64, 1, 128, "bfloat16", OPTIONS, 64, True, True),
    "f32_heads_per_group_4_initial_state_only": (2, 50, 8, 16, 2, 16, "float32", ("initial_state",), 16, True,
                                                 True),
}


def _interpret(kernel_impl):
  """The kernels' `interpret` argument: interpreted on CPU, compiled when LWJAX_KERNEL_IMPL=pallas on GPU."""
  if kernel_impl == "pallas" and jax.default_backend() != "gpu":
    pytest.skip("the compiled Triton kernels need a GPU")
  return kernel_impl != "pallas"


def _check(case, interpret):
  batch, length, heads, headdim, groups, state, dtype, options, chunk_size, return_state, softplus = case
  args = _inputs(3, batch, length, heads, headdim, groups, state, dtype, options)
  if not softplus:
    args["dt"] = jnp.abs(args["dt"])  # used as dt directly

  def run(fn, **a):
    out = fn(**a, dt_softplus=softplus, return_state=return_state)
    return out if return_state else (out,)
  def kernel(**a):
    return run(ssd_triton.ssd, **a, chunk_size=chunk_size, interpret=interpret)
  (outs, grads), (outs_ref, grads_ref) = (_outputs_and_grads(kernel, args),
                                          _outputs_and_grads(lambda **a: run(reference.ssd, **a), args))
  assert outs[0].dtype == args["x"].dtype and len(outs) == len(outs_ref)
  if return_state:
    assert outs[1].shape == (batch, heads, headdim, state) and outs[1].dtype == jnp.float32
  for name, got, want in zip(("y", "state"), outs, outs_ref, strict=False):
    assert _relative_error(got, want) < TOL[dtype], name
  assert set(grads) == set(args)
  for k in args:
    assert grads[k].dtype == args[k].dtype, k
    assert _relative_error(grads[k], grads_ref[k]) < TOL[dtype], k


@pytest.mark.parametrize("name", CASES)
def test_forward_and_every_gradient(name, kernel_impl):
  _check(CASES[name], _interpret(kernel_impl))


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_CASES)
def test_forward_and_every_gradient_larger_grid(name, kernel_impl):
  _check(SLOW_CASES[name], _interpret(kernel_impl))


def test_forward_without_gradient_saves_no_starts(kernel_impl):
  """Outside autodiff the forward kernel runs alone (no chunk starts written): y and the final state."""
  interpret = _interpret(kernel_impl)
  args = _inputs(4, 1, 21, 2, 16, 1, 16, "float32", ("D", "initial_state"))
  y, state = jax.jit(lambda a: ssd_triton.ssd(**a, return_state=True, chunk_size=16, interpret=interpret))(args)
  y_ref, state_ref = reference.ssd(**args, return_state=True)
  assert _relative_error(y, y_ref) < TOL["float32"] and _relative_error(state, state_ref) < TOL["float32"]


@pytest.mark.parametrize("chunk_size", [8, 48])
def test_chunk_size_must_be_a_power_of_two_of_at_least_16(chunk_size):
  args = _inputs(0, 1, 8, 2, 16, 1, 16, "float32", ())
  with pytest.raises(ValueError, match="power of two"):
    ssd_triton.ssd(**args, chunk_size=chunk_size, interpret=True)


_TRITON_CALL = "__gpu$xla.gpu.triton"


@pytest.mark.parametrize("groups", [1, 4])
def test_forward_and_backward_lower_to_triton(groups):
  """bf16, b=2, l=1000 (a partial last chunk of 128), 8 heads of 64, state 128, with D, z, dt_bias and an
  initial and final state: two Triton kernels (the forward saving chunk starts, the backward)."""
  b, seq_len, h, p, n = 2, 1000, 8, 64, 128
  bf16, f32, S = jnp.bfloat16, jnp.float32, jax.ShapeDtypeStruct

  def loss(x, dt, A, B, C, D, z, dt_bias, h0):
    y, state = ssd_triton.ssd(x, dt, A, B, C, D, z, dt_bias, initial_state=h0, return_state=True)
    return jnp.sum(y.astype(f32) ** 2) + jnp.sum(state)

  seq, bc, head = S((b, seq_len, h, p), bf16), S((b, seq_len, groups, n), bf16), S((h,), f32)
  shapes = [seq, S((b, seq_len, h), f32), head, bc, bc, head, seq, head, S((b, h, p, n), f32)]
  exported = export.export(jax.jit(jax.value_and_grad(loss, argnums=range(9))), platforms=["cuda"],
                           disabled_checks=[export.DisabledSafetyCheck.custom_call(_TRITON_CALL)])(*shapes)
  module = exported.mlir_module()
  assert module.count(_TRITON_CALL) == 2
  assert "ssd_fwd" in module and "ssd_bwd" in module
  forward_only = export.export(jax.jit(loss), platforms=["cuda"],
                               disabled_checks=[export.DisabledSafetyCheck.custom_call(_TRITON_CALL)])(*shapes)
  assert forward_only.mlir_module().count(_TRITON_CALL) == 1
