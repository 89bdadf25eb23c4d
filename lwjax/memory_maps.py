"""The process's memory mappings against Linux's `vm.max_map_count`, which XLA:CPU's JIT can exhaust.

XLA:CPU maps every compiled kernel's code and data into memory of its own (about 200 mappings for one 4-layer
GPT serving step) for as long as the executable lives, and a jitted function's cache keeps every executable it
compiled. A process that compiles a few hundred distinct programs, as a long serving run with many shapes can,
reaches the kernel's limit on mappings (65,530 by default) and then fails in LLVM with "Cannot allocate memory"
although RAM is free. Dropping the executables (`jax.jit(...).clear_cache()`) unmaps them: the serving engine
does so when `near_limit` says it must.
"""

from __future__ import annotations

import os

_LIMIT_PATH = "/proc/sys/vm/max_map_count"


def usage() -> tuple[int, int] | None:
  """(mappings of this process, the system's limit), or None where /proc does not say (not Linux)."""
  try:
    with open(_LIMIT_PATH) as f:
      limit = int(f.read())
    with open(f"/proc/{os.getpid()}/maps", "rb") as f:
      count = sum(1 for _ in f)
  except (OSError, ValueError):
    return None
  return count, limit


def near_limit(fraction: float) -> bool:
  """Whether this process holds more than `fraction` of the mappings the system allows (False off Linux)."""
  counts = usage()
  return counts is not None and counts[0] > fraction * counts[1]


FIX = ("raise the limit (as root: sysctl -w vm.max_map_count=262144) or compile fewer distinct shapes; at the limit "
       "compilation fails with 'LLVM compilation error: Cannot allocate memory'")
