"""Mamba-1 selective scan and decoding state update, the Pallas GPU (Triton) kernels: interpret mode on CPU
against the references, forward and every gradient, and the dispatch to them on GPU; their lowering to
Triton IR (which runs on CPU; compiling that to PTX needs a GPU).

Inputs and tolerances are those of tests/kernels/test_selective_scan.py (fp32 2e-5, bf16 1e-2, as max
|kernel - reference| / max |reference|), whose kernel runs are TPU-only. On a GPU, LWJAX_KERNEL_IMPL=pallas
runs the checks here on the compiled kernels instead of interpreting them.
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax import export

from lwjax import kernels
from lwjax.kernels import reference
from lwjax.kernels.pallas import selective_scan_triton, ssd_triton, state_update_triton
from tests.kernels.test_selective_scan import (
  CASES,
  OPTIONS,
  SLOW_CASES,
  TOL,
  _decode_inputs,
  _outputs_and_grads,
  _relative_error,
  _scan_inputs,
)

# name -> (batch, len, dim, state, groups, dtype, options, block_d, chunk, return_state, delta_softplus).
# Chunks of 4 keep the interpreted (unrolled) kernels quick to compile; 37 and 29 end in a partial chunk.
TRITON_CASES = {
    "f32_ungrouped_two_blocks_ragged_all_options": (2, 37, 16, 4, None, "float32", OPTIONS, 8, 4, True, True),
    "bf16_grouped_two_blocks_per_group_ragged_all_options":
        (2, 29, 64, 16, 2, "bfloat16", OPTIONS, 16, 4, True, True),
    "f32_grouped_state_6_padded_to_8_no_options_no_softplus_y_only":
        (1, 24, 32, 6, 2, "float32", (), 16, 8, False, False),
}
SLOW_TRITON_CASES = {
    "bf16_z_only_ragged": (2, 45, 64, 16, None, "bfloat16", ("z",), 32, 16, False, True),
    # The TPU file's cases at the default chunk (16); its block_d becomes a power of two dividing dim // groups.
    **{name: (*case, 16, True, True) for name, case in {**CASES, **SLOW_CASES}.items()},
}


def _interpret(kernel_impl):
  """The kernels' `interpret` argument: interpreted on CPU, compiled when LWJAX_KERNEL_IMPL=pallas on GPU."""
  if kernel_impl == "pallas" and jax.default_backend() != "gpu":
    pytest.skip("the compiled Triton kernels need a GPU")
  return kernel_impl != "pallas"


def _check_scan(case, interpret):
  batch, length, dim, state, groups, dtype, options, block_d, chunk, return_state, softplus = case
  args = _scan_inputs(0, batch, length, dim, state, groups, dtype, options)
  if not softplus:
    args["delta"] = jnp.abs(args["delta"])  # used as dt directly

  def run(fn, **a):
    out = fn(**a, delta_softplus=softplus, return_state=return_state)
    return out if return_state else (out,)
  kernel = functools.partial(run, functools.partial(selective_scan_triton.selective_scan, block_d=block_d,
                                                    chunk=chunk, interpret=interpret))
  outs, grads = _outputs_and_grads(kernel, args, 1)
  outs_ref, grads_ref = _outputs_and_grads(functools.partial(run, reference.selective_scan), args, 1)
  assert outs[0].dtype == args["u"].dtype and len(outs) == len(outs_ref)
  if return_state:
    assert outs[1].shape == (batch, dim, state) and outs[1].dtype == jnp.float32
  for name, got, want in zip(("y", "state"), outs, outs_ref, strict=False):
    assert _relative_error(got, want) < TOL[dtype], name
  assert set(grads) == set(args)
  for k in args:
    assert grads[k].dtype == args[k].dtype, k
    assert _relative_error(grads[k], grads_ref[k]) < TOL[dtype], k


@pytest.mark.parametrize("name", TRITON_CASES)
def test_scan_forward_and_every_gradient(name, kernel_impl):
  _check_scan(TRITON_CASES[name], _interpret(kernel_impl))


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_TRITON_CASES)
def test_scan_forward_and_every_gradient_larger_grid(name, kernel_impl):
  _check_scan(SLOW_TRITON_CASES[name], _interpret(kernel_impl))


@pytest.mark.parametrize("groups,options", [(2, ("D", "z", "dt_bias")),
                                            pytest.param(None, (), marks=pytest.mark.slow)])
def test_state_update_accepted_counts_and_all_states(groups, options, kernel_impl):
  """k = 5 draft tokens: outputs for all of them, the state after accepted = 0, 3 and 5 steps (bf16 state
  cache too), and every step's state."""
  interpret = _interpret(kernel_impl)
  seq, state0 = _decode_inputs(5, 3, 5, 64, 8, groups)
  seq = {k: v for k, v in seq.items() if k in ("x", "dt", "A", "B", "C") or k in options}
  accepted = jnp.array([0, 3, 5])
  update = functools.partial(state_update_triton.selective_state_update, block_d=16, interpret=interpret)
  y_all, states_all = reference.selective_state_update(state0, **seq, return_all_states=True)
  with_start = jnp.concatenate([state0[:, None], states_all], axis=1)
  want = with_start[jnp.arange(3), accepted]
  y, state = update(state0, **seq, accepted=accepted)
  assert _relative_error(y, y_all) < TOL["float32"] and _relative_error(state, want) < TOL["float32"]
  y, states = update(state0, **seq, return_all_states=True)
  assert states.shape == states_all.shape
  assert _relative_error(y, y_all) < TOL["float32"] and _relative_error(states, states_all) < TOL["float32"]
  _, state16 = update(state0.astype(jnp.bfloat16), **seq, accepted=accepted)
  assert state16.dtype == jnp.bfloat16 and _relative_error(state16, want) < TOL["bfloat16"]


def test_prefill_scan_then_decode_steps_equal_the_scan(kernel_impl):
  """Prefill 9 tokens with the scan kernel (state 6: padded to 8), decode 4 in one update call and 2 more
  one at a time: outputs and final state equal the reference scan over all 15 tokens."""
  interpret = _interpret(kernel_impl)
  seq, state0 = _decode_inputs(4, 2, 15, 32, 6, 2)
  def part(lo, hi):
    return {k: v[:, lo:hi] if v.ndim >= 3 else v for k, v in seq.items()}
  def as_scan(s):
    return dict(u=s["x"], delta=s["dt"], A=s["A"], B=s["B"], C=s["C"], D=s["D"], z=s["z"],
                delta_bias=s["dt_bias"])
  y_scan, state_scan = reference.selective_scan(**as_scan(seq), initial_state=state0, return_state=True)
  y, state = selective_scan_triton.selective_scan(**as_scan(part(0, 9)), initial_state=state0,
                                                  return_state=True, chunk=4, interpret=interpret)
  ys = [y]
  for lo, hi in ((9, 13), (13, 14), (14, 15)):
    y, state = state_update_triton.selective_state_update(state, **part(lo, hi), interpret=interpret)
    ys.append(y)
  assert _relative_error(jnp.concatenate(ys, axis=1), y_scan) < TOL["float32"]
  assert _relative_error(state, state_scan) < TOL["float32"]


def test_dispatch_picks_the_triton_kernels_on_gpu(monkeypatch):
  """On a GPU backend "auto" and "pallas" run the Triton scan, update and SSD (here interpreted: the backend
  is faked)."""
  calls = []

  def spy(module, name):
    real = getattr(module, name)
    def run(*args, **kwargs):
      calls.append(name)
      return real(*args, **kwargs, interpret=True)
    monkeypatch.setattr(module, name, run)
  spy(selective_scan_triton, "selective_scan")
  spy(state_update_triton, "selective_state_update")
  spy(ssd_triton, "ssd")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")

  args = _scan_inputs(3, 1, 6, 8, 4, None, "float32", ("D",))
  args["delta"] = jnp.abs(args["delta"])
  for impl in ("auto", "pallas"):
    y = kernels.selective_scan(**args, delta_softplus=False, impl=impl)
    assert _relative_error(y, reference.selective_scan(**args, delta_softplus=False)) < TOL["float32"]
  seq, state0 = _decode_inputs(5, 1, 2, 8, 4, None)
  y, _ = kernels.selective_state_update(state0, **seq, impl="auto")
  assert _relative_error(y, reference.selective_state_update(state0, **seq)[0]) < TOL["float32"]
  ssd_args = dict(x=jnp.ones((1, 4, 2, 4)), dt=jnp.ones((1, 4, 2)), A=-jnp.ones((2,)), B=jnp.ones((1, 4, 1, 4)),
                  C=jnp.ones((1, 4, 1, 4)))
  for impl in ("auto", "pallas"):
    y = kernels.ssd(**ssd_args, chunk_size=16, impl=impl)
    assert _relative_error(y, reference.ssd(**ssd_args, chunk_size=16)) < 1e-6
  assert calls == ["selective_scan", "selective_scan", "selective_state_update", "ssd", "ssd"]


_TRITON_CALL = "__gpu$xla.gpu.triton"


def _export_for_cuda(fn, *shapes):
  exported = export.export(jax.jit(fn), platforms=["cuda"],
                           disabled_checks=[export.DisabledSafetyCheck.custom_call(_TRITON_CALL)])(*shapes)
  return exported.mlir_module()


@pytest.mark.parametrize("groups", [None, 2])
def test_scan_forward_and_backward_lower_to_triton(groups):
  """bf16, b=2, l=1000 (a partial last chunk), d=256, n=16, with z, D, delta_bias and an initial and final
  state: two Triton kernels (the forward saving chunk starts, the backward)."""
  b, seq_len, d, n = 2, 1000, 256, 16
  bf16, f32, S = jnp.bfloat16, jnp.float32, jax.ShapeDtypeStruct
  bc = S((b, seq_len, n) if groups is None else (b, seq_len, groups, n), bf16)

  def loss(u, delta, z, A, B, C, D, delta_bias, h0):
    y, h = selective_scan_triton.selective_scan(u, delta, A, B, C, D, z, delta_bias, initial_state=h0,
                                                return_state=True)
    return jnp.sum(y.astype(f32) ** 2) + jnp.sum(h)

  shapes = [S((b, seq_len, d), bf16)] * 3 + [S((d, n), f32), bc, bc, S((d,), f32), S((d,), f32), S((b, d, n), f32)]
  module = _export_for_cuda(jax.value_and_grad(loss, argnums=range(9)), *shapes)
  assert module.count(_TRITON_CALL) == 2


@pytest.mark.parametrize("all_states", [False, True])
def test_state_update_lowers_to_triton(all_states):
  """bf16 inputs, float32 state [2, 256, 16], k = 4 tokens, grouped B/C: one Triton kernel."""
  b, k, d, n, g = 2, 4, 256, 16, 2
  S = jax.ShapeDtypeStruct
  seq, bc = S((b, k, d), jnp.bfloat16), S((b, k, g, n), jnp.bfloat16)

  def update(state, x, dt, z, B, C, A, D, accepted):
    return state_update_triton.selective_state_update(state, x, dt, A, B, C, D, z, D, accepted=accepted,
                                                      return_all_states=all_states)

  module = _export_for_cuda(update, S((b, d, n), jnp.float32), seq, seq, seq, bc, bc, S((d, n), jnp.float32),
                            S((d,), jnp.float32), S((b,), jnp.int32))
  assert module.count(_TRITON_CALL) == 1
