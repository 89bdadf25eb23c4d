"""lwjax.memory_maps: the process's mappings against vm.max_map_count, and the one warning near it."""

import logging
import sys

import pytest

from lwjax import memory_maps


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_usage_counts_this_process_and_warns_once_past_the_fraction(caplog, monkeypatch):
  count, limit = memory_maps.usage()
  assert 0 < count < limit
  monkeypatch.setattr(memory_maps, "_warned", False)
  assert not memory_maps.warn_if_near_limit("test", fraction=1.0)
  with caplog.at_level(logging.WARNING):
    assert memory_maps.warn_if_near_limit("test", fraction=0.0)
    assert memory_maps.warn_if_near_limit("test", fraction=0.0)
  warnings = [r for r in caplog.records if "vm.max_map_count" in r.getMessage()]
  assert len(warnings) == 1 and "sysctl -w vm.max_map_count" in warnings[0].getMessage()


def test_usage_is_none_without_proc(monkeypatch):
  monkeypatch.setattr(memory_maps, "_LIMIT_PATH", "/nonexistent/max_map_count")
  assert memory_maps.usage() is None
  assert not memory_maps.warn_if_near_limit("test", fraction=0.0)
