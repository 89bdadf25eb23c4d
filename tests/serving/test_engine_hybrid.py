"""Serving a hybrid (Mamba + attention layers) with the engine: greedy outputs of mixed batches equal the
hybrid's own single-sequence decoding through chunked prefill, preemption and asynchronous scheduling; the
prefix cache stays off; what a hybrid cannot use is refused clearly."""

import numpy as np
import pytest
from flax import nnx

from lwjax.models import mamba_hybrid as mh
from lwjax.models.gpt import GPTConfig
from lwjax.serving import speculative
from lwjax.serving.engine import LLM, Engine
from lwjax.serving.offload import KVOffloadStore
from lwjax.serving.sampling import SamplingParams

CFG = GPTConfig(vocab_size=61, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48,
                max_seq_len=64)
GREEDY = SamplingParams(temperature=0.0, max_tokens=6)


@pytest.fixture(scope="module", params=[(1, 3), (0, 1, 2, 3)], ids=["half-mamba", "all-mamba"])
def model(request):
  return mh.HybridGPT(mh.HybridConfig(gpt=CFG, mamba_layers=request.param, chunk_size=4), rngs=nnx.Rngs(0))


def _prompts(n, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, 61, size=rng.integers(1, 14)).tolist() for _ in range(n)]


@pytest.mark.parametrize("engine_kwargs", [
    dict(num_pages=64, page_size=4, prefill_chunk=4, max_batch_tokens=16),  # chunked prefill, async
    dict(num_pages=64, page_size=4, prefill_chunk=8, max_batch_tokens=16, async_scheduling=False),
    dict(num_pages=9, page_size=4, prefill_chunk=8, max_batch_tokens=32),  # forces preemption
], ids=["chunked", "sync", "preempt"])
def test_mixed_batches_equal_the_hybrids_own_greedy_decoding(model, engine_kwargs):
  prompts = _prompts(7)
  engine = Engine(model, max_num_seqs=4, **engine_kwargs)
  requests = [engine.add_request(p, GREEDY) for p in prompts]
  engine.run_until_done()
  for prompt, request in zip(prompts, requests, strict=True):
    assert request.output == speculative.greedy(model, prompt, 6).tolist(), prompt
  if engine_kwargs["num_pages"] == 9 and model.attention_layers:
    assert engine.scheduler.num_preemptions > 0
  assert engine.kv.allocator.num_free == engine_kwargs["num_pages"] and not engine._state_slots


def test_no_prefix_cache_and_what_a_hybrid_refuses(model):
  shared = list(range(10, 19))
  llm = LLM(model, num_pages=32, page_size=4, prefill_chunk=4, max_batch_tokens=8)
  (first,), (second,) = llm.generate([shared + [5], shared + [7, 8]], GREEDY)
  assert llm.engine.scheduler.num_prefix_hit_tokens == 0  # a KV prefix would not bring the Mamba state
  assert first.output == speculative.greedy(model, shared + [5], 6).tolist()
  assert second.output == speculative.greedy(model, shared + [7, 8], 6).tolist()
  with pytest.raises(ValueError, match="nano_batches=1"):
    Engine(model, nano_batches=2)
  with pytest.raises(ValueError, match="without KV offload"):
    Engine(model, offload=KVOffloadStore(host_bytes=1 << 20))
