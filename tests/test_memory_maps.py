"""lwjax.memory_maps: the process's mappings against vm.max_map_count."""

import sys

import pytest

from lwjax import memory_maps


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_usage_counts_this_process_against_the_limit():
  count, limit = memory_maps.usage()
  assert 0 < count < limit
  assert memory_maps.near_limit(0.0) and not memory_maps.near_limit(1.0)


def test_usage_is_none_without_proc(monkeypatch):
  monkeypatch.setattr(memory_maps, "_LIMIT_PATH", "/nonexistent/max_map_count")
  assert memory_maps.usage() is None
  assert not memory_maps.near_limit(0.0)
