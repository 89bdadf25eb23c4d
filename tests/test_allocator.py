"""The glibc malloc settings made at `import lwjax`."""

import subprocess
import sys

import pytest

from lwjax import allocator


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_glibc_accepts_the_settings():
  assert allocator.keep_freed_memory()


_REUSE = """
import ctypes, resource
import lwjax  # sets the malloc options
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = {size}

def touched_faults():
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
  libc.free(block)
  return faults
print(touched_faults(), touched_faults())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_freed_memory_past_2gb_is_reused_without_faults():
  """A block freed at the heap's top is kept even past 2 GB (a trim threshold of 2**31 - 1 gave it back, and
  every later training step faulted its working set in again)."""
  out = subprocess.run([sys.executable, "-c", _REUSE.format(size=(2 ** 31) + (2 ** 28))], capture_output=True,
                       text=True, check=True, timeout=120).stdout.split()
  first, second = map(int, out)
  assert first > 1000  # the first touch faults the block in (4 KB or 2 MB pages)
  assert second < max(50, first // 20), (first, second)
