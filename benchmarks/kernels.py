"""Kernel speed: time, TFLOP/s or GB/s and % of the device roofline per kernel, with ratios to XLA baselines.

  python -m benchmarks.kernels                   # the target shapes (PERFORMANCE.md), on a GPU or TPU
  python -m benchmarks.kernels --small           # tiny shapes; on CPU the Pallas kernels run interpreted
  python -m benchmarks.kernels --only decode_attention,selective_scan --iters 50

The roofline is measured in the same run: peak FLOP/s by a large bf16 matmul, peak bandwidth by a large
elementwise copy (read + write). Work is counted from the shapes:
- attention: 4 b h s^2 d FLOPs halved for causal masking; forward+backward = 3.5 x forward (the backward
  has 5 of the 7 matmuls, FlashAttention-2's convention).
- decode_attention: bytes of K and V in the pages up to each length (plus q and the output), read once.
- selective_scan: bytes of u, delta, B, C read once and y written once.
- ssd (chunk Q): 2 (l Q (n + p) / 2 + 2 l n p) FLOPs per batch and head: the causal halves of C B^T and of
  its product with x within chunks, then the chunk states B^T x and their readout C h.
Each kernel runs with impl="pallas" ("interpret" on CPU), and the baselines: impl="reference" (plain XLA),
the associative-scan reference for the scan, and cuDNN's fused attention on GPU. A kernel missing from
`lwjax.kernels` or failing to run is skipped with the reason. CPU times are not kernel speed: interpret
mode executes the kernel body op by op, so only --small runs there and its numbers are meaningless.
"""

import dataclasses
import functools
import importlib
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from absl import app, flags

from lwjax.training.progress import peak_flops_per_device

_SMALL = flags.DEFINE_bool("small", False, "Tiny shapes (CPU: the only allowed mode).")
_ONLY = flags.DEFINE_string("only", "", "Comma-separated kernels to run (default: all).")
_ITERS = flags.DEFINE_integer("iters", 0, "Timed calls per row (default 20 on an accelerator, 2 on CPU).")

KERNELS = ("attention_fwd", "attention_fwd_bwd", "decode_attention", "selective_scan", "ssd")


@dataclasses.dataclass
class Case:
  """One kernel at one shape: `make(impl)` gives the function to time on `args`."""
  kernel: str
  shape: str
  make: Callable[[str], Callable]
  args: tuple
  impls: tuple[str, ...]
  flops: float = 0.0  # compute-bound kernels: FLOPs, rated in TFLOP/s against the matmul peak
  bytes: float = 0.0  # memory-bound kernels: bytes moved, rated in GB/s against the copy peak


def _time(fn, *args, iters):
  """Mean seconds per call of jit(fn) after two untimed calls (compilation, warm caches)."""
  f = jax.jit(fn)
  for _ in range(2):
    jax.block_until_ready(f(*args))
  start = time.perf_counter()
  for _ in range(iters):
    out = f(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / iters


def _peaks(small, iters):
  """(FLOP/s of a bf16 matmul, bytes/s of a copy) measured on the default device."""
  n = 1024 if small else 8192
  a = jnp.ones((n, n), jnp.bfloat16)
  flops = 2 * n ** 3 / _time(jnp.dot, a, a, iters=iters)
  x = jnp.ones((2 ** 24 if small else 2 ** 29,), jnp.bfloat16)  # 32 MiB or 1 GiB
  bandwidth = 2 * x.nbytes / _time(jnp.negative, x, iters=iters)
  return flops, bandwidth


def _normal(key, shape, dtype=jnp.bfloat16):
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _attention_case(kernels, small, backward):
  b, h, s, d = (1, 2, 128, 32) if small else (4, 16, 4096, 128)
  q, k, v = (_normal(key, (b, s, h, d)) for key in jax.random.split(jax.random.key(0), 3))

  def make(impl):
    if impl == "cudnn":
      attn = functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="cudnn")
    else:
      attn = functools.partial(kernels.attention, causal=True, impl=impl)
    if not backward:
      return attn

    def fwd_bwd(q, k, v):
      out, vjp = jax.vjp(attn, q, k, v)
      return vjp(out)
    return fwd_bwd

  forward_flops = 4 * b * h * s * s * d / 2
  return Case("attention_fwd_bwd" if backward else "attention_fwd", f"b{b} h{h} s{s} d{d} bf16 causal", make,
              (q, k, v), ("cudnn",) if jax.default_backend() == "gpu" else (),
              flops=forward_flops * (3.5 if backward else 1.0))


def _decode_case(kernels, small):
  b, context, heads, kv_heads, d, page_size = (4, 256, 8, 2, 64, 16) if small else (64, 4096, 32, 8, 128, 16)
  keys = jax.random.split(jax.random.key(1), 4)
  max_pages = context // page_size
  num_pages = b * max_pages
  q = _normal(keys[0], (b, 1, heads, d))
  k_pages, v_pages = (_normal(key, (kv_heads, num_pages, page_size, d)) for key in keys[1:3])
  page_table = jax.random.permutation(keys[3], num_pages).reshape(b, max_pages).astype(jnp.int32)
  lengths = jnp.full((b,), context, jnp.int32)
  kv_bytes = 2 * b * context * kv_heads * d * 2
  return Case("decode_attention", f"b{b} ctx{context} h{heads}/{kv_heads} d{d} page{page_size} bf16",
              lambda impl: functools.partial(kernels.decode_attention, impl=impl),
              (q, k_pages, v_pages, page_table, lengths), (), bytes=kv_bytes + 2 * q.nbytes)


def _selective_scan_case(kernels, small):
  b, seq_len, d, n = (1, 64, 32, 8) if small else (4, 2048, 2048, 16)
  keys = jax.random.split(jax.random.key(2), 5)
  u, delta = _normal(keys[0], (b, seq_len, d)), _normal(keys[1], (b, seq_len, d))
  B, C = _normal(keys[2], (b, seq_len, n)), _normal(keys[3], (b, seq_len, n))
  A = -jnp.exp(jax.random.normal(keys[4], (d, n)))

  def make(impl):
    if impl == "associative":
      return functools.partial(importlib.import_module("lwjax.kernels.reference").selective_scan,
                               method="associative")
    return functools.partial(kernels.selective_scan, impl=impl)

  return Case("selective_scan", f"b{b} l{seq_len} d{d} n{n} bf16", make, (u, delta, A, B, C), ("associative",),
              bytes=2 * (3 * b * seq_len * d + 2 * b * seq_len * n))


def _ssd_case(kernels, small):
  b, seq_len, h, p, g, n, chunk = (1, 64, 2, 16, 1, 16, 16) if small else (4, 2048, 32, 64, 1, 128, 256)
  keys = jax.random.split(jax.random.key(3), 5)
  x = _normal(keys[0], (b, seq_len, h, p))
  dt = _normal(keys[1], (b, seq_len, h))
  B, C = _normal(keys[2], (b, seq_len, g, n)), _normal(keys[3], (b, seq_len, g, n))
  A = -jnp.exp(jax.random.normal(keys[4], (h,)))
  flops = 2 * b * h * (seq_len * chunk * (n + p) / 2 + 2 * seq_len * n * p)
  return Case("ssd", f"b{b} l{seq_len} h{h} p{p} g{g} n{n} chunk{chunk} bf16",
              lambda impl: functools.partial(kernels.ssd, chunk_size=chunk, impl=impl),
              (x, dt, A, B, C), (), flops=flops)


def _cases(kernels, small, selected):
  builders = {"attention_fwd": lambda: _attention_case(kernels, small, backward=False),
              "attention_fwd_bwd": lambda: _attention_case(kernels, small, backward=True),
              "decode_attention": lambda: _decode_case(kernels, small),
              "selective_scan": lambda: _selective_scan_case(kernels, small),
              "ssd": lambda: _ssd_case(kernels, small)}
  for name in selected:
    op = name.removesuffix("_fwd_bwd").removesuffix("_fwd")
    if not hasattr(kernels, op):
      print(f"{name:<18} skipped: lwjax.kernels has no {op} yet")
      continue
    yield builders[name]()


def main(argv):
  del argv
  on_cpu = jax.default_backend() == "cpu"
  if on_cpu and not _SMALL.value:
    sys.exit("On CPU only --small runs (the Pallas kernels are interpreted there; the times say nothing).")
  selected = [k.strip() for k in _ONLY.value.split(",") if k.strip()] or list(KERNELS)
  unknown = sorted(set(selected) - set(KERNELS))
  if unknown:
    sys.exit(f"--only: unknown kernels {unknown}; known: {', '.join(KERNELS)}")
  iters = _ITERS.value or (2 if on_cpu else 20)
  kernel_impl = "interpret" if on_cpu else "pallas"
  peak_flops, peak_bandwidth = _peaks(_SMALL.value, iters)
  spec = peak_flops_per_device()
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); {iters} timed calls per row")
  print(f"roofline (measured): {peak_flops / 1e12:.1f} TFLOP/s bf16 matmul"
        f"{f' (spec {spec / 1e12:.0f})' if spec else ''}, {peak_bandwidth / 1e9:.1f} GB/s copy")
  if on_cpu:
    print("CPU: Pallas kernels in interpret mode vs XLA; absolute numbers and ratios are meaningless here.")
  print(f"{'kernel':<18} {'shape':<42} {'impl':<12} {'ms':>10} {'rate':>16} {'roofline':>9} {'ref/this':>9}")
  ratios = []
  for case in _cases(importlib.import_module("lwjax.kernels"), _SMALL.value, selected):
    times = {}
    for impl in ("reference", kernel_impl, *case.impls):
      try:
        times[impl] = _time(case.make(impl), *case.args, iters=iters)
      except Exception as e:  # a kernel without this impl on this backend, out of memory, ...
        print(f"{case.kernel:<18} {case.shape:<42} {impl:<12} skipped: {type(e).__name__}: "
              f"{str(e).splitlines()[0][:120] if str(e) else ''}")
        continue
      seconds = times[impl]
      if case.flops:
        rate, roofline = f"{case.flops / seconds / 1e12:.3g} TFLOP/s", case.flops / seconds / peak_flops
      else:
        rate, roofline = f"{case.bytes / seconds / 1e9:.4g} GB/s", case.bytes / seconds / peak_bandwidth
      vs_ref = f"{times['reference'] / seconds:.3g}x" if "reference" in times else ""
      print(f"{case.kernel:<18} {case.shape:<42} {impl:<12} {seconds * 1e3:>10.3f} {rate:>16} {roofline:>9.1%} "
            f"{vs_ref:>9}")
    if kernel_impl in times:
      ratios += [f"{case.kernel} {kernel_impl} vs {impl}: {times[impl] / times[kernel_impl]:.3g}x"
                 for impl in ("reference", *case.impls) if impl in times]
  if ratios:
    print("ratio (baseline time / kernel time, >1 = kernel faster): " + "; ".join(ratios))
  sys.stdout.flush()


if __name__ == "__main__":
  app.run(main)
