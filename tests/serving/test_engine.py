"""Engine: greedy outputs for mixed batches equal single-sequence decoding, through chunked prefill,
preemption, prefix-cache hits and cancellation, with and without asynchronous scheduling; streaming,
stop strings and seeded sampling."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lwjax import memory_maps
from lwjax.models.gpt import GPT, GPTConfig
from lwjax.serving.engine import LLM, Engine
from lwjax.serving.sampling import SamplingParams

CFG = GPTConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48,
                max_seq_len=64)


@pytest.fixture(scope="module")
def model():
  return GPT(CFG, rngs=nnx.Rngs(0))


def _greedy(model, prompt, max_tokens):
  """Single-sequence greedy decoding with the contiguous KV cache: the ground truth."""
  cache = model.init_cache(1, 64)
  logits, cache = model.prefill(jnp.array([prompt]), cache)
  out = [int(jnp.argmax(logits[0, -1]))]
  while len(out) < max_tokens:
    logits, cache = model.decode_step(jnp.array([out[-1]]), cache)
    out.append(int(jnp.argmax(logits[0])))
  return out


def _prompts(n, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, 61, size=rng.integers(1, 12)).tolist() for _ in range(n)]


GREEDY = SamplingParams(temperature=0.0, max_tokens=6)


@pytest.mark.parametrize("engine_kwargs", [
    dict(num_pages=64, page_size=4, prefill_chunk=4, max_batch_tokens=16),  # chunked prefill
    pytest.param(dict(num_pages=64, page_size=4, prefill_chunk=4, max_batch_tokens=16, async_scheduling=False),
                 marks=pytest.mark.slow),
    pytest.param(dict(num_pages=64, page_size=4, prefill_chunk=4, max_batch_tokens=16, nano_batches=2),
                 marks=pytest.mark.slow),
    pytest.param(dict(num_pages=64, page_size=4, prefill_chunk=4, max_batch_tokens=16, mixed_batches=False),
                 marks=pytest.mark.slow),
    dict(num_pages=9, page_size=4, prefill_chunk=8, max_batch_tokens=32),  # forces preemption
])
def test_mixed_batches_equal_single_sequence_greedy_decoding(model, engine_kwargs):
  prompts = _prompts(7)
  engine = Engine(model, max_num_seqs=4, **engine_kwargs)
  requests = [engine.add_request(p, GREEDY) for p in prompts]
  engine.run_until_done()
  for prompt, request in zip(prompts, requests, strict=False):
    assert request.output == _greedy(model, prompt, 6), prompt
    assert request.finish_reason == "length"
  if engine_kwargs["num_pages"] == 9:
    assert engine.scheduler.num_preemptions > 0
  assert engine.kv.allocator.num_free == engine_kwargs["num_pages"]  # every page came back
  if engine.mixed_batches:  # decodes and prefill chunks of an iteration share one model call
    assert engine.num_model_calls <= engine.num_iterations
  else:
    assert engine.num_model_calls > engine.num_iterations  # some iterations ran both groups


def test_async_engine_frees_a_row_once_the_last_token_is_sampled(model):
  """A request whose last token (by max_tokens) is in flight gets no more work and gives its row to a waiting
  request at once: asynchronous scheduling then takes no more iterations than the synchronous engine (one
  more, to read the last tokens), where it used to take one more per finished request."""
  prompts = _prompts(6, seed=3)
  lengths = [2, 7, 3, 5, 4, 6]
  iterations, outputs = {}, {}
  for async_scheduling in (False, True):
    engine = Engine(model, num_pages=64, page_size=4, prefill_chunk=16, max_batch_tokens=64, max_num_seqs=2,
                    async_scheduling=async_scheduling)
    requests = [engine.add_request(p, SamplingParams(temperature=0.0, max_tokens=n))
                for p, n in zip(prompts, lengths, strict=True)]
    engine.run_until_done()
    iterations[async_scheduling] = engine.num_iterations
    outputs[async_scheduling] = [r.output for r in requests]
    assert [len(o) for o in outputs[async_scheduling]] == lengths
    assert engine.kv.allocator.num_free == 64
  assert outputs[True] == outputs[False]  # greedy: the same tokens (the first test checks them one by one)
  assert iterations[True] <= iterations[False] + 1, iterations


def test_mixed_programs_do_not_multiply_with_the_decode_rows(model):
  """An iteration of k decodes and one prompt chunk compiles one mixed program whatever k is (decode rows padded
  to all rows, one page-table width, the previous tokens at one size): a long WiM read used to compile hundreds
  of programs and exhaust the process's memory mappings."""
  engine = Engine(model, num_pages=64, page_size=16, prefill_chunk=16, max_batch_tokens=64, max_num_seqs=8)
  before = engine._run_mixed._cache_size()
  rng = np.random.default_rng(5)
  for k in (1, 2, 3, 5, 7):
    requests = [engine.add_request(rng.integers(3, 61, size=3).tolist(), SamplingParams(temperature=0.0,
                                                                                        max_tokens=12))
                for _ in range(k)]
    engine.step()
    engine.step()  # the k requests decode now
    late = engine.add_request(rng.integers(3, 61, size=10).tolist(), GREEDY)
    engine.run_until_done()
    assert all(len(r.output) == 12 for r in requests) and len(late.output) == 6
  assert engine._run_mixed._cache_size() - before == 1
  assert engine.num_compiled_programs >= 2


def test_engine_drops_its_programs_near_the_mapping_limit_and_still_decodes(model, monkeypatch):
  """Past the share of vm.max_map_count the engine allows, it frees its compiled programs (XLA:CPU keeps their
  code mapped until then) and compiles what it needs again; outputs are unchanged."""
  monkeypatch.setattr(memory_maps, "near_limit", lambda fraction: True)
  engine = Engine(model, num_pages=64, page_size=4, prefill_chunk=16, max_batch_tokens=64, max_num_seqs=4)
  prompts = _prompts(3, seed=7)
  requests = [engine.add_request(p, GREEDY) for p in prompts]
  engine.run_until_done()
  assert [r.output for r in requests] == [_greedy(model, p, 6) for p in prompts]
  assert engine.num_compiled_programs <= 1  # dropped after every new compile


def test_a_request_that_can_never_be_admitted_fails_alone(model):
  """Finished requests that retain their KV hold pages until released: with nothing running to free any, a
  request that needs more pages than are free used to loop forever in run_until_done, then raised `Stalled` out
  of the engine (failing everything the server ran). It now ends alone, with a 503 naming the fix; a waiting
  request that fits is admitted past it."""
  engine = Engine(model, num_pages=8, page_size=4, prefill_chunk=16, max_batch_tokens=32, max_num_seqs=4)
  kept = engine.add_request(list(range(3, 23)), SamplingParams(temperature=0.0, max_tokens=2), retain_kv=True)
  engine.run_until_done()
  assert engine.kv.allocator.num_free == 2  # 22 tokens in 6 pages of 4
  big = engine.add_request(list(range(30, 46)), GREEDY)  # 16 prompt tokens: 4 pages
  small = engine.add_request([5, 6], SamplingParams(temperature=0.0, max_tokens=2))  # 1 page: fits past it
  engine.run_until_done()
  assert small.finish_reason == "length" and small.output == _greedy(model, [5, 6], 2)
  assert big.finish_reason == "error" and big.error.status == 503 and "Engine.release" in big.error.message
  engine.release(kept)
  again = engine.add_request(list(range(30, 46)), GREEDY)
  engine.run_until_done()
  assert again.output == _greedy(model, list(range(30, 46)), 6)
  assert engine.kv.allocator.num_free == 8 and not engine.leaks()


def test_grouped_paged_step_equals_one_call_per_group(model):
  """`paged_step_groups` (one pass over the weights for decodes and chunks) = `paged_step` per group."""
  rng = np.random.default_rng(0)
  page_size, num_pages = 4, 16
  shape = (CFG.n_kv_heads, num_pages, page_size, CFG.head_dim)
  pools = tuple(jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(CFG.n_layers))
  # Group 1: two decode rows at lengths 6 and 3 (pages 0-1 and 2); group 2: one 4-token chunk (pages 4-5)
  # and one 2-token chunk left-padded (pages 8).
  decode = (jnp.array([[5], [7]]), (jnp.array([[1], [2]]), jnp.array([[1], [2]])), jnp.array([[0, 1], [2, 0]]),
            jnp.array([6, 3]))
  chunk = (jnp.array([[9, 10, 11, 12], [0, 0, 13, 14]]),
           (jnp.array([[4, 4, 4, 4], [num_pages, num_pages, 8, 8]]), jnp.array([[2, 3, 0, 0], [0, 0, 0, 1]])),
           jnp.array([[4, 5], [8, 0]]), jnp.array([6, 2]))
  logits, k, v = model.paged_step_groups([decode, chunk], pools, pools)
  k_ref, v_ref = pools, pools
  for (tokens, slots, table, lengths), got in zip((decode, chunk), logits, strict=True):
    want, k_ref, v_ref = model.paged_step(tokens, k_ref, v_ref, slots, table, lengths, last_only=True)
    np.testing.assert_allclose(got, want[:, -1], atol=1e-5, rtol=1e-5)
  for got, want in zip(k + v, k_ref + v_ref, strict=True):
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_prefix_cache_hits_skip_recomputation_and_keep_outputs(model):
  shared = list(range(10, 19))
  engine = Engine(model, num_pages=32, page_size=4, prefill_chunk=4, max_batch_tokens=8)
  first = engine.add_request(shared + [5], GREEDY)
  engine.run_until_done()
  second = engine.add_request(shared + [7, 8], GREEDY)
  engine.run_until_done()
  assert engine.scheduler.num_prefix_hit_tokens == 8  # two full 4-token blocks of the shared prefix
  assert first.output == _greedy(model, shared + [5], 6)
  assert second.output == _greedy(model, shared + [7, 8], 6)


def test_cancel_streaming_and_stop_strings(model):
  engine = Engine(model, num_pages=32, page_size=4, detokenize=lambda ids: "".join(chr(65 + i % 26) for i in ids))
  streamed = []
  keep = engine.add_request([3, 4, 5], GREEDY, on_token=lambda r, t: streamed.append(t))
  drop = engine.add_request([6, 7], SamplingParams(temperature=0.0, max_tokens=40))
  engine.step()
  engine.cancel(drop.id)
  engine.run_until_done()
  assert drop.finish_reason == "cancelled" and len(drop.output) < 40
  assert streamed == keep.output == _greedy(model, [3, 4, 5], 6)
  assert engine.kv.allocator.num_free == 32
  text = "".join(chr(65 + i % 26) for i in keep.output)
  stop = text[2:4]
  stopped = Engine(model, num_pages=32, page_size=4, detokenize=lambda ids: "".join(chr(65 + i % 26) for i in ids))
  r = stopped.add_request([3, 4, 5], SamplingParams(temperature=0.0, max_tokens=6, stop=(stop,)))
  stopped.run_until_done()
  assert r.finish_reason == "stop" and r.text == text[:text.find(stop)]


def test_seeded_sampling_does_not_depend_on_the_batch(model):
  params = SamplingParams(temperature=1.0, top_k=20, max_tokens=5, seed=11)
  alone = LLM(model, num_pages=32, page_size=4).generate([[3, 4, 5]], params)[0][0].output
  crowd = LLM(model, num_pages=32, page_size=4).generate(_prompts(3, seed=1) + [[3, 4, 5]], params)
  assert crowd[-1][0].output == alone
  n3 = LLM(model, num_pages=32, page_size=4).generate([[3, 4, 5]], dataclasses.replace(params, n=3))
  assert len(n3[0]) == 3 and n3[0][0].output == alone
  assert len({tuple(r.output) for r in n3[0]}) == 3  # seeds seed, seed + 1, seed + 2


def test_bad_requests_name_the_field(model):
  engine = Engine(model, num_pages=8, page_size=4)
  with pytest.raises(ValueError, match="^prompt: 60 tokens"):
    engine.add_request(list(range(60)), SamplingParams(max_tokens=10))
  with pytest.raises(ValueError, match="^prompt: empty"):
    engine.add_request([], GREEDY)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.0, max_tokens=6, logprobs=3),
                                    pytest.param(SamplingParams(temperature=1.0, max_tokens=6, seed=5, logprobs=0),
                                                 marks=pytest.mark.slow)])
def test_logprobs_equal_the_models_log_softmax(model, params):
  """Each generated token's logprob and its top alternatives are the model's own log-softmax at that position
  (before temperature), through chunked prefill and batching with requests that ask for none."""
  engine = Engine(model, num_pages=64, page_size=4, prefill_chunk=4, max_batch_tokens=16, max_num_seqs=4)
  prompts = _prompts(3, seed=3)
  asking = engine.add_request(prompts[0] + [7, 8, 9], params)
  others = [engine.add_request(p, GREEDY) for p in prompts[1:]]
  engine.run_until_done()
  assert all(r.logprobs == [] for r in others)
  assert [r.output for r in others] == [_greedy(model, p, 6) for p in prompts[1:]]
  tokens = asking.prompt + asking.output
  logits, _ = model.prefill(jnp.array([tokens[:-1]]), model.init_cache(1, 64))
  reference = np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1))
  assert len(asking.logprobs) == len(asking.output) == 6
  k = params.logprobs
  for i, (logprob, top_ids, top_logprobs) in enumerate(asking.logprobs):
    row = reference[len(asking.prompt) - 1 + i]
    np.testing.assert_allclose(logprob, row[asking.output[i]], atol=1e-4)
    assert top_ids == np.argsort(-row)[:k].tolist()
    np.testing.assert_allclose(top_logprobs, np.sort(row)[::-1][:k], atol=1e-4)


@pytest.mark.parametrize("engine_kwargs", [dict(prefill_chunk=4, max_batch_tokens=16),
                                           pytest.param(dict(prefill_chunk=16, max_batch_tokens=32,
                                                             async_scheduling=False), marks=pytest.mark.slow)])
def test_prompt_logprobs_through_chunked_prefill_and_a_cached_prefix(model, engine_kwargs):
  """Every prompt token after the first gets its logprob given the tokens before it, across prefill chunks, and
  even when its prefix is in the prefix cache (a request that wants them recomputes it); decodes share the batch."""
  engine = Engine(model, num_pages=64, page_size=4, max_num_seqs=4, **engine_kwargs)
  prompt = list(range(5, 19))  # 14 tokens: 4 chunks of 4
  warm = engine.add_request(prompt, GREEDY)  # puts the prompt's full blocks in the prefix cache
  engine.run_until_done()
  other = engine.add_request([9, 8, 7], SamplingParams(temperature=0.0, max_tokens=8))
  scored = engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=2))
  engine.run_until_done()
  assert other.output == _greedy(model, [9, 8, 7], 8) and scored.output == warm.output[:1]
  logits, _ = model.prefill(jnp.array([prompt]), model.init_cache(1, 64))
  reference = np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1))
  assert sorted(scored.prompt_logprobs) == list(range(1, len(prompt)))
  for position, (logprob, top_ids, top_logprobs) in scored.prompt_logprobs.items():
    row = reference[position - 1]
    np.testing.assert_allclose(logprob, row[prompt[position]], atol=1e-4)
    assert top_ids == np.argsort(-row)[:2].tolist()
    np.testing.assert_allclose(top_logprobs, np.sort(row)[::-1][:2], atol=1e-4)
  assert engine.leaks() == []
