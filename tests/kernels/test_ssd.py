"""Mamba-2 SSD: the quadratic and chunked references against each other and against the Mamba-1 scan; the
Pallas TPU kernels (interpret mode on CPU) against the quadratic reference, forward and every gradient.
(Their TPU lowering is compiled in test_selective_scan.py, with the other Mamba kernels.)

Tolerances, as max |kernel - reference| / max |reference|:
- float32: 2e-5. Both compute in fp32; the kernels sum chunk by chunk (measured: ~1e-6).
- bfloat16: 2e-2. The forward kernel feeds the MXU bf16 operands (C B^T from the bf16 inputs; the masked
  scores and dt * x rounded to bf16 for the second matmul) with fp32 accumulation, and y, dx are bf16
  (measured: ~4e-3).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from lwjax import kernels
from lwjax.kernels import reference
from lwjax.kernels.pallas import ssd as pallas_ssd

TOL = {"float32": 2e-5, "bfloat16": 2e-2}
OPTIONS = ("D", "z", "dt_bias", "initial_state")


def _relative_error(got, want):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)


def _inputs(seed, batch, length, heads, headdim, groups, state, dtype, options=OPTIONS):
  rng = np.random.default_rng(seed)
  def normal(*shape):
    return rng.normal(size=shape).astype(np.float32)
  args = dict(x=normal(batch, length, heads, headdim), dt=0.5 * normal(batch, length, heads) - 1.0,
              A=-np.exp(0.5 * normal(heads)), B=normal(batch, length, groups, state),
              C=normal(batch, length, groups, state), D=normal(heads), z=normal(batch, length, heads, headdim),
              dt_bias=0.3 * normal(heads), initial_state=normal(batch, heads, headdim, state))
  args = {k: v for k, v in args.items() if k in ("x", "dt", "A", "B", "C") or k in options}
  return {k: jnp.asarray(v, dtype if k in ("x", "B", "C", "z") else jnp.float32) for k, v in args.items()}


def _outputs_and_grads(fn, args):
  """fn(**args) and the gradient of every argument under random output cotangents, in one compilation."""
  @jax.jit
  def run(args):
    outs, vjp = jax.vjp(lambda a: fn(**a), args)
    keys = jax.random.split(jax.random.key(2), len(outs))
    return outs, vjp(tuple(jax.random.normal(k, o.shape, o.dtype) for k, o in zip(keys, outs, strict=False)))[0]
  return run(args)


def test_quadratic_and_chunked_forms_equal_the_mamba1_scan():
  """SSD is the Mamba-1 scan with A, D, dt repeated over each head's channels (scalar decay per head)."""
  a = _inputs(0, 2, 23, 4, 3, 2, 5, "float32")
  b, seq_len, h, p = a["x"].shape
  def per_channel(v):
    return jnp.repeat(v, p, axis=-1)
  y_scan, h_scan = jax.jit(reference.selective_scan, static_argnames="return_state")(
      a["x"].reshape(b, seq_len, h * p), per_channel(a["dt"]), per_channel(a["A"])[:, None].repeat(5, 1), a["B"],
      a["C"], per_channel(a["D"]), a["z"].reshape(b, seq_len, h * p), per_channel(a["dt_bias"]),
      initial_state=a["initial_state"].reshape(b, h * p, 5), return_state=True)
  for chunk_size in (None, 4, 7):
    y, state = jax.jit(lambda a, chunk_size=chunk_size: reference.ssd(**a, return_state=True, chunk_size=chunk_size))(a)
    np.testing.assert_allclose(y.reshape(b, seq_len, h * p), y_scan, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.reshape(b, h * p, 5), h_scan, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
def test_kernel_forward_and_every_gradient(dtype, kernel_impl):
  """Ragged length over chunks of 16, 2 groups of 2 heads, all options; the backward kernel's gradients."""
  if kernel_impl == "pallas" and jax.default_backend() != "tpu":
    pytest.skip("the SSD kernel is a TPU (Mosaic) kernel; the GPU (Triton) kernel runs in test_ssd_triton.py")
  args = _inputs(1, 2, 37, 4, 8, 2, 16, dtype)
  interpret = False if kernel_impl == "pallas" else pltpu.InterpretParams()
  def kernel(**a):
    return pallas_ssd.ssd(**a, return_state=True, chunk_size=16, interpret=interpret)
  def ref(**a):
    return reference.ssd(**a, return_state=True)
  ((y, state), grads), ((y_ref, state_ref), grads_ref) = _outputs_and_grads(kernel, args), _outputs_and_grads(ref, args)
  assert y.dtype == args["x"].dtype and state.dtype == jnp.float32
  assert _relative_error(y, y_ref) < TOL[dtype] and _relative_error(state, state_ref) < TOL[dtype]
  for k in args:
    assert grads[k].dtype == args[k].dtype, k
    assert _relative_error(grads[k], grads_ref[k]) < TOL[dtype], k


def test_dispatch(kernel_impl):
  if kernel_impl == "pallas" and jax.default_backend() != "tpu":
    pytest.skip("the SSD kernel is a TPU (Mosaic) kernel; the GPU (Triton) kernel runs in test_ssd_triton.py")
  args = _inputs(2, 1, 20, 2, 8, 1, 8, "float32", options=("D",))
  y = kernels.ssd(**args, chunk_size=8, impl=kernel_impl)
  assert _relative_error(y, kernels.ssd(**args, impl="reference")) < TOL["float32"]
  with pytest.raises(ValueError, match="impl"):
    kernels.ssd(**args, impl="cuda")
