"""KV offload: host LRU spilling to a bounded disk LRU; a conversation's next turn restores its blocks."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from lwjax.models.gpt import GPT, GPTConfig
from lwjax.serving.engine import Engine
from lwjax.serving.offload import KVOffloadStore
from lwjax.serving.sampling import SamplingParams

CFG = GPTConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48,
                max_seq_len=64)


def _block(value, dtype=np.float32):
  return np.full((2, 2, 4, 8), value, dtype), np.full((2, 2, 4, 8), -value, dtype)


def test_host_lru_spills_to_disk_and_disk_stays_bounded(tmp_path):
  one = sum(a.nbytes for a in _block(0, ml_dtypes.bfloat16))
  budget = 3 * one + 2000  # npz files carry a header: fewer than 4 blocks fit
  store = KVOffloadStore(host_bytes=2 * one, disk_dir=str(tmp_path), disk_bytes=budget)
  for i in range(6):
    store.put(bytes([i]), *_block(i, ml_dtypes.bfloat16))
  assert store.counters.bytes_to_host == 6 * one and store.counters.bytes_to_disk > 0
  k, v = store.get(bytes([5]))  # still on the host
  assert store.counters.host_hits == 1 and k.dtype == ml_dtypes.bfloat16
  k, v = store.get(bytes([2]))  # spilled to disk, read back bit-exactly as bfloat16
  assert store.counters.disk_hits == 1 and k.dtype == ml_dtypes.bfloat16 and float(v[0, 0, 0, 0]) == -2.0
  assert store.get(bytes([0])) is None  # pushed out of the disk LRU too
  files = list(tmp_path.iterdir())
  assert 2 <= len(files) < 4 and sum(f.stat().st_size for f in files) <= budget


def _greedy(model, prompt, n):
  cache = model.init_cache(1, 64)
  logits, cache = model.prefill(jnp.array([prompt]), cache)
  out = [int(jnp.argmax(logits[0, -1]))]
  while len(out) < n:
    logits, cache = model.decode_step(jnp.array([out[-1]]), cache)
    out.append(int(jnp.argmax(logits[0])))
  return out


@pytest.mark.parametrize("host_bytes", [1 << 20, 0])  # host memory, or straight through to disk
def test_next_turn_restores_offloaded_blocks_instead_of_recomputing(tmp_path, host_bytes):
  model = GPT(CFG, rngs=nnx.Rngs(0))
  store = KVOffloadStore(host_bytes=host_bytes, disk_dir=str(tmp_path), disk_bytes=1 << 20)
  engine = Engine(model, num_pages=8, page_size=4, prefill_chunk=8, max_batch_tokens=16, offload=store)
  greedy = SamplingParams(temperature=0.0, max_tokens=6)
  turn1 = list(range(10, 19))
  first = engine.add_request(turn1, greedy)
  engine.run_until_done()
  for prompt in ([40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [30] * 11):  # evict turn 1 from the pool
    engine.add_request(prompt, greedy)
    engine.run_until_done()
  turn2 = turn1 + first.output + [3, 4]
  second = engine.add_request(turn2, greedy)
  engine.run_until_done()
  assert engine.scheduler.num_prefix_hit_tokens >= 12  # three 4-token blocks of turn 1 + its answer
  assert store.counters.prefill_tokens_saved >= 12
  assert store.counters.bytes_to_device > 0
  assert second.output == _greedy(model, turn2, 6)
