"""Kernel tests run the Pallas kernels in interpret mode on CPU; LWJAX_KERNEL_IMPL=pallas runs the same tests
compiled on the accelerator (benchmarks/gpu_check.sh does, with JAX_PLATFORMS=cuda)."""

import os

import pytest

KERNEL_IMPL = os.environ.get("LWJAX_KERNEL_IMPL", "interpret")
if KERNEL_IMPL not in ("interpret", "pallas"):
  raise ValueError(f"LWJAX_KERNEL_IMPL must be 'interpret' or 'pallas', got {KERNEL_IMPL!r}")


@pytest.fixture
def kernel_impl():
  """The `impl` the kernel tests compare against the reference: "interpret" (default) or "pallas"."""
  return KERNEL_IMPL
