"""The glibc malloc settings made at `import lwjax`."""

import sys

import pytest

from lwjax import allocator


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_glibc_accepts_the_settings():
  assert allocator.keep_freed_memory()
