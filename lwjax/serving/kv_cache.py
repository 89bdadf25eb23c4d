"""Paged KV cache (NanoFlow, arXiv 2408.12757, §4; the vLLM PagedAttention layout it builds on).

The device holds one pool of fixed-size pages per layer, `k/v`: tuples of `[kv_heads, num_pages, page_size,
head_dim]` arrays, one per layer (per-layer buffers, so a serving step writes each layer's new keys in place
and reads them straight from that layer's buffer, where one stacked array was re-stacked, a copy of the
whole pool, every iteration; on a mesh each pool is split over its kv heads, `lwjax.serving.tensor_parallel`); each
sequence owns a list of page ids (its page table) and a length. The host side here
does the bookkeeping: allocation and reference-counted freeing, shared prefixes with copy-on-write
(`fork`, and prompts whose full token blocks are already cached), a prefix cache keyed by a chained hash
of full token blocks, and truncation of a sequence back to a given length (Writing in the Margins
drops its margin tokens this way). Device work is limited to page copies for copy-on-write, done by a
jitted function over the pools.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


class OutOfPages(RuntimeError):
  """The pool cannot hold the request; the scheduler preempts or waits."""


def block_hashes(tokens: Sequence[int], page_size: int) -> list[bytes]:
  """Chained hashes of the full `page_size` blocks of `tokens`: block i's hash covers blocks 0..i."""
  hashes, previous = [], b""
  for start in range(0, len(tokens) - page_size + 1, page_size):
    block = np.asarray(tokens[start:start + page_size], np.int64).tobytes()
    previous = hashlib.blake2b(previous + block, digest_size=16).digest()
    hashes.append(previous)
  return hashes


@dataclasses.dataclass
class _Sequence:
  pages: list[int]
  length: int


class PageAllocator:
  """Reference-counted page ids with a prefix cache of full blocks (LRU-evicted when unreferenced)."""

  def __init__(self, num_pages: int, page_size: int):
    if num_pages < 1 or page_size < 1:
      raise ValueError(f"num_pages ({num_pages}) and page_size ({page_size}) must be >= 1")
    self.num_pages, self.page_size = num_pages, page_size
    self._free = collections.deque(range(num_pages))
    self.refcount = np.zeros(num_pages, np.int32)
    # Prefix cache: block hash -> page id; unreferenced cached pages wait in `_evictable` (LRU order).
    self._cached: dict[bytes, int] = {}
    self._hash_of_page: dict[int, bytes] = {}
    self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()

  @property
  def num_free(self) -> int:
    """Pages that an allocation can take now (free, or cached but unreferenced)."""
    return len(self._free) + len(self._evictable)

  def allocate(self, n: int) -> list[int]:
    if n > self.num_free:
      raise OutOfPages(f"need {n} pages, {self.num_free} free of {self.num_pages}")
    pages = []
    for _ in range(n):
      if self._free:
        page = self._free.popleft()
      else:  # evict the least recently used cached block
        page, _ = self._evictable.popitem(last=False)
        del self._cached[self._hash_of_page.pop(page)]
      self.refcount[page] = 1
      pages.append(page)
    return pages

  def incref(self, pages: Sequence[int]) -> None:
    for page in pages:
      if self.refcount[page] == 0:
        self._evictable.pop(page, None)
      self.refcount[page] += 1

  def release(self, pages: Sequence[int]) -> None:
    for page in pages:
      if self.refcount[page] <= 0:
        raise ValueError(f"page {page} released more often than referenced")
      self.refcount[page] -= 1
      if self.refcount[page] == 0:
        if page in self._hash_of_page:
          self._evictable[page] = None  # keep the cached block until the space is needed
        else:
          self._free.append(page)

  def lookup(self, block_hash: bytes) -> int | None:
    return self._cached.get(block_hash)

  def register(self, block_hash: bytes, page: int) -> None:
    """Marks `page` as holding the full block `block_hash` (first writer wins)."""
    if block_hash not in self._cached and page not in self._hash_of_page:
      self._cached[block_hash] = page
      self._hash_of_page[page] = block_hash

  def clear_prefix_cache(self) -> None:
    """Forgets every cached block (their content is gone); unreferenced cached pages become free."""
    self._free.extend(self._evictable)
    self._evictable.clear()
    self._cached.clear()
    self._hash_of_page.clear()

  def forget(self, page: int) -> None:
    """Drops `page` from the prefix cache (its content is about to change)."""
    block_hash = self._hash_of_page.pop(page, None)
    if block_hash is not None:
      del self._cached[block_hash]


def _copy_pages(pools, src, dst):
  """pool[:, dst] = pool[:, src] for each per-layer pool [kv_heads, pages, size, dim]."""
  return jax.tree.map(lambda p: p.at[:, dst].set(p[:, src]), pools)


def _write_pages(pools, dst, blocks):
  """pools[l][:, dst] = blocks[l] for the per-layer pools of k and v, blocks [layers, kv_heads, n, page_size, dim]
  each: offload restores."""
  return tuple(tuple(p.at[:, dst].set(b[i].astype(p.dtype)) for i, p in enumerate(layer_pools))
               for layer_pools, b in zip(pools, blocks, strict=True))


@functools.cache
def _pool_update(fn, sharding):
  """`fn` jitted with the pools donated and, on a mesh, kept on their `sharding` (the engine's step takes them
  there)."""
  if sharding is None:
    return jax.jit(fn, donate_argnums=(0,))
  return jax.jit(fn, donate_argnums=(0,), out_shardings=sharding)


@jax.jit
def _gather_pages(pools, index):
  """[layers, kv_heads, n, page_size, dim]: the pages `index` of every per-layer pool."""
  return jnp.stack([p[:, index] for p in pools])


class PagedKVCache:
  """Device page pools plus per-sequence page tables, lengths and prefix sharing.

  With an `offload` store, finished sequences' full blocks go to host/disk (`offload_blocks`) and
  `add_sequence` restores blocks the device no longer caches instead of leaving them to be recomputed.
  """

  def __init__(self, *, num_layers: int, kv_heads: int, head_dim: int, num_pages: int, page_size: int,
               dtype=jnp.bfloat16, offload=None, prefix_caching: bool = True, sharding=None):
    """`sharding`: where each pool lives (a mesh sharding over kv heads, `lwjax.serving.tensor_parallel`; default
    the default device); page ids stay global."""
    if offload is not None and not prefix_caching:
      raise ValueError("offload: KV offload restores prefix-cache blocks; it needs prefix_caching=True")
    self.offload, self.prefix_caching, self.sharding = offload, prefix_caching, sharding
    shape = (kv_heads, num_pages, page_size, head_dim)
    self.k = tuple(jnp.zeros(shape, dtype, device=sharding) for _ in range(num_layers))
    self.v = tuple(jnp.zeros(shape, dtype, device=sharding) for _ in range(num_layers))
    self.allocator = PageAllocator(num_pages, page_size)
    self.page_size = page_size
    self._seqs: dict[int, _Sequence] = {}
    self._pending_offloads: collections.deque = collections.deque()  # (hashes, k, v) copies in flight
    self._offloading: set[bytes] = set()

  def __contains__(self, seq_id: int) -> bool:
    return seq_id in self._seqs

  def sequence_ids(self) -> list[int]:
    return sorted(self._seqs)

  def reset_pools(self) -> None:
    """Zeroed pools in place of pools whose buffers are gone (donated to a call that failed); the prefix cache
    is forgotten. Sequences keep their pages (released as usual) but their KV content is lost."""
    self.k = tuple(jnp.zeros(p.shape, p.dtype, device=self.sharding) for p in self.k)
    self.v = tuple(jnp.zeros(p.shape, p.dtype, device=self.sharding) for p in self.v)
    self.allocator.clear_prefix_cache()

  def length(self, seq_id: int) -> int:
    return self._seqs[seq_id].length

  def pages(self, seq_id: int) -> list[int]:
    return list(self._seqs[seq_id].pages)

  def pages_needed(self, seq_id: int | None, new_tokens: int) -> int:
    """Pages an append of `new_tokens` would allocate (copy-on-write of a shared last page included)."""
    if seq_id is None:
      return -(-new_tokens // self.page_size)
    seq = self._seqs[seq_id]
    capacity = len(seq.pages) * self.page_size
    extra = -(-max(0, seq.length + new_tokens - capacity) // self.page_size)
    cow = int(seq.length % self.page_size != 0 and new_tokens > 0
              and self.allocator.refcount[seq.pages[-1]] > 1)
    return extra + cow

  def add_sequence(self, seq_id: int, prompt: Sequence[int], share: bool = True) -> int:
    """Registers a sequence for `prompt`; returns how many leading tokens are already cached.

    Full blocks found in the prefix cache are shared, not recomputed; the caller prefills only
    `prompt[cached:]` (at least the last token, so the model yields logits for the next one). `share=False`:
    nothing is shared (every prompt token computed again: its logits are wanted).
    """
    if seq_id in self._seqs:
      raise ValueError(f"sequence {seq_id} already exists")
    # Recompute at least the last prompt token: its logits start generation.
    hashes = (block_hashes(prompt, self.page_size)[:(len(prompt) - 1) // self.page_size]
              if self.prefix_caching and share else [])
    shared = []
    for block_hash in hashes:
      page = self.allocator.lookup(block_hash)
      if page is None:
        break
      shared.append(page)
    self.allocator.incref(shared)
    restored = self._restore(hashes[len(shared):])
    pages = shared + restored
    self._seqs[seq_id] = _Sequence(pages=pages, length=len(pages) * self.page_size)
    return len(pages) * self.page_size

  def _restore(self, hashes: list[bytes]) -> list[int]:
    """Pages (referenced once) holding the leading `hashes` blocks found in the offload store."""
    if self.offload is None:
      return []
    self.retire_offloads(wait=bool(set(hashes) & self._offloading))  # a block still in flight: wait for it
    blocks = []
    for block_hash in hashes:
      if len(blocks) >= self.allocator.num_free or (block := self.offload.get(block_hash)) is None:
        break
      blocks.append(block)
    if not blocks:
      return []
    pages = self.allocator.allocate(len(blocks))
    k = np.stack([b[0] for b in blocks], axis=2)  # [layers, kv_heads, n, page_size, dim]
    v = np.stack([b[1] for b in blocks], axis=2)
    self.k, self.v = _pool_update(_write_pages, self.sharding)((self.k, self.v), jnp.array(pages), (k, v))
    for block_hash, page in zip(hashes, pages, strict=False):
      self.allocator.register(block_hash, page)
    counters = self.offload.counters
    counters.bytes_to_device += k.nbytes + v.nbytes
    counters.prefill_tokens_saved += len(pages) * self.page_size
    return pages

  def offload_blocks(self, seq_id: int, tokens: Sequence[int]) -> None:
    """Starts copying the sequence's full blocks that the offload store lacks to host memory.

    The pages are gathered on the device (a snapshot: later writes to them do not change it) and copied
    to the host asynchronously; `retire_offloads` files them in the store once the copy is done, so a
    finishing request does not stall the next serving step.
    """
    if self.offload is None:
      return
    seq = self._seqs[seq_id]
    missing = [(page, h) for page, h in zip(seq.pages, block_hashes(tokens[:seq.length], self.page_size), strict=False)
               if h not in self.offload and h not in self._offloading]
    if not missing:
      return
    # Padded to a power of two (repeats of the first page, dropped when filed): few shapes to compile.
    pages = [page for page, _ in missing]
    pages += pages[:1] * ((1 << (len(pages) - 1).bit_length()) - len(pages))
    index = jnp.array(pages)
    k, v = _gather_pages(self.k, index), _gather_pages(self.v, index)
    k.copy_to_host_async()
    v.copy_to_host_async()
    hashes = [h for _, h in missing]
    self._offloading.update(hashes)
    self._pending_offloads.append((hashes, k, v))

  def retire_offloads(self, wait: bool = False) -> int:
    """Files the finished device-to-host copies in the offload store (all of them when `wait`); returns
    how many copies are still in flight."""
    while self._pending_offloads:
      hashes, k, v = self._pending_offloads[0]
      if not wait and not (k.is_ready() and v.is_ready()):
        break
      self._pending_offloads.popleft()
      k, v = np.asarray(k), np.asarray(v)
      for i, block_hash in enumerate(hashes):
        self.offload.put(block_hash, np.ascontiguousarray(k[:, :, i]), np.ascontiguousarray(v[:, :, i]))
        self._offloading.discard(block_hash)
    return len(self._pending_offloads)

  def append(self, seq_id: int, num_tokens: int) -> list[tuple[int, int]]:
    """Reserves slots for `num_tokens` more tokens; returns their (page, offset) write positions.

    A shared last page is first copied (copy-on-write) so the writes never touch another sequence.
    Raises OutOfPages (changing nothing) when the pool cannot hold them.
    """
    seq = self._seqs[seq_id]
    if self.pages_needed(seq_id, num_tokens) > self.allocator.num_free:
      raise OutOfPages(f"sequence {seq_id} needs {self.pages_needed(seq_id, num_tokens)} pages, "
                       f"{self.allocator.num_free} free")
    if num_tokens and seq.length % self.page_size and self.allocator.refcount[seq.pages[-1]] > 1:
      self._copy_on_write(seq)
    if num_tokens and seq.length % self.page_size and seq.pages:
      self.allocator.forget(seq.pages[-1])  # a partly filled page changes: not a cached block any more
    extra = self.pages_needed(seq_id, num_tokens)
    seq.pages.extend(self.allocator.allocate(extra))
    slots = [divmod(pos, self.page_size) for pos in range(seq.length, seq.length + num_tokens)]
    seq.length += num_tokens
    return [(seq.pages[block], offset) for block, offset in slots]

  def commit_blocks(self, seq_id: int, tokens: Sequence[int]) -> None:
    """Publishes the sequence's full blocks (its `tokens` so far) to the prefix cache (when it is on)."""
    if not self.prefix_caching:
      return
    seq = self._seqs[seq_id]
    for page, block_hash in zip(seq.pages, block_hashes(tokens[:seq.length], self.page_size), strict=False):
      self.allocator.register(block_hash, page)

  def fork(self, parent: int, child: int) -> None:
    """`child` shares all of `parent`'s pages (n > 1 sampling, beam search); writes copy on demand."""
    if child in self._seqs:
      raise ValueError(f"sequence {child} already exists")
    seq = self._seqs[parent]
    self.allocator.incref(seq.pages)
    self._seqs[child] = _Sequence(pages=list(seq.pages), length=seq.length)

  def truncate(self, seq_id: int, length: int) -> None:
    """Drops every token at position >= `length` and the pages that no longer hold any."""
    seq = self._seqs[seq_id]
    if not 0 <= length <= seq.length:
      raise ValueError(f"truncate length {length} outside [0, {seq.length}] for sequence {seq_id}")
    keep = -(-length // self.page_size)
    self.allocator.release(seq.pages[keep:])
    del seq.pages[keep:]
    seq.length = length

  def free(self, seq_id: int) -> None:
    seq = self._seqs.pop(seq_id)
    self.allocator.release(seq.pages)

  def page_table(self, seq_ids: Sequence[int], max_pages: int) -> tuple[np.ndarray, np.ndarray]:
    """(page_table [batch, max_pages] int32 padded with 0, lengths [batch] int32) for the kernels."""
    table = np.zeros((len(seq_ids), max_pages), np.int32)
    lengths = np.zeros(len(seq_ids), np.int32)
    for row, seq_id in enumerate(seq_ids):
      seq = self._seqs[seq_id]
      if len(seq.pages) > max_pages:
        raise ValueError(f"sequence {seq_id} has {len(seq.pages)} pages, more than max_pages {max_pages}")
      table[row, :len(seq.pages)] = seq.pages
      lengths[row] = seq.length
    return table, lengths

  def _copy_on_write(self, seq: _Sequence) -> None:
    old = seq.pages[-1]
    (new,) = self.allocator.allocate(1)
    self.k, self.v = _pool_update(_copy_pages, self.sharding)((self.k, self.v), jnp.array([old]),
                                                                jnp.array([new]))
    self.allocator.release([old])
    seq.pages[-1] = new
