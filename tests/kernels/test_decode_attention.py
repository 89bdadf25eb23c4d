"""Paged decode attention: the Pallas kernels against the reference, the reference against dense attention,
the TPU kernel compiled for v5e and v5p topologies and the GPU kernel lowered to Triton, on CPU.

Tolerances (max |kernel - reference| <= atol + rtol |reference|, outputs O(1)): float32 2e-5 (the same fp32
math in another summation order; 2e-7 seen in interpret mode); bfloat16 2e-2 (bf16 inputs and outputs, and
probabilities rounded to bf16 against a running rather than the final maximum; one bf16 ulp, 8e-3, seen).
"""

import ctypes
import functools
import platform

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh, PartitionSpec as P

from lwjax import kernels
from lwjax.kernels import cpu as cpu_kernels, reference
from lwjax.kernels.pallas import decode_attention as pallas_decode
from lwjax.launch import aot

TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}
PAGE_SIZE = 8


def _paged_inputs(seed, lengths, *, q_tokens, heads, kv_heads, dim=16, dtype=jnp.float32, max_pages=6,
                  key_growth=0.0, page_size=PAGE_SIZE):
  """Random q and a shuffled page pool; pages no sequence uses hold NaN, slots past a length garbage. Keys grow
  by `key_growth` per position (the scores' maximum then moves to later pages as they are read)."""
  rng = np.random.default_rng(seed)
  batch = len(lengths)
  num_pages = batch * max_pages + 3
  page_table = rng.permutation(num_pages)[:batch * max_pages].reshape(batch, max_pages).astype(np.int32)
  k_pages = np.full((kv_heads, num_pages, page_size, dim), np.nan, np.float32)
  v_pages = k_pages.copy()
  for b, length in enumerate(lengths):
    num_used = -(-length // page_size)
    used = page_table[b, :num_used]
    k_pages[:, used] = 1e3  # garbage in the slots of the last page past the length
    v_pages[:, used] = -1e3
    for pos in range(length):
      page, slot = page_table[b, pos // page_size], pos % page_size
      k_pages[:, page, slot] = rng.normal(size=(kv_heads, dim)) * (1 + key_growth * pos)
      v_pages[:, page, slot] = rng.normal(size=(kv_heads, dim))
    page_table[b, num_used:] = -1  # table entries past the length are never read
  q = rng.normal(size=(batch, q_tokens, heads, dim))
  return (jnp.asarray(q, dtype), jnp.asarray(k_pages, dtype), jnp.asarray(v_pages, dtype), jnp.asarray(page_table),
          jnp.asarray(lengths, jnp.int32))


def _reference(q, k_pages, v_pages, page_table, lengths, **options):
  """The reference on the same inputs with the NaN pages zeroed (it gathers whole page-table rows)."""
  return jax.jit(functools.partial(reference.decode_attention, **options))(
      q, jnp.nan_to_num(k_pages), jnp.nan_to_num(v_pages), page_table, lengths)


# Lengths: one key, ending mid-page, ending on a page boundary, the whole table; q_tokens = 4 also has a
# sequence shorter than its new tokens (its first queries see no key and give zeros).
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("q_tokens,heads,kv_heads,dtype,lengths", [
    (1, 8, 2, jnp.float32, [1, 19, 24, 48]),
    (1, 8, 1, jnp.bfloat16, [1, 19, 24, 48]),
    (4, 8, 2, jnp.bfloat16, [2, 19, 24, 48]),
    (4, 4, 4, jnp.float32, [4, 13, 40, 48]),
])
@pytest.mark.parametrize("num_splits", [None, 3])
def test_kernel_matches_reference(kernel_impl, backend, q_tokens, heads, kv_heads, dtype, lengths, num_splits):
  if kernel_impl == "pallas" and backend != jax.default_backend():
    pytest.skip(f"the {backend} kernel does not run on {jax.default_backend()}")
  inputs = _paged_inputs(0, lengths, q_tokens=q_tokens, heads=heads, kv_heads=kv_heads, dtype=dtype)
  out = pallas_decode.decode_attention(*inputs, backend=backend, num_splits=num_splits, block_kv=16,
                                       interpret=kernel_impl == "interpret")
  assert out.shape == inputs[0].shape and out.dtype == dtype
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(_reference(*inputs), np.float32),
                             atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


# Windows shorter than a page, spanning page and block boundaries, of one key, and longer than the context.
@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("q_tokens,dtype,window,softcap,num_splits", [
    (4, jnp.float32, 11, 0.8, 3),
    pytest.param(1, jnp.float32, 5, None, None, marks=pytest.mark.slow),
    pytest.param(3, jnp.bfloat16, 20, 2.0, 2, marks=pytest.mark.slow),
    pytest.param(2, jnp.float32, 1, None, 3, marks=pytest.mark.slow),
    pytest.param(1, jnp.float32, 100, 50.0, None, marks=pytest.mark.slow),
    pytest.param(1, jnp.bfloat16, None, 0.5, 3, marks=pytest.mark.slow),
])
def test_kernel_with_window_and_softcap_matches_reference(kernel_impl, backend, q_tokens, dtype, window, softcap,
                                                         num_splits):
  if kernel_impl == "pallas" and backend != jax.default_backend():
    pytest.skip(f"the {backend} kernel does not run on {jax.default_backend()}")
  inputs = _paged_inputs(5, [2, 19, 33, 48], q_tokens=q_tokens, heads=8, kv_heads=2, dtype=dtype, key_growth=0.1)
  options = dict(window=window, softcap=softcap)
  out = pallas_decode.decode_attention(*inputs, **options, backend=backend, num_splits=num_splits, block_kv=16,
                                       interpret=kernel_impl == "interpret")
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(_reference(*inputs, **options), np.float32),
                             atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("kernel", [pytest.param("tpu", marks=pytest.mark.slow),
                                    pytest.param("gpu", marks=pytest.mark.slow), "cpu"])
def test_blocks_before_the_window_are_not_read(kernel_impl, kernel):
  """Keys before the window of every new token, in whole blocks of 16 (two pages), hold NaN: a kernel that
  read them into its products would return NaN."""
  if kernel == "cpu" and not cpu_kernels.available():
    pytest.skip("the native CPU kernel does not build here (no g++?)")
  if kernel != "cpu" and kernel_impl == "pallas" and kernel != jax.default_backend():
    pytest.skip(f"the {kernel} kernel does not run on {jax.default_backend()}")
  q, k_pages, v_pages, page_table, lengths = _paged_inputs(6, [40, 47], q_tokens=2, heads=4, kv_heads=2, max_pages=7)
  options = dict(window=7, sm_scale=0.3, softcap=2.0)  # the first visible keys: 32 and 39
  want = _reference(q, k_pages, v_pages, page_table, lengths, **options)
  stale = np.asarray(page_table)[:, :4]  # keys 0..31 of each sequence
  k_pages, v_pages = k_pages.at[:, stale].set(jnp.nan), v_pages.at[:, stale].set(jnp.nan)
  if kernel == "cpu":
    got = jax.jit(functools.partial(cpu_kernels.paged_attention, **options))(q, k_pages, v_pages, page_table, lengths)
  else:
    got = pallas_decode.decode_attention(q, k_pages, v_pages, page_table, lengths, **options, backend=kernel,
                                         num_splits=2, block_kv=16, interpret=kernel_impl == "interpret")
  np.testing.assert_allclose(got, want, atol=TOLERANCE[jnp.float32], rtol=TOLERANCE[jnp.float32])


def test_tpu_kernel_in_tpu_interpret_mode(kernel_impl):
  """Pallas' TPU simulator (DMAs into VMEM, scalar prefetch in SMEM, race detection), beyond plain interpret."""
  if kernel_impl == "pallas":
    pytest.skip("a CPU simulation of the TPU kernel")
  inputs = _paged_inputs(3, [2, 21, 48], q_tokens=4, heads=8, kv_heads=2, dtype=jnp.bfloat16)
  options = dict(window=13, softcap=2.0)  # skipped blocks before the window map to a block that is read
  out = pallas_decode.decode_attention(*inputs, **options, backend="tpu", num_splits=2, block_kv=16,
                                       interpret=pltpu.InterpretParams(detect_races=True))
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(_reference(*inputs, **options), np.float32),
                             atol=TOLERANCE[jnp.bfloat16], rtol=TOLERANCE[jnp.bfloat16])


@pytest.mark.parametrize("options", [{}, pytest.param(dict(window=6, softcap=2.0), marks=pytest.mark.slow)])
def test_dispatch_picks_the_kernel_and_the_reference(kernel_impl, options):
  inputs = _paged_inputs(1, [7, 30], q_tokens=2, heads=4, kv_heads=2)
  inputs = (inputs[0], jnp.nan_to_num(inputs[1]), jnp.nan_to_num(inputs[2]), *inputs[3:])

  def run(impl):
    return jax.jit(functools.partial(kernels.decode_attention, sm_scale=0.3, **options, impl=impl))(*inputs)
  want = run("reference")
  np.testing.assert_allclose(run(kernel_impl), want, atol=TOLERANCE[jnp.float32])
  np.testing.assert_allclose(run("auto"), want, atol=TOLERANCE[jnp.float32])
  with pytest.raises(ValueError, match="impl"):
    kernels.decode_attention(*inputs, impl="cuda")


@pytest.mark.skipif(not cpu_kernels.available(), reason="the native CPU kernel does not build here (no g++?)")
@pytest.mark.parametrize("q_tokens,heads,kv_heads,lengths,key_growth,dim,page_size", [
    (1, 8, 2, [1, 19, 24, 48], 0.0, 16, PAGE_SIZE),
    (4, 6, 3, [2, 9, 16, 33], 0.0, 16, PAGE_SIZE),  # shorter than its new tokens: the first queries give zeros
    (1, 4, 4, [0, 5], 0.0, 16, PAGE_SIZE),  # an empty row (padding)
    (5, 4, 2, [13, 30, 47], 0.4, 16, PAGE_SIZE),  # the maximum grows page after page: the online softmax rescales
    # the models' head sizes (the AVX-512 code where the CPU has it), pages of part of, one and several blocks of
    # 16 keys
    (3, 4, 2, [17, 40], 0.4, 32, PAGE_SIZE),
    (1, 4, 4, [0, 7, 33], 0.4, 64, PAGE_SIZE),
    (2, 2, 1, [20, 47], 0.0, 128, PAGE_SIZE),
    (1, 4, 2, [1, 16, 17, 90], 0.4, 64, 16),
    (2, 4, 4, [5, 40, 121], 0.4, 64, 40),
])
def test_native_cpu_kernel_matches_the_reference(q_tokens, heads, kv_heads, lengths, key_growth, dim, page_size):
  """It reads only the pages within each length: the NaN pages and the -1 table entries past it never reach it."""
  inputs = _paged_inputs(3, lengths, q_tokens=q_tokens, heads=heads, kv_heads=kv_heads, key_growth=key_growth,
                         dim=dim, page_size=page_size, max_pages=-(-max(lengths) // page_size) + 1)
  got = jax.jit(functools.partial(cpu_kernels.paged_attention, sm_scale=0.3))(*inputs)
  want = jax.jit(functools.partial(reference.decode_attention, sm_scale=0.3))(
      inputs[0], jnp.nan_to_num(inputs[1]), jnp.nan_to_num(inputs[2]), *inputs[3:])
  np.testing.assert_allclose(got, want, atol=TOLERANCE[jnp.float32], rtol=TOLERANCE[jnp.float32])
  auto = jax.jit(kernels.decode_attention)(*inputs)  # "auto" on CPU picks it for float32
  np.testing.assert_allclose(auto, jax.jit(cpu_kernels.paged_attention)(*inputs), atol=0)
  with pytest.raises(ValueError, match="float32"):
    cpu_kernels.paged_attention(inputs[0].astype(jnp.bfloat16), *inputs[1:])
  with pytest.raises(jax.errors.JaxRuntimeError, match="do not match"):  # the kernel checks its shapes
    cpu_kernels.paged_attention(*inputs[:4], inputs[4][:1]).block_until_ready()


@pytest.mark.skipif(not cpu_kernels.available() or platform.machine() != "x86_64",
                    reason="the native CPU kernel does not build here, or -mno-avx512f means nothing to this CPU")
@pytest.mark.skipif(not cpu_kernels.available(), reason="the native CPU kernel does not build here (no g++?)")
@pytest.mark.parametrize("q_tokens,heads,kv_heads,lengths,dim,page_size,window,softcap", [
    (4, 6, 3, [2, 9, 16, 33], 16, PAGE_SIZE, 5, 0.8),  # windows inside a page and across page boundaries
    (3, 4, 2, [17, 40], 64, PAGE_SIZE, 12, 50.0),  # Gemma-2's cap; the AVX-512 code where the CPU has it
    pytest.param(1, 4, 4, [0, 7, 33], 64, 16, 1, None, marks=pytest.mark.slow),  # one key each; an empty row
    pytest.param(2, 2, 1, [20, 47], 128, PAGE_SIZE, None, 2.0, marks=pytest.mark.slow),
    pytest.param(5, 4, 2, [13, 30, 47], 32, 40, 100, 1.0, marks=pytest.mark.slow),  # longer than the context
])
def test_native_cpu_kernel_with_window_and_softcap_matches_the_reference(q_tokens, heads, kv_heads, lengths, dim,
                                                                         page_size, window, softcap):
  inputs = _paged_inputs(7, lengths, q_tokens=q_tokens, heads=heads, kv_heads=kv_heads, key_growth=0.4, dim=dim,
                         page_size=page_size, max_pages=-(-max(lengths) // page_size) + 1)
  options = dict(sm_scale=0.3, window=window, softcap=softcap)
  got = jax.jit(functools.partial(cpu_kernels.paged_attention, **options))(*inputs)
  np.testing.assert_allclose(got, _reference(*inputs, **options), atol=TOLERANCE[jnp.float32],
                             rtol=TOLERANCE[jnp.float32])
  auto = jax.jit(functools.partial(kernels.decode_attention, **options))(*inputs)  # "auto" on CPU: the kernel
  np.testing.assert_allclose(auto, got, atol=0)


@pytest.mark.skipif(not cpu_kernels.available() or platform.machine() != "x86_64",
                    reason="the native CPU kernel does not build here, or -mno-avx512f means nothing to this CPU")
def test_native_cpu_kernel_generic_loops_match_the_reference(monkeypatch, tmp_path):
  """The loops that head sizes other than 32/64/128 and CPUs without AVX-512 run: built here without AVX-512, at
  a head size the AVX-512 code would take."""
  monkeypatch.setenv("LWJAX_KERNEL_CACHE", str(tmp_path))
  library = ctypes.cdll.LoadLibrary(str(cpu_kernels._build(cpu_kernels._FLAGS + ("-mno-avx512f",))))
  jax.ffi.register_ffi_target("lwjax_paged_attention_f32_generic", jax.ffi.pycapsule(library.LwjaxPagedAttentionF32),
                              platform="cpu")
  for q_tokens, heads, kv_heads, lengths, dim, page_size, options in [
      (1, 4, 4, [0, 7, 33], 64, PAGE_SIZE, {}),
      (3, 4, 2, [5, 40, 61], 64, 16, {}),
      (3, 4, 2, [5, 40, 61], 64, 16, dict(window=21, softcap=1.0)),
  ]:
    inputs = _paged_inputs(4, lengths, q_tokens=q_tokens, heads=heads, kv_heads=kv_heads, key_growth=0.4, dim=dim,
                           page_size=page_size, max_pages=-(-max(lengths) // page_size) + 1)
    got = jax.jit(functools.partial(cpu_kernels._call, "lwjax_paged_attention_f32_generic", sm_scale=0.3,
                                    **options))(*inputs)
    np.testing.assert_allclose(got, _reference(*inputs, sm_scale=0.3, **options), atol=TOLERANCE[jnp.float32],
                               rtol=TOLERANCE[jnp.float32])


@pytest.mark.skipif(not cpu_kernels.available(), reason="the native CPU kernel does not build here (no g++?)")
def test_native_cpu_kernel_build_replaces_earlier_builds(monkeypatch, tmp_path):
  monkeypatch.setenv("LWJAX_KERNEL_CACHE", str(tmp_path))
  stale = tmp_path / "paged_attention-0000000000000000.so"
  stale.write_bytes(b"an earlier build")
  library = cpu_kernels._build()
  assert library.exists() and library.parent == tmp_path and not stale.exists()
  assert cpu_kernels._build() == library  # cached: built once


def test_native_cpu_kernel_build_failure_is_a_clear_error(monkeypatch, tmp_path):
  monkeypatch.setenv("CXX", "no-such-compiler")
  monkeypatch.setenv("LWJAX_KERNEL_CACHE", str(tmp_path))
  with pytest.raises(RuntimeError, match="no C\\+\\+ compiler 'no-such-compiler'"):
    cpu_kernels._build()


@pytest.mark.parametrize("q_tokens,options", [(1, {}), (3, {}), (3, dict(window=6, softcap=1.5))])
def test_reference_is_dense_attention_from_the_query_offset(q_tokens, options):
  q, k_pages, v_pages, page_table, lengths = _paged_inputs(2, [3, 17, 41], q_tokens=q_tokens, heads=6, kv_heads=3)
  k_pages, v_pages = np.asarray(jnp.nan_to_num(k_pages)), np.asarray(jnp.nan_to_num(v_pages))
  # Each sequence's keys copied out of its pages into one contiguous row; the rest of the row is garbage.
  max_len = int(lengths.max())
  k_bskd = np.full((len(lengths), max_len, 3, 16), 1e3, np.float32)
  v_bskd = np.full_like(k_bskd, -1e3)
  for b, length in enumerate(np.asarray(lengths)):
    pos = np.arange(length)
    pages = np.asarray(page_table)[b, pos // PAGE_SIZE]
    k_bskd[b, :length] = k_pages[:, pages, pos % PAGE_SIZE].transpose(1, 0, 2)
    v_bskd[b, :length] = v_pages[:, pages, pos % PAGE_SIZE].transpose(1, 0, 2)
  want = jax.jit(functools.partial(reference.attention, causal=True, **options))(q, k_bskd, v_bskd,
                                                                                 q_offset=lengths - q_tokens)
  got = jax.jit(functools.partial(reference.decode_attention, **options))(q, k_pages, v_pages, page_table, lengths)
  np.testing.assert_allclose(got, want, atol=1e-6)


AVAILABLE, WHY = aot.libtpu_available()


@pytest.mark.skipif(not AVAILABLE, reason=f"libtpu cannot load: {WHY}")
@pytest.mark.parametrize("topology", ["v5e:1x1", "v5p:2x2x1"])
@pytest.mark.parametrize("q_tokens,num_splits,window,softcap", [(1, None, None, None), (4, 2, 300, 50.0)])
def test_tpu_kernel_compiles(topology, q_tokens, num_splits, window, softcap):
  """Llama-style GQA 32/8 heads, bf16, 16-token pages; on 4 chips the kv heads are sharded (tensor parallel).
  With a window and soft cap as a Gemma-2 sliding layer has."""
  batch, heads, kv_heads, dim, page_size, max_pages = 8, 32, 8, 128, 16, 64
  kernel = functools.partial(pallas_decode.decode_attention, backend="tpu", num_splits=num_splits, window=window,
                             softcap=softcap)
  devices = aot.tpu_devices(topology)
  if len(devices) > 1:
    kernel = jax.shard_map(kernel, mesh=Mesh(devices, ("x",)), in_specs=(P(None, None, "x"), P("x"), P("x"), P(), P()),
                           out_specs=P(None, None, "x"), check_vma=False)
  pages = jax.ShapeDtypeStruct((kv_heads, batch * max_pages, page_size, dim), jnp.bfloat16)
  compiled = aot.compile_for_tpu(
      kernel, jax.ShapeDtypeStruct((batch, q_tokens, heads, dim), jnp.bfloat16), pages, pages,
      jax.ShapeDtypeStruct((batch, max_pages), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.int32),
      topology=topology)
  assert "tpu_custom_call" in compiled.as_text()
  assert compiled.memory_analysis().output_size_in_bytes == batch * q_tokens * heads * dim * 2  # replicated


@pytest.mark.parametrize("q_tokens,window,softcap", [(1, None, None), (4, 1000, 50.0)])
def test_gpu_kernel_lowers_to_triton(q_tokens, window, softcap):
  """Lowering to Triton IR runs on CPU (compiling it to PTX needs the GPU): batch 64, GQA 32/8, bf16."""
  batch, heads, kv_heads, dim, page_size, max_pages = 64, 32, 8, 128, 16, 256
  pages = jax.ShapeDtypeStruct((kv_heads, batch * max_pages, page_size, dim), jnp.bfloat16)
  kernel = jax.jit(functools.partial(pallas_decode.decode_attention, backend="gpu", window=window, softcap=softcap))
  exported = export.export(kernel, platforms=["cuda"],
                           disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
      jax.ShapeDtypeStruct((batch, q_tokens, heads, dim), jnp.bfloat16), pages, pages,
      jax.ShapeDtypeStruct((batch, max_pages), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.int32))
  assert "__gpu$xla.gpu.triton" in exported.mlir_module()
