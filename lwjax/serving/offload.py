"""KV offload for multi-round conversations (NanoFlow, arXiv 2408.12757, §4.3 KV-cache offloading).

When a request finishes, the keys/values of its full token blocks are copied eagerly to host memory;
blocks pushed out of the size-bounded host LRU go to disk (also size-bounded, LRU). The next turn of
the conversation shares the earlier turns as a prefix: `PagedKVCache.add_sequence` asks this store for
every block the device prefix cache no longer holds and restores it instead of recomputing its prefill.
Blocks are keyed by the same chained block hashes as the prefix cache, so a hit is exact.
"""

from __future__ import annotations

import collections
import dataclasses
import os

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for np.dtype('bfloat16'))
import numpy as np


@dataclasses.dataclass
class OffloadCounters:
  """What offloading did: block hits by tier, bytes moved each way, prefill tokens not recomputed."""
  host_hits: int = 0
  disk_hits: int = 0
  misses: int = 0
  bytes_to_host: int = 0
  bytes_to_device: int = 0
  bytes_to_disk: int = 0
  prefill_tokens_saved: int = 0


class KVOffloadStore:
  """Host-memory LRU of KV blocks spilling to a disk LRU; each block is (k, v) [layers, kv_heads, page, dim]."""

  def __init__(self, *, host_bytes: int, disk_dir: str | None = None, disk_bytes: int = 0):
    self.host_bytes, self.disk_dir, self.disk_bytes = host_bytes, disk_dir, disk_bytes
    self._host: collections.OrderedDict[bytes, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()
    self._disk: collections.OrderedDict[bytes, int] = collections.OrderedDict()  # hash -> file size
    self._host_used = self._disk_used = 0
    self.counters = OffloadCounters()
    if disk_dir:
      os.makedirs(disk_dir, exist_ok=True)

  def __contains__(self, block_hash: bytes) -> bool:
    return block_hash in self._host or block_hash in self._disk

  def put(self, block_hash: bytes, k: np.ndarray, v: np.ndarray) -> None:
    if block_hash in self:
      return
    size = k.nbytes + v.nbytes
    self._host[block_hash] = (k, v)
    self._host_used += size
    self.counters.bytes_to_host += size
    while self._host_used > self.host_bytes and self._host:
      old_hash, (old_k, old_v) = self._host.popitem(last=False)
      self._host_used -= old_k.nbytes + old_v.nbytes
      self._spill(old_hash, old_k, old_v)

  def get(self, block_hash: bytes) -> tuple[np.ndarray, np.ndarray] | None:
    """The block's (k, v), promoted to most recently used; None (a miss) when neither tier has it."""
    if block_hash in self._host:
      self._host.move_to_end(block_hash)
      self.counters.host_hits += 1
      return self._host[block_hash]
    if block_hash in self._disk:
      with np.load(self._path(block_hash)) as data:
        dtype, shape = np.dtype(str(data["dtype"])), tuple(data["shape"])
        k, v = (data[name].view(dtype).reshape(shape) for name in ("k", "v"))
      self._disk.move_to_end(block_hash)
      self.counters.disk_hits += 1
      return k, v
    self.counters.misses += 1
    return None

  def _spill(self, block_hash: bytes, k: np.ndarray, v: np.ndarray) -> None:
    if not self.disk_dir or k.nbytes + v.nbytes > self.disk_bytes:
      return
    path = self._path(block_hash)
    # Raw bytes plus the dtype name: numpy cannot store ml_dtypes' bfloat16 natively.
    np.savez(path[:-4] + ".tmp.npz", k=k.view(np.uint8), v=v.view(np.uint8), dtype=str(k.dtype),
             shape=np.array(k.shape))
    os.replace(path[:-4] + ".tmp.npz", path)  # a reader never sees a half-written block
    size = os.path.getsize(path)
    self._disk[block_hash] = size
    self._disk_used += size
    self.counters.bytes_to_disk += size
    while self._disk_used > self.disk_bytes and self._disk:
      old_hash, old_size = self._disk.popitem(last=False)
      os.remove(self._path(old_hash))
      self._disk_used -= old_size

  def _path(self, block_hash: bytes) -> str:
    return os.path.join(self.disk_dir, block_hash.hex() + ".npz")
