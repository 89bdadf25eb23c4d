"""Mamba-1 selective scan and the decoding state update: Pallas TPU kernels (interpret mode on CPU) against
the references, forward and every gradient; TPU AOT lowering of all the Mamba kernels (scan, SSD, update).

Tolerances, as max |kernel - reference| / max |reference| per output and per gradient:
- float32: 2e-5. Both compute in fp32; only the order of operations differs (dB and dC summed over
  channel blocks, dA accumulated chunk by chunk). Measured: < 5e-7.
- bfloat16: 1e-2. Both read the same bf16 inputs and compute in fp32, but y, du, ddelta and dz are
  rounded to bf16 (relative step 2^-8), and rounding goes differently where the fp32 values differ.
  Measured: ~6e-3 (du).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from lwjax import kernels
from lwjax.kernels import reference
from lwjax.kernels.pallas import selective_scan as pallas_scan, ssd as pallas_ssd, state_update as pallas_state_update
from lwjax.launch import aot

TOL = {"float32": 2e-5, "bfloat16": 1e-2}
OPTIONS = ("D", "z", "delta_bias", "initial_state")

# name -> (batch, len, dim, state, groups, dtype, options, block_d); chunk 16, so every length spans several
# chunks and ends in a partial one; dim 256 with block_d 128 gives two channel blocks.
CASES = {
    "f32_ungrouped_ragged_all_options": (2, 37, 16, 4, None, "float32", OPTIONS, 128),
    "bf16_grouped_two_blocks_per_group_ragged_all_options": (2, 29, 256, 16, 1, "bfloat16", OPTIONS, 128),
}
SLOW_CASES = {
    "f32_grouped_one_block_per_group_no_options": (1, 40, 256, 8, 2, "float32", (), 128),
    "f32_long_grouped_all_options": (2, 150, 512, 16, 4, "float32", OPTIONS, 128),
    "bf16_ungrouped_no_options": (1, 100, 384, 16, None, "bfloat16", (), 256),
}


def _interpret(kernel_impl):
  """The kernels' `interpret` argument; they are Mosaic (TPU) kernels, so "pallas" needs a TPU."""
  if kernel_impl == "pallas" and jax.default_backend() != "tpu":
    pytest.skip("the Mamba kernels are TPU (Mosaic) kernels; "
                "the GPU (Triton) kernel runs in test_selective_scan_triton.py")
  return False if kernel_impl == "pallas" else pltpu.InterpretParams()


def _relative_error(got, want):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)


def _scan_inputs(seed, batch, length, dim, state, groups, dtype, options):
  rng = np.random.default_rng(seed)
  def normal(*shape):
    return rng.normal(size=shape).astype(np.float32)
  bc_shape = (batch, length, state) if groups is None else (batch, length, groups, state)
  args = dict(u=normal(batch, length, dim), delta=0.5 * normal(batch, length, dim) - 1.0,
              A=-np.exp(0.5 * normal(dim, state)), B=normal(*bc_shape), C=normal(*bc_shape),
              D=normal(dim), z=normal(batch, length, dim), delta_bias=0.3 * normal(dim),
              initial_state=normal(batch, dim, state))
  args = {k: v for k, v in args.items() if k in ("u", "delta", "A", "B", "C") or k in options}
  return {k: jnp.asarray(v, dtype if k in ("u", "delta", "B", "C", "z") else jnp.float32) for k, v in args.items()}


def _outputs_and_grads(fn, args, seed):
  """fn(**args) and the gradient of every argument under random output cotangents, in one compilation."""
  @jax.jit
  def run(args):
    outs, vjp = jax.vjp(lambda a: fn(**a), args)
    keys = jax.random.split(jax.random.key(seed), len(outs))
    return outs, vjp(tuple(jax.random.normal(k, o.shape, o.dtype) for k, o in zip(keys, outs, strict=False)))[0]
  return run(args)


@pytest.mark.parametrize("name", list(CASES) + [pytest.param(n, marks=pytest.mark.slow) for n in SLOW_CASES])
def test_selective_scan_forward_and_every_gradient(name, kernel_impl):
  batch, length, dim, state, groups, dtype, options, block_d = {**CASES, **SLOW_CASES}[name]
  args = _scan_inputs(0, batch, length, dim, state, groups, dtype, options)
  def kernel(**a):
    return pallas_scan.selective_scan(**a, return_state=True, chunk=16, block_d=block_d,
                                      interpret=_interpret(kernel_impl))
  def ref(**a):
    return reference.selective_scan(**a, return_state=True)
  ((y, h), grads), ((y_ref, h_ref), grads_ref) = _outputs_and_grads(kernel, args, 1), _outputs_and_grads(ref, args, 1)
  assert y.dtype == args["u"].dtype and h.shape == (batch, dim, state)
  assert _relative_error(y, y_ref) < TOL[dtype] and _relative_error(h, h_ref) < TOL[dtype]
  assert set(grads) == set(args)
  for k in args:
    assert grads[k].dtype == args[k].dtype, k
    assert _relative_error(grads[k], grads_ref[k]) < TOL[dtype], k


def test_reference_scan_and_associative_scan_agree():
  args = _scan_inputs(2, 2, 23, 8, 4, 2, "float32", OPTIONS)
  scan = jax.jit(reference.selective_scan, static_argnames=("return_state", "method"))
  y, h = scan(**args, return_state=True)
  y_assoc, h_assoc = scan(**args, return_state=True, method="associative")
  np.testing.assert_allclose(y_assoc, y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(h_assoc, h, rtol=1e-5, atol=1e-5)


def test_dispatch_without_softplus_and_unknown_impls(kernel_impl):
  _interpret(kernel_impl)
  args = _scan_inputs(3, 2, 21, 16, 4, None, "float32", OPTIONS)
  args["delta"] = jnp.abs(args["delta"])  # used as dt directly: no softplus
  y, h = kernels.selective_scan(**args, delta_softplus=False, return_state=True, impl=kernel_impl)
  y_ref, h_ref = kernels.selective_scan(**args, delta_softplus=False, return_state=True, impl="reference")
  assert _relative_error(y, y_ref) < TOL["float32"] and _relative_error(h, h_ref) < TOL["float32"]
  with pytest.raises(ValueError, match="impl"):
    kernels.selective_scan(**args, impl="triton")


def _decode_inputs(seed, batch, length, dim, state, groups):
  """Inputs of a selective scan over `length` tokens, named as for `selective_state_update`."""
  a = _scan_inputs(seed, batch, length, dim, state, groups, "float32", OPTIONS)
  return dict(x=a["u"], dt=a["delta"], A=a["A"], B=a["B"], C=a["C"], D=a["D"], z=a["z"],
              dt_bias=a["delta_bias"]), a["initial_state"]


def test_state_update_steps_equal_the_scan(kernel_impl):
  """Prefill 9 tokens with the scan kernel, then decode 6 more: 4 in one call (every state returned) and
  2 one at a time; outputs and states equal the scan over all 15 tokens."""
  seq, state0 = _decode_inputs(4, 2, 15, 256, 8, 2)
  interpret = _interpret(kernel_impl)
  def part(lo, hi):
    return {k: v[:, lo:hi] if v.ndim >= 3 else v for k, v in seq.items()}
  def as_scan(s):
    return dict(u=s["x"], delta=s["dt"], A=s["A"], B=s["B"], C=s["C"], D=s["D"], z=s["z"],
                delta_bias=s["dt_bias"])
  y_scan, state_scan = reference.selective_scan(**as_scan(seq), initial_state=state0, return_state=True)
  _, states_all = reference.selective_state_update(state0, **seq, return_all_states=True)
  y, state = pallas_scan.selective_scan(**as_scan(part(0, 9)), initial_state=state0, return_state=True,
                                        chunk=8, interpret=interpret)
  ys = [y]
  y, states = pallas_state_update.selective_state_update(state, **part(9, 13), return_all_states=True,
                                                         interpret=interpret)
  assert _relative_error(states, states_all[:, 9:13]) < TOL["float32"]
  ys.append(y)
  state = states[:, -1]
  for t in (13, 14):
    y, state = pallas_state_update.selective_state_update(state, **part(t, t + 1), interpret=interpret)
    ys.append(y)
  assert _relative_error(jnp.concatenate(ys, axis=1), y_scan) < TOL["float32"]
  assert _relative_error(state, state_scan) < TOL["float32"]


def test_accepted_count_keeps_that_many_steps(kernel_impl):
  """Speculative verification: outputs for all k drafts; the state advances by the accepted count only."""
  _interpret(kernel_impl)
  seq, state0 = _decode_inputs(5, 3, 5, 16, 8, None)
  accepted = jnp.array([0, 2, 5])
  y, state = kernels.selective_state_update(state0, **seq, accepted=accepted, impl=kernel_impl)
  y_all, states_all = reference.selective_state_update(state0, **seq, return_all_states=True)
  assert _relative_error(y, y_all) < TOL["float32"]
  want = jnp.stack([state0[0], states_all[1, 1], states_all[2, 4]])
  assert _relative_error(state, want) < TOL["float32"]
  # bf16 state cache: updated in its own dtype.
  _, state16 = kernels.selective_state_update(state0.astype(jnp.bfloat16), **seq, accepted=accepted,
                                              impl=kernel_impl)
  assert state16.dtype == jnp.bfloat16 and _relative_error(state16, want) < TOL["bfloat16"]


AOT_AVAILABLE, AOT_WHY = aot.libtpu_available()


@pytest.mark.skipif(not AOT_AVAILABLE, reason=f"libtpu cannot load: {AOT_WHY}")
@pytest.mark.parametrize("topology", ["v5e:1x1", "v5p:2x2x1"])
def test_mamba_kernels_compile_for_tpu(topology):
  """Mosaic lowering of the scan and SSD kernels, forward and backward, and of the state
  update, bf16 inputs, grouped B/C; on several chips each call sits in `shard_map` over the batch."""
  devices = aot.tpu_devices(topology)
  mesh = jax.sharding.Mesh(devices, ("x",))
  batch, length, dim, state, groups, heads, headdim = len(devices), 512, 512, 16, 2, 8, 64
  bf16, f32, S = jnp.bfloat16, jnp.float32, jax.ShapeDtypeStruct
  shapes = dict(
      u=S((batch, length, dim), bf16), delta=S((batch, length, dim), bf16), z=S((batch, length, dim), bf16),
      B=S((batch, length, groups, state), bf16), C=S((batch, length, groups, state), bf16),
      x=S((batch, length, heads, headdim), bf16), dt=S((batch, length, heads), bf16),
      state=S((batch, dim, state), f32), accepted=S((batch,), jnp.int32))
  A, A_heads, D = -jnp.ones((dim, state), f32), -jnp.ones((heads,), f32), jnp.ones((dim,), f32)

  def per_shard(a):
    def scan_loss(u, delta, z, A, B, C):
      y, h = pallas_scan.selective_scan(u, delta, A, B, C, D, z, D, return_state=True)
      return jnp.sum(y.astype(f32) ** 2) + jnp.sum(h)
    scan_grads = jax.grad(scan_loss, argnums=range(6))(a["u"], a["delta"], a["z"], A, a["B"], a["C"])
    def ssd_loss(x):
      return jnp.sum(pallas_ssd.ssd(x, a["dt"], A_heads, a["B"], a["C"]).astype(f32) ** 2)
    ssd_value, ssd_grad = jax.value_and_grad(ssd_loss)(a["x"])
    y, new_state = pallas_state_update.selective_state_update(
        a["state"], a["u"][:, :4], a["delta"][:, :4], A, a["B"][:, :4], a["C"][:, :4], D,
        accepted=a["accepted"])
    return scan_grads, ssd_value[None], ssd_grad, y, new_state

  spec = jax.sharding.PartitionSpec("x")
  fn = jax.shard_map(per_shard, mesh=mesh, in_specs=(spec,), out_specs=spec)
  compiled = aot.compile_for_tpu(fn, shapes, topology=topology,
                                 in_shardings=jax.sharding.NamedSharding(mesh, spec),
                                 out_shardings=jax.sharding.NamedSharding(mesh, spec))
  hlo = compiled.as_text()
  for name in ("selective_scan_fwd", "selective_scan_bwd", "ssd_fwd", "ssd_bwd", "selective_state_update"):
    assert name in hlo, name
