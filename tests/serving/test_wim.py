"""Writing in the Margins on the engine: continuations cut back to a prefix equal a fresh prefill of it; every
margin, relevance and answer equals single-sequence greedy decoding of what the pattern reads; margins stream
in segment order; early exit frees every page; WiM turns share the engine's batches with ordinary requests."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lwjax.models.gpt import GPT, GPTConfig
from lwjax.serving import wim
from lwjax.serving.engine import Engine
from lwjax.serving.sampling import SamplingParams

CFG = GPTConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48,
                max_seq_len=128)
EXTRACT, CLASSIFY, ANSWER = [7, 8], [9], [10, 11]
PROMPTS = wim.WiMPrompts(
    extraction=lambda query: EXTRACT + [len(query)],
    classification=lambda query, margin: CLASSIFY + margin + [len(query)],
    answer=lambda query, margins: ANSWER + [t for m in margins for t in m] + [len(query)],
    is_relevant=lambda output: output[0] % 2 == 0)
MARGIN, CLASSIFY_P, ANSWER_P = (SamplingParams(temperature=0.0, max_tokens=n) for n in (4, 1, 5))


@pytest.fixture(scope="module")
def model():
  return GPT(CFG, rngs=nnx.Rngs(0))


@nnx.jit
def _prefill(model, tokens, cache, num_new):
  return model.prefill(tokens, cache, num_new)


@nnx.jit
def _decode(model, tokens, cache):
  return model.decode_step(tokens, cache)


def _greedy(model, prompt, max_tokens):
  """Single-sequence greedy decoding of `prompt` read from scratch (right-padded to 64 tokens, the padding past
  the sequence's length: one compilation for every prompt)."""
  logits, cache = _prefill(model, jnp.array([list(prompt) + [0] * (64 - len(prompt))]), model.init_cache(1, 128),
                           jnp.array([len(prompt)]))
  out = [int(jnp.argmax(logits[0, len(prompt) - 1]))]
  while len(out) < max_tokens:
    logits, cache = _decode(model, jnp.array([out[-1]]), cache)
    out.append(int(jnp.argmax(logits[0])))
  return out


def _segments(seed, n=3):
  rng = np.random.default_rng(seed)
  return [rng.integers(12, 61, size=rng.integers(5, 11)).tolist() for _ in range(n)]


def _engine(model, **kwargs):
  settings = dict(num_pages=96, page_size=4, prefill_chunk=8, max_batch_tokens=32, max_num_seqs=6)
  return Engine(model, **{**settings, **kwargs})


@pytest.mark.parametrize("async_scheduling", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_margins_relevance_and_answer_equal_greedy_decoding_of_what_wim_reads(model, async_scheduling):
  engine = _engine(model, async_scheduling=async_scheduling)
  docs = [(_segments(seed), "q" * (seed + 1)) for seed in range(2)]
  events = {i: [] for i in range(len(docs))}
  runs = [wim.WiMRequest(engine, segs, query, PROMPTS, margin_params=MARGIN, classify_params=CLASSIFY_P,
                         answer_params=ANSWER_P, on_event=lambda kind, payload, i=i: events[i].append((kind, payload)))
          .start() for i, (segs, query) in enumerate(docs)]
  engine.run_until_done()
  for run, (segs, query), doc_events in zip(runs, docs, events.values(), strict=True):
    assert run.done and not run.exited
    context, kept = [], []
    for i, seg in enumerate(segs):
      context += seg
      margin = _greedy(model, context + PROMPTS.extraction(query), MARGIN.max_tokens)
      relevant = PROMPTS.is_relevant(_greedy(model, PROMPTS.classification(query, margin), 1))
      assert run.margins[i].tokens == margin and run.margins[i].relevant == relevant, i
      kept += [margin] if relevant else []
    assert run.answer == _greedy(model, context + PROMPTS.answer(query, kept), ANSWER_P.max_tokens)
    assert [k for k, _ in doc_events] == ["margin"] * len(segs) + ["answer"]
    assert [p.segment for k, p in doc_events if k == "margin"] == list(range(len(segs)))
    # The context is fed once: segments + extraction prompts + classification prompts + the answer prompt.
    fed = sum(len(s) + len(PROMPTS.extraction(query)) for s in segs)
    fed += sum(len(PROMPTS.classification(query, m.tokens)) for m in run.margins)
    assert run.stats.prefill_tokens == fed + len(PROMPTS.answer(query, kept))
    assert run.first_margin_seconds is not None
  assert engine.kv.allocator.num_free == 96  # every page came back


@pytest.mark.slow
def test_a_continuation_cut_back_to_a_prefix_holds_the_fresh_prefills_kv(model):
  engine = _engine(model, async_scheduling=False, prefill_chunk=16, max_batch_tokens=16)
  context = list(range(12, 22))  # 10 tokens: the cut falls inside a page
  parent = engine.add_request(context + [3, 4, 5], MARGIN, retain_kv=True)
  engine.run_until_done()
  child = engine.add_request([6], SamplingParams(temperature=0.0, max_tokens=1), parent=parent, keep=len(context))
  engine.release(parent)
  fresh = engine.add_request(context + [6], SamplingParams(temperature=0.0, max_tokens=1))
  assert engine.kv.length(child.id) == len(context)
  engine.run_until_done()
  assert child.output == fresh.output == _greedy(model, context + [6], 1)
  with pytest.raises(ValueError, match="^parent: request"):
    engine.add_request([1], MARGIN, parent=child)  # not retained: its KV is gone
  keeper = engine.add_request(context, MARGIN, retain_kv=True)
  engine.run_until_done()
  with pytest.raises(ValueError, match="^keep: 99 outside"):
    engine.add_request([1], MARGIN, parent=keeper, keep=99)
  engine.release(keeper)
  assert engine.kv.allocator.num_free == 96


def test_kv_of_the_cut_back_prefix_is_bit_identical_to_a_fresh_prefill(model):
  """Pages of a context prefilled as the first turn of WiM, after the cut-back, against the same context
  prefilled by a fresh request with the same chunking."""
  engine = _engine(model, async_scheduling=False, prefill_chunk=8, max_batch_tokens=8, max_num_seqs=1)
  engine.kv.prefix_caching = False  # the fresh request computes its own pages
  context = list(range(12, 28))  # 16 tokens: 4 full pages
  parent = engine.add_request(context + EXTRACT, MARGIN, retain_kv=True)
  engine.run_until_done()
  child = engine.add_request([5], SamplingParams(temperature=0.0, max_tokens=1), parent=parent, keep=len(context),
                             retain_kv=True)
  engine.release(parent)
  engine.run_until_done()
  fresh = engine.add_request(context + [5], SamplingParams(temperature=0.0, max_tokens=1), retain_kv=True)
  engine.run_until_done()
  pages_child, pages_fresh = engine.kv.pages(child.id)[:4], engine.kv.pages(fresh.id)[:4]
  assert set(pages_child).isdisjoint(pages_fresh)  # prefix caching did not simply share them
  for pool in engine.kv.k + engine.kv.v:
    np.testing.assert_array_equal(np.asarray(pool[:, pages_child]), np.asarray(pool[:, pages_fresh]))


def test_early_exit_stops_the_document_and_frees_its_pages(model):
  engine = _engine(model)
  seen = []
  run = wim.WiMRequest(engine, _segments(3, n=4), "q", PROMPTS, margin_params=MARGIN, classify_params=CLASSIFY_P,
                       answer_params=ANSWER_P, on_event=lambda kind, payload: seen.append(kind),
                       early_exit=lambda margin: margin.segment == 1).start()
  engine.run_until_done()
  assert run.done and run.exited and run.answer is None
  assert seen == ["margin", "margin", "exit"]
  assert engine.kv.allocator.num_free == 96 and not engine.requests


@pytest.mark.slow
def test_wim_turns_share_batches_with_ordinary_requests(model):
  engine = _engine(model)
  batches = []
  schedule = engine.scheduler.schedule

  def recording(only=None):
    work = schedule(only)
    batches.append({w.request.id for w in work})
    return work
  engine.scheduler.schedule = recording
  run = wim.WiMRequest(engine, _segments(4), "qq", PROMPTS, margin_params=MARGIN, classify_params=CLASSIFY_P,
                       answer_params=ANSWER_P).start()
  wim_ids = set(run._in_flight)
  ordinary = [engine.add_request([20 + i, 21, 22], SamplingParams(temperature=0.0, max_tokens=12)) for i in range(3)]
  engine.run_until_done()
  assert run.done and all(r.finish_reason == "length" for r in ordinary)
  assert any(ids & wim_ids and ids & {r.id for r in ordinary} for ids in batches)
