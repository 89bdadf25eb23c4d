"""Serving a hybrid (Mamba + attention layers) with the engine: greedy outputs of mixed batches equal the
hybrid's own single-sequence decoding through chunked prefill, preemption and asynchronous scheduling; the
prefix cache stays off; what a hybrid cannot use is refused clearly."""

import jax
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


def test_the_engines_logprobs_of_a_hybrid_are_its_own_forward_log_softmax(model):
  """Prefill and decodes (the Mamba state carried from one to the next): every prompt and output token's logprob
  and top alternatives equal the log-softmax of the hybrid's own forward over the whole sequence; a request with a
  repetition penalty in the same batch gets that log-softmax penalised (and the other none of it). (Chunked
  prefill: `test_mixed_batches_equal_the_hybrids_own_greedy_decoding`.)"""
  prompt = [5, 9, 13, 7, 22, 3, 40, 9, 5, 30]
  engine = Engine(model, num_pages=32, page_size=4, max_num_seqs=4, prefill_chunk=16, max_batch_tokens=32)
  plain = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=5, logprobs=3, prompt_logprobs=3))
  penalised = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=5, logprobs=3,
                                                        repetition_penalty=1.7))
  engine.run_until_done()
  sequences = [prompt + r.output[:-1] for r in (plain, penalised)]
  logits_btv = np.asarray(nnx.jit(lambda m, tokens: m(tokens))(model, jnp.array(sequences)), np.float32)
  for request, repetition, logits in ((plain, 1.0, logits_btv[0]), (penalised, 1.7, logits_btv[1])):
    tokens = prompt + request.output
    for i, (token, (logprob, top_ids, top_logprobs)) in enumerate(zip(request.output, request.logprobs, strict=True)):
      step = logits[len(prompt) - 1 + i]
      seen = np.zeros(CFG.vocab_size, bool)
      seen[tokens[:len(prompt) + i]] = True
      step = np.where(seen, np.where(step > 0, step / repetition, step * repetition), step)
      reference = step - step.max() - np.log(np.exp(step - step.max()).sum())
      assert token == np.argmax(reference)
      np.testing.assert_allclose(logprob, reference[token], atol=1e-4)
      np.testing.assert_allclose(top_logprobs, np.sort(reference)[::-1][:3], atol=1e-4)
      assert top_ids[0] == token
  reference = np.asarray(jax.nn.log_softmax(logits_btv[0]))  # the prompt's: a prefix of the plain sequence's
  assert sorted(plain.prompt_logprobs) == list(range(1, len(prompt)))
  for p, (logprob, _, top_logprobs) in plain.prompt_logprobs.items():
    np.testing.assert_allclose(logprob, reference[p - 1, prompt[p]], atol=1e-4)
    np.testing.assert_allclose(top_logprobs, np.sort(reference[p - 1])[::-1][:3], atol=1e-4)
  assert plain.output != penalised.output
