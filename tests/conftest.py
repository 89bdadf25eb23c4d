"""Test setup: CPU only, 8 fake devices, one persistent compilation cache per test session (set before JAX is
imported anywhere).

The cache is shared by the test process and the subprocesses the end-to-end tests start (they inherit the
environment), so a program compiled once — a UNet step, a serving step — is not compiled again by the next
job of the same shapes. It lives in a fresh temporary directory, removed at exit: every session compiles
from scratch, so test times stay honest.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="lwjax-test-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
