"""The loop-aware cost account of compiled TPU programs (needs libtpu from `jax[tpu]`; skips with the reason
otherwise): loops counted as often as they run, dots as 2 m n k, unknown trip counts flagged, a GPT step."""

import importlib

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from lwjax.kernels.pallas import attention as pallas_attention
from lwjax.launch import aot, compile as compile_lib, hlo_cost, tpu_types

AVAILABLE, WHY = aot.libtpu_available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"libtpu cannot load: {WHY}")


def _xla_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


def test_a_scanned_layer_stack_counts_every_layer_like_its_unrolled_twin():
  """N layers of sharded matmuls on 4 chips (each weight all-gathered in the loop): the scan's count equals the
  unrolled program's, which equals XLA's of the unrolled program; XLA counts the scan's body once."""
  layers, batch, width = 4, 256, 512
  mesh = jax.sharding.Mesh(aot.tpu_devices("v5e:2x2"), ("x",))
  x = jax.ShapeDtypeStruct((batch, width), jnp.bfloat16, sharding=NamedSharding(mesh, P("x", None)))
  ws = jax.ShapeDtypeStruct((layers, width, width), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, None, "x")))

  def scanned(x, ws):
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]

  def unrolled(x, ws):
    for i in range(layers):
      x = jnp.tanh(x @ ws[i])
    return x
  compiled = {f.__name__: jax.jit(f).lower(x, ws).compile() for f in (scanned, unrolled)}
  cost = {name: hlo_cost.analyze(c.as_text()) for name, c in compiled.items()}
  matmul_flops = layers * 2 * (batch // 4) * width * width  # per chip: a quarter of the rows
  for name in compiled:  # the fusions holding the dots also hold the tanh and a convert
    assert cost[name].classes["matmul"].flops == pytest.approx(matmul_flops, rel=0.005)
  assert cost["scanned"].flops == pytest.approx(cost["unrolled"].flops, rel=0.01)
  assert cost["unrolled"].flops == pytest.approx(_xla_flops(compiled["unrolled"]), rel=0.01)
  assert _xla_flops(compiled["scanned"]) == pytest.approx(cost["unrolled"].flops / layers, rel=0.02)
  [loop] = cost["scanned"].loops
  assert loop.trip_count == layers and not cost["scanned"].lower_bound
  assert loop.body_flops == pytest.approx(matmul_flops / layers, rel=0.01)
  # Each layer's weight is all-gathered inside the loop: 3/4 of the gathered [width, width] bf16 arrives per chip.
  assert cost["scanned"].total("ici_bytes") == pytest.approx(layers * width * width * 2 * 3 / 4, rel=0.01)
  assert "4 trips" in hlo_cost.format_table(cost["scanned"])


def test_dot_flops_are_two_m_n_k_with_batch_dims():
  b, m, k, n = 3, 128, 256, 384
  compiled = aot.compile_for_tpu(lambda x, y: jnp.einsum("bmk,bkn->bmn", x, y), jax.ShapeDtypeStruct(
      (b, m, k), jnp.float32), jax.ShapeDtypeStruct((b, k, n), jnp.float32))
  cost = hlo_cost.analyze(compiled.as_text())
  assert cost.classes["matmul"].flops == 2 * b * m * n * k and cost.classes["matmul"].count == 1
  # Bytes at the fusion's boundary: the two operands and the output (dims of whole tiles: no padding).
  assert cost.classes["matmul"].bytes == 4 * b * (m * k + k * n + m * n)


def test_a_while_loop_of_unknown_trip_count_makes_the_total_a_lower_bound():
  def doubled_until(x, n):
    return jax.lax.while_loop(lambda c: c[1] < n, lambda c: (c[0] @ c[0], c[1] + 1), (x, 0))[0]
  compiled = aot.compile_for_tpu(doubled_until, jax.ShapeDtypeStruct((128, 128), jnp.float32),
                                 jax.ShapeDtypeStruct((), jnp.int32))
  cost = hlo_cost.analyze(compiled.as_text())
  assert cost.lower_bound and [loop.trip_count for loop in cost.loops] == [None]
  assert cost.classes["matmul"].flops == 2 * 128**3  # the body, once
  assert "a lower bound" in hlo_cost.format_table(cost)


def test_the_flash_attention_kernels_report_the_causal_blocks_they_visit():
  """Causal self-attention over 4 blocks of 256: the kernels visit 10 of the 16 (query, key) blocks; forward 2
  matmuls per visited pair, dq 3, dk/dv 4, each 2 FLOPs x dim."""
  batch, length, heads, dim, block = 2, 1024, 4, 128, 256
  q = jax.ShapeDtypeStruct((batch, length, heads, dim), jnp.bfloat16)

  def loss(q, k, v):
    out = pallas_attention.attention(q, k, v, causal=True, block_q=block, block_k=block)
    return jnp.sum(out.astype(jnp.float32))
  compiled = aot.compile_for_tpu(jax.grad(loss, argnums=(0, 1, 2)), q, q, q)
  cost = hlo_cost.analyze(compiled.as_text())
  pairs = 10 * block * block
  assert pairs == length * (length + block) // 2
  assert cost.classes["attention"].count == 3
  assert cost.classes["attention"].flops == (2 + 3 + 4) * 2 * batch * heads * pairs * dim
  assert cost.classes["attention"].transcendentals == 3 * batch * heads * pairs


def test_a_gpt_train_step_counts_its_micro_batch_and_layer_loops():
  """gpt_tiny in 2 micro-batches on 4 chips: scanned layers count what unrolled ones do; the micro-batch loop
  runs twice, its body about half the step (the optimizer update is outside it); XLA counts about half."""
  config = importlib.import_module("experiments.lm_pretrain").get_config("scale=smoke")
  config.mesh.shape.update(data=2, fsdp=2, tensor=1)
  config.train.grad_accum_steps = 2
  reports = {}
  for scan in (True, False):
    config.model.scan_layers = scan
    reports[scan] = compile_lib.compile_train_step(config, tpu_types.parse("v5e", "2x2"))
  scanned, unrolled = (reports[scan]["hlo_cost"] for scan in (True, False))
  assert scanned["totals"]["flops"] == pytest.approx(unrolled["totals"]["flops"], rel=0.02)
  assert scanned["classes"]["matmul"]["flops"] == pytest.approx(unrolled["classes"]["matmul"]["flops"], rel=0.02)
  assert not scanned["lower_bound"] and not unrolled["lower_bound"]
  micro_batches = scanned["loops"][0]  # the outermost loop, listed first
  assert micro_batches["trip_count"] == 2 and micro_batches["times"] == 1
  assert 2 * micro_batches["body_flops"] == pytest.approx(scanned["totals"]["flops"], rel=0.05)
  layer_loops = [loop for loop in scanned["loops"][1:] if loop["trip_count"] == 2 and loop["times"] == 2]
  assert len(layer_loops) >= 2  # forward and backward scans over the 2 layers, in each micro-batch
  assert reports[True]["xla_counted_once"]["flops"] < 0.35 * scanned["totals"]["flops"]
  # Each op is charged to the project's line it came from: the model's matmuls to gpt.py, summing to the class.
  by_flops = unrolled["top_sources_by_flops"]
  assert any(s["source"].startswith("matmul: lwjax/models/") and s["flops"] > 0 for s in by_flops)
  assert sum(s["flops"] for s in by_flops) <= unrolled["totals"]["flops"] * 1.0001


NESTED_SLICE_HLO = """HloModule nested_slice

%inner (p0: f32[8,1024]) -> f32[1,1024] {
  %p0 = f32[8,1024]{1,0} parameter(0)
  %c = s32[] constant(0)
  ROOT %ds = f32[1,1024]{1,0} dynamic-slice(%p0, %c, %c), dynamic_slice_sizes={1,1024}
}

%outer (q0: f32[8,1024]) -> f32[1,1024] {
  %q0 = f32[8,1024]{1,0} parameter(0)
  ROOT %f = f32[1,1024]{1,0} fusion(%q0), kind=kLoop, calls=%inner
}

ENTRY %main (a: f32[8,1024]) -> f32[1,1024] {
  %a = f32[8,1024]{1,0} parameter(0)
  ROOT %g = f32[1,1024]{1,0} fusion(%a), kind=kLoop, calls=%outer
}
"""


def test_a_buffer_a_nested_fusion_only_slices_counts_the_slice():
  """A scan's stacked residuals reach the layer's fusion whole, and a fusion inside it reads one layer: the
  bytes are that slice and the output, not the whole stack."""
  cost = hlo_cost.analyze(NESTED_SLICE_HLO)
  assert cost.total("bytes") == 2 * 1024 * 4
