"""Serving a hybrid (Mamba + attention layers) with the engine: greedy outputs of mixed batches equal the
hybrid's own single-sequence decoding through chunked prefill, preemption and asynchronous scheduling; the
prefix cache stays off; what a hybrid cannot use is refused clearly."""

import jax.numpy as jnp
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


@pytest.fixture(scope="module", params=[(1, 3), pytest.param((0, 1, 2, 3), marks=pytest.mark.slow)],
                ids=["half-mamba", "all-mamba"])
def model(request):
  return mh.HybridGPT(mh.HybridConfig(gpt=CFG, mamba_layers=request.param, chunk_size=4), rngs=nnx.Rngs(0))


@nnx.jit
def _prefill(model, tokens, cache, num_new):
  return model.prefill(tokens, cache, num_new)


@nnx.jit
def _decode(model, tokens, cache):
  return model.decode_step(tokens, cache)


def _greedy(model, prompts, max_tokens):
  """The hybrid's own greedy decoding of every prompt: one right-padded ragged prefill, then decode steps (two
  compilations for any mix of prompt lengths)."""
  lengths = np.array([len(p) for p in prompts], np.int32)
  tokens = np.zeros((len(prompts), lengths.max()), np.int32)
  for row, p in enumerate(prompts):
    tokens[row, :len(p)] = p
  logits, cache = _prefill(model, jnp.asarray(tokens), model.init_cache(len(prompts), 64), jnp.asarray(lengths))
  token = jnp.argmax(logits[jnp.arange(len(prompts)), lengths - 1], -1).astype(jnp.int32)
  out = [token]
  for _ in range(max_tokens - 1):
    logits, cache = _decode(model, token, cache)
    token = jnp.argmax(logits, -1).astype(jnp.int32)
    out.append(token)
  return np.stack(out, 1).tolist()


def _prompts(n, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, 61, size=rng.integers(1, 14)).tolist() for _ in range(n)]


@pytest.mark.parametrize("engine_kwargs", [
    pytest.param(dict(num_pages=64, page_size=4, prefill_chunk=4, max_batch_tokens=16), marks=pytest.mark.slow),
    pytest.param(dict(num_pages=64, page_size=4, prefill_chunk=8, max_batch_tokens=16, async_scheduling=False),
                 marks=pytest.mark.slow),
    dict(num_pages=9, page_size=4, prefill_chunk=8, max_batch_tokens=32),  # chunked prefill, async, preemption
], ids=["chunked", "sync", "preempt"])
def test_mixed_batches_equal_the_hybrids_own_greedy_decoding(model, engine_kwargs):
  prompts = _prompts(7)
  engine = Engine(model, max_num_seqs=4, **engine_kwargs)
  requests = [engine.add_request(p, GREEDY) for p in prompts]
  engine.run_until_done()
  for prompt, request, expected in zip(prompts, requests, _greedy(model, prompts, 6), strict=True):
    assert request.output == expected, prompt
  if engine_kwargs["num_pages"] == 9 and model.attention_layers:
    assert engine.scheduler.num_preemptions > 0
  assert engine.kv.allocator.num_free == engine_kwargs["num_pages"] and not engine._state_slots


@pytest.mark.slow
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
