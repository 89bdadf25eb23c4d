"""Failures end only the requests they belong to: iterations that raise (before or after the model call), a request
that fails wherever it runs, KV pools lost with a failed call, callbacks that raise, and a WiM document whose turn
fails. Every other request's output equals the output it has alone (penalties, whose counts the rolled-back tokens
must leave, included), and an idle engine holds nothing (`Engine.leaks`)."""

import dataclasses

import pytest
from flax import nnx

from lwjax.models.gpt import GPT, GPTConfig
from lwjax.serving import wim
from lwjax.serving.engine import Engine
from lwjax.serving.faults import FaultInjectingEngine
from lwjax.serving.sampling import SamplingParams

CFG = GPTConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48,
                max_seq_len=128)
SETTINGS = dict(num_pages=48, page_size=4, prefill_chunk=8, max_batch_tokens=32, max_num_seqs=4)
GREEDY = SamplingParams(temperature=0.0, max_tokens=6)
SAMPLED = SamplingParams(temperature=1.0, max_tokens=6, seed=11)
MARKER = 60  # a prompt starting with it is the request that always fails
PROMPTS = [[5 + i, 6, 7 + 2 * i][: 1 + i % 3] * (1 + i % 4) for i in range(8)]
PENALTIES = dict(presence_penalty=-1.5, frequency_penalty=0.5, repetition_penalty=1.3, logit_bias={"7": 3.0},
                 min_tokens=3)


@pytest.fixture(scope="module")
def model():
  return GPT(CFG, rngs=nnx.Rngs(0))


def _alone(model, prompt, params):
  engine = Engine(model, **SETTINGS)
  request = engine.add_request(prompt, params)
  engine.run_until_done()
  return request.output


def _params(i, penalised=False):
  params = GREEDY if i % 2 else SAMPLED
  return dataclasses.replace(params, **PENALTIES) if penalised and i % 4 < 2 else params


@pytest.mark.parametrize("where, async_scheduling, penalised", [
    ("before", True, False), pytest.param("before", True, True, marks=pytest.mark.slow),
    pytest.param("after", True, True, marks=pytest.mark.slow),
    pytest.param("before", False, False, marks=pytest.mark.slow),
    pytest.param("after", False, True, marks=pytest.mark.slow)])
def test_failed_iterations_fail_no_request(model, where, async_scheduling, penalised):
  """Three iterations raise; every request is rolled back, retried alone, and ends with its own output (greedy
  and seeded sampling alike: a token depends on the seed and its index only; with penalties for half of them,
  counted from the tokens kept)."""
  engine = FaultInjectingEngine(model, fail_iterations={2, 5, 9}, where=where, async_scheduling=async_scheduling,
                                **SETTINGS)
  requests = [engine.add_request(p, _params(i, penalised)) for i, p in enumerate(PROMPTS)]
  engine.run_until_done()
  assert engine.num_injected == 3 and engine.num_failed_iterations == 3
  assert [r.finish_reason for r in requests] == ["length"] * len(PROMPTS)
  assert [r.output for r in requests] == [_alone(model, p, _params(i, penalised)) for i, p in enumerate(PROMPTS)]
  assert engine.leaks() == []


def test_a_request_that_always_fails_fails_alone_with_an_error_id(model, caplog):
  engine = FaultInjectingEngine(model, fail_request_if=lambda r: r.prompt[0] == MARKER, **SETTINGS)
  streamed = []
  requests = [engine.add_request(p, _params(i), on_token=lambda r, t: streamed.append(r.id))
              for i, p in enumerate(PROMPTS[:4])]
  bad = engine.add_request([MARKER, 5, 6], GREEDY)
  requests += [engine.add_request(p, _params(i)) for i, p in enumerate(PROMPTS[4:], start=4)]
  engine.run_until_done()
  assert bad.finish_reason == "error" and bad.error.status == 500 and bad.output == []
  assert bad.error.error_id and bad.error.error_id in bad.error.message
  assert any(bad.error.error_id in record.getMessage() for record in caplog.records)  # the log names it too
  assert [r.output for r in requests] == [_alone(model, p, _params(i)) for i, p in enumerate(PROMPTS)]
  assert bad.id not in streamed and engine.leaks() == []


@pytest.mark.slow
def test_kv_pools_lost_with_a_failed_call_fail_the_running_requests_and_the_engine_goes_on(model):
  engine = FaultInjectingEngine(model, fail_iterations={3}, lose_kv=True, **SETTINGS)
  first = [engine.add_request(p, GREEDY) for p in PROMPTS[:4]]
  engine.run_until_done()
  assert all(r.finish_reason == "error" and r.error.status == 500 for r in first)
  later = [engine.add_request(p, GREEDY) for p in PROMPTS[4:]]
  engine.run_until_done()
  assert [r.output for r in later] == [_alone(model, p, GREEDY) for p in PROMPTS[4:]]
  assert engine.leaks() == []


@pytest.mark.slow
def test_a_callback_that_raises_fails_its_request_alone(model):
  engine = Engine(model, **SETTINGS)

  def broken(request, token):
    raise RuntimeError("the client's queue is gone")
  bad = engine.add_request(PROMPTS[0], GREEDY, on_token=broken)
  good = [engine.add_request(p, GREEDY) for p in PROMPTS[1:4]]
  engine.run_until_done()
  assert bad.finish_reason == "error" and "client's queue" in bad.error.message
  assert [r.output for r in good] == [_alone(model, p, GREEDY) for p in PROMPTS[1:4]]
  assert engine.leaks() == []


WIM_PROMPTS = wim.WiMPrompts(
    extraction=lambda query: [7, 8, len(query)], classification=lambda query, margin: [9] + margin,
    answer=lambda query, margins: [10, 11] + [t for m in margins for t in m], is_relevant=lambda out: out[0] % 2 == 0)


def _document(engine, segments, events):
  margin = SamplingParams(temperature=0.0, max_tokens=3)
  return wim.WiMRequest(engine, segments, "q", WIM_PROMPTS, margin_params=margin,
                        classify_params=SamplingParams(temperature=0.0, max_tokens=1),
                        answer_params=SamplingParams(temperature=0.0, max_tokens=4),
                        on_event=lambda kind, payload: events.append(kind)).start()


def test_a_wim_document_whose_turn_fails_ends_alone_and_frees_its_pages(model):
  """Document A's second segment carries the marker: its turn fails, A ends with a 500 (its turns cancelled, its
  retained context released); document B and an ordinary request read beside it end as they do alone."""
  good_segments = [[20, 21, 22, 23, 24], [25, 26, 27], [28, 29, 30, 31]]
  alone_engine = Engine(model, **SETTINGS)
  alone = _document(alone_engine, good_segments, [])
  alone_engine.run_until_done()

  engine = FaultInjectingEngine(model, fail_request_if=lambda r: MARKER in r.prompt, **SETTINGS)
  events_a, events_b = [], []
  a = _document(engine, [[30, 31, 32, 33], [MARKER, 34, 35], [36, 37]], events_a)
  b = _document(engine, good_segments, events_b)
  ordinary = engine.add_request(PROMPTS[3], GREEDY)
  engine.run_until_done()
  assert a.done and a.error is not None and a.error.status == 500 and a.answer is None
  assert events_a[-1] == "error" and "answer" not in events_a
  assert b.error is None and b.answer == alone.answer
  assert [m.tokens for m in b.margins] == [m.tokens for m in alone.margins]
  assert ordinary.output == _alone(model, PROMPTS[3], GREEDY)
  assert engine.leaks() == []
