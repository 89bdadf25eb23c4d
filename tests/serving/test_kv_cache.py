"""Paged KV cache: allocator invariants under random workloads, prefix sharing, copy-on-write, truncation."""

import random

import jax.numpy as jnp
import numpy as np
import pytest

from lwjax.serving.kv_cache import OutOfPages, PageAllocator, PagedKVCache, block_hashes

PAGE = 4


def _cache(num_pages=24):
  return PagedKVCache(num_layers=1, kv_heads=1, head_dim=1, num_pages=num_pages, page_size=PAGE,
                      dtype=jnp.float32)


def _write(cache, slots, values):
  """Stands in for the model's KV write: the token id itself is the stored key."""
  pages = jnp.array([p for p, _ in slots])
  offsets = jnp.array([o for _, o in slots])
  cache.k = (cache.k[0].at[0, pages, offsets, 0].set(jnp.array(values, jnp.float32)), *cache.k[1:])


def _read(cache, seq_id):
  table, lengths = cache.page_table([seq_id], max_pages=cache.allocator.num_pages)
  k = np.asarray(cache.k[0][0, :, :, 0])  # [pages, page_size]
  flat = k[table[0]].reshape(-1)
  return flat[:lengths[0]].astype(int).tolist()


def _check_invariants(cache, live):
  alloc = cache.allocator
  expected = np.zeros(alloc.num_pages, np.int32)
  for seq_id in live:
    for page in cache.pages(seq_id):
      expected[page] += 1
  np.testing.assert_array_equal(alloc.refcount, expected)
  free = set(alloc._free) | set(alloc._evictable)
  assert len(alloc._free) + len(alloc._evictable) == len(free)  # no page listed twice
  assert free.isdisjoint(np.flatnonzero(expected))  # a referenced page is never free
  assert len(free) + np.count_nonzero(expected) == alloc.num_pages  # no page lost


@pytest.mark.parametrize("seed", range(6))
def test_random_workload_keeps_contents_and_invariants(seed):
  rng = random.Random(seed)
  cache, tokens, next_id = _cache(), {}, 0
  vocab = [1, 2]  # a tiny vocabulary makes prefix-cache hits frequent
  for _ in range(150):
    op = rng.choice(["add", "add", "append", "append", "append", "fork", "truncate", "free"])
    live = list(tokens)
    try:
      if op == "add" or not live:
        prompt = [rng.choice(vocab) for _ in range(rng.randint(1, 3 * PAGE))]
        cached = cache.add_sequence(next_id, prompt)
        assert cached % PAGE == 0 and cached < len(prompt)
        assert _read(cache, next_id) == prompt[:cached]  # shared blocks hold exactly these tokens
        tokens[next_id] = prompt[:cached]
        try:
          _write(cache, cache.append(next_id, len(prompt) - cached), prompt[cached:])
        except OutOfPages:
          cache.free(next_id)
          del tokens[next_id]
          continue
        tokens[next_id] = list(prompt)
        cache.commit_blocks(next_id, prompt)
        next_id += 1
      elif op == "append":
        seq = rng.choice(live)
        new = [rng.choice(vocab) for _ in range(rng.randint(1, PAGE + 2))]
        _write(cache, cache.append(seq, len(new)), new)
        tokens[seq] += new
        cache.commit_blocks(seq, tokens[seq])
      elif op == "fork":
        parent = rng.choice(live)
        cache.fork(parent, next_id)
        tokens[next_id] = list(tokens[parent])
        next_id += 1
      elif op == "truncate":
        seq = rng.choice(live)
        length = rng.randint(0, len(tokens[seq]))
        cache.truncate(seq, length)
        tokens[seq] = tokens[seq][:length]
      else:
        seq = rng.choice(live)
        cache.free(seq)
        del tokens[seq]
    except OutOfPages:
      pass  # a refused append changes nothing; the invariants below still hold
    _check_invariants(cache, tokens)
    for seq_id, toks in tokens.items():
      assert _read(cache, seq_id) == toks, (op, seq_id)


def test_prefix_cache_shares_full_blocks_and_recomputes_the_last_token():
  cache = _cache()
  prompt = list(range(10, 10 + 2 * PAGE + 1))
  assert cache.add_sequence(0, prompt) == 0
  _write(cache, cache.append(0, len(prompt)), prompt)
  cache.commit_blocks(0, prompt)
  assert cache.add_sequence(1, prompt) == 2 * PAGE
  assert cache.pages(1) == cache.pages(0)[:2]
  # A prompt made only of cached blocks still recomputes its last block (to get next-token logits).
  assert cache.add_sequence(2, prompt[:2 * PAGE]) == PAGE


def test_fork_then_write_copies_the_shared_page():
  cache = _cache()
  cache.add_sequence(0, [5, 6, 7])
  _write(cache, cache.append(0, 3), [5, 6, 7])
  cache.fork(0, 1)
  assert cache.pages(0) == cache.pages(1)
  _write(cache, cache.append(1, 1), [9])
  assert cache.pages(0) != cache.pages(1)
  assert _read(cache, 0) == [5, 6, 7] and _read(cache, 1) == [5, 6, 7, 9]


def test_truncate_frees_whole_pages_and_out_of_pages_changes_nothing():
  cache = _cache(num_pages=3)
  cache.add_sequence(0, [1])
  cache.append(0, 3 * PAGE)
  cache.truncate(0, PAGE + 1)
  assert len(cache.pages(0)) == 2 and cache.allocator.num_free == 1
  with pytest.raises(OutOfPages):
    cache.append(0, 2 * PAGE)
  assert cache.length(0) == PAGE + 1 and len(cache.pages(0)) == 2
  with pytest.raises(ValueError, match="truncate length"):
    cache.truncate(0, 99)


def test_block_hashes_chain_over_the_prefix():
  a, b = block_hashes([1, 2, 3, 4, 5, 6, 7, 8], 4), block_hashes([9, 2, 3, 4, 5, 6, 7, 8], 4)
  assert len(a) == 2 and a[0] != b[0] and a[1] != b[1]  # same second block, different prefix
  assert block_hashes([1, 2, 3], 4) == []
  with pytest.raises(ValueError):
    PageAllocator(0, 4)
