"""The process's memory mappings against Linux's `vm.max_map_count`, which XLA:CPU's JIT can exhaust.

XLA:CPU maps every compiled kernel's code and data into memory of its own (about 200 mappings for one 4-layer
GPT serving step) and does not unmap them when the executable is dropped. A process that compiles a few hundred
distinct programs, as a long serving run with many shapes can, reaches the kernel's limit on mappings (65,530 by
default) and then fails in LLVM with "Cannot allocate memory" although RAM is free. `warn_if_near_limit` says so
before that happens, with the fix; callers invoke it after they compile.
"""

from __future__ import annotations

import logging
import os

_LIMIT_PATH = "/proc/sys/vm/max_map_count"
_warned = False


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


def warn_if_near_limit(what: str, fraction: float = 0.5) -> bool:
  """Logs one warning per process once the mappings pass `fraction` of the limit; returns whether they do."""
  global _warned
  counts = usage()
  if counts is None or counts[0] < fraction * counts[1]:
    return False
  if not _warned:
    _warned = True
    logging.warning(
        "%s: this process holds %d memory mappings of the %d that vm.max_map_count allows; XLA:CPU keeps ~200 "
        "for every compiled program, and at the limit compilation fails with 'LLVM compilation error: Cannot "
        "allocate memory'. Raise the limit (as root: sysctl -w vm.max_map_count=262144) or compile fewer "
        "distinct shapes.", what, counts[0], counts[1])
  return True
