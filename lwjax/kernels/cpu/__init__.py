"""Native CPU kernels: C++ XLA FFI custom calls, compiled on first use, for what XLA:CPU cannot fuse.

`paged_attention` is the serving engine's decode attention (vLLM's PagedAttention; vLLM's CPU backend also runs
its own C++ kernel): the plain-JAX reference copies every row's pages out of the pool before its matmuls, while
the kernel reads each key and value once where it lies. `lwjax.kernels.decode_attention` uses it under "auto" on
CPU for float32 inputs, and falls back to the reference when it cannot be built.

The source (`paged_attention.cc`) is compiled with `$CXX` (default g++) against the XLA FFI headers that jaxlib
ships, once per source, compiler, flags, jaxlib version and CPU, into `$LWJAX_KERNEL_CACHE` (default
~/.cache/lwjax/kernels); a build is written to a temporary file and renamed into place, so concurrent processes
never load half a library, and replaces the builds of earlier versions there. `LWJAX_NATIVE_KERNELS=0` turns
the kernels off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

_SOURCE = pathlib.Path(__file__).with_name("paged_attention.cc")
_TARGET = "lwjax_paged_attention_f32"
_FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC")


def _cpu_flags() -> str:
  """The CPU's feature flags (a library built with -march=native must not run on a CPU that lacks them)."""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith(("flags", "Features")):
        return line
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _build(flags: tuple[str, ...] = _FLAGS) -> pathlib.Path:
  """The compiled library's path, building it if this source, compiler, flags, jaxlib and CPU have none yet."""
  compiler = os.environ.get("CXX", "g++")
  if shutil.which(compiler) is None:
    raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set CXX)")
  version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
  key = hashlib.sha256("\n".join([_SOURCE.read_text(), compiler, version, " ".join(flags), jaxlib.__version__,
                                  platform.machine(), _cpu_flags()]).encode()).hexdigest()[:16]
  cache = pathlib.Path(os.environ.get("LWJAX_KERNEL_CACHE", pathlib.Path.home() / ".cache" / "lwjax" / "kernels"))
  library = cache / f"{_SOURCE.stem}-{key}.so"
  if library.exists():
    return library
  cache.mkdir(parents=True, exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=cache, suffix=".so.tmp", delete=False) as tmp:
    partial = pathlib.Path(tmp.name)
  try:
    subprocess.run([compiler, *flags, f"-I{jax.ffi.include_dir()}", "-o", str(partial), str(_SOURCE)],
                   capture_output=True, text=True, check=True)
    os.replace(partial, library)
    for stale in cache.glob(f"{_SOURCE.stem}-*.so"):  # builds of earlier sources, compilers or CPUs
      if stale != library:
        stale.unlink(missing_ok=True)  # a process that has one loaded keeps its mapping
  except subprocess.CalledProcessError as e:
    raise RuntimeError(f"compiling {_SOURCE.name} failed:\n{e.stderr[-2000:]}") from e
  finally:
    partial.unlink(missing_ok=True)
  return library


@functools.cache
def available() -> bool:
  """Whether the native kernels are built and registered with XLA:CPU (builds them on the first call)."""
  if os.environ.get("LWJAX_NATIVE_KERNELS", "1") == "0":
    return False
  try:
    library = ctypes.cdll.LoadLibrary(str(_build()))
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(library.LwjaxPagedAttentionF32), platform="cpu")
  except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
    logging.warning("native CPU kernels unavailable, using the plain-JAX reference: %s", e)
    return False
  return True


def supports(q, k_pages, v_pages) -> bool:
  """Whether `paged_attention` takes these inputs (float32) and the kernel is available."""
  return all(x.dtype == jnp.float32 for x in (q, k_pages, v_pages)) and available()


def paged_attention(q, k_pages, v_pages, page_table, lengths, *, sm_scale=None, window=None, softcap=None):
  """`lwjax.kernels.reference.decode_attention` (same arguments and result) as the native kernel: float32 q
  [b, q_tokens, heads, d], pools [kv_heads, pages, page_size, d], page_table [b, max_pages], lengths [b]; a
  sliding `window` (a positive int) and logit `softcap` (a positive number) are static attributes."""
  if not supports(q, k_pages, v_pages):
    raise ValueError("paged_attention: needs float32 q/k_pages/v_pages and the native kernel (see available())")
  return _call(_TARGET, q, k_pages, v_pages, page_table, lengths, sm_scale, window=window, softcap=softcap)


def _call(target: str, q, k_pages, v_pages, page_table, lengths, sm_scale=None, *, window=None, softcap=None):
  """The custom call of a registered build of the kernel (`target`: its FFI name). The kernel reads a window
  or softcap of 0 as none."""
  if window is not None and window < 1 or softcap is not None and not softcap > 0:
    raise ValueError(f"paged_attention: window must be a positive int and softcap a positive number, or None; "
                     f"got window={window!r}, softcap={softcap!r}")
  scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
  call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q.shape, q.dtype), vmap_method="sequential")
  return call(q, k_pages, v_pages, jnp.asarray(page_table, jnp.int32), jnp.asarray(lengths, jnp.int32),
              sm_scale=np.float32(scale), window=np.int64(window or 0), softcap=np.float32(softcap or 0.0))
