"""OpenAI-compatible server: responses equal the offline engine, streaming, every error case, 429,
concurrent streaming clients over real HTTP, draining on shutdown."""

import asyncio
import dataclasses
import json
import os
import socket
import threading
import time

import httpx
import jax.numpy as jnp
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from flax import nnx

from lwjax.data import hf_tokenizer
from lwjax.data.tokenizer import ByteTokenizer
from lwjax.models.gpt import GPT, GPTConfig
from lwjax.serving.engine import LLM, Engine
from lwjax.serving.sampling import SamplingParams
from lwjax.serving.server import ChatMessage, chat_prompt, create_app

CFG = GPTConfig(vocab_size=272, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48,
                max_seq_len=64)
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def model():
  return GPT(CFG, rngs=nnx.Rngs(0))


def _engine(model, **kwargs):
  return Engine(model, num_pages=64, page_size=4, max_num_seqs=8, eos_id=TOK.eos_id, detokenize=TOK.decode,
                **kwargs)


def _offline_text(model, prompt: str, max_tokens: int) -> str:
  llm = LLM(model, tokenizer=TOK, num_pages=64, page_size=4)
  return llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=max_tokens))[0][0].text


@pytest.fixture(scope="module")
def client(model):
  with TestClient(create_app(_engine(model), TOK, model_name="tiny")) as c:
    yield c


def test_completion_equals_the_offline_engine(client, model):
  r = client.post("/v1/completions", json={"model": "tiny", "prompt": "Once", "max_tokens": 6, "temperature": 0})
  assert r.status_code == 200, r.text
  body = r.json()
  assert body["choices"][0]["text"] == _offline_text(model, "Once", 6)
  assert body["usage"]["prompt_tokens"] == 5 and body["object"] == "text_completion"


def test_streaming_deltas_add_up_to_the_answer(client, model):
  with client.stream("POST", "/v1/chat/completions", json={
      "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0,
      "stream": True}) as r:
    lines = [line for line in r.iter_lines() if line.startswith("data: ")]
  assert lines[-1] == "data: [DONE]"
  chunks = [json.loads(line[6:]) for line in lines[:-1]]
  text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
  prompt = chat_prompt([ChatMessage(role="user", content="hi")])
  assert text == _offline_text(model, prompt, 5)
  assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


def test_n_choices_and_the_model_list(client):
  r = client.post("/v1/completions", json={"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 3, "n": 2,
                                            "seed": 3})
  assert [c["index"] for c in r.json()["choices"]] == [0, 1]
  assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
  assert client.get("/health").json()["status"] == "ok"
  metrics = client.get("/metrics").text
  assert 'lwjax_requests_total{model_name="tiny"}' in metrics
  assert 'lwjax_kv_pages_free{model_name="tiny"} 64.0' in metrics


@pytest.mark.parametrize("body,status,param", [
    ({"prompt": "x"}, 400, "model"),
    ({"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x" * 70}, 400, "prompt"),
    ({"model": "tiny", "prompt": [999]}, 400, "prompt"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "big", "prompt": "x"}, 404, "model"),
])
def test_bad_requests_get_4xx_naming_the_field(client, body, status, param):
  endpoint = "/v1/chat/completions" if "messages" in body else "/v1/completions"
  r = client.post(endpoint, json=body)
  assert r.status_code == status, r.text
  assert r.json()["error"]["param"] == param


def test_a_full_queue_gets_429(model):
  app = create_app(_engine(model), TOK, model_name="tiny", max_queued=1)
  with TestClient(app) as c:
    app.state.worker._unanswered[0] = (None, None)  # as if one request were in flight
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
    del app.state.worker._unanswered[0]
  assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
  assert r.headers["retry-after"] == "1"


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _serve(model):
  port = _free_port()
  app = create_app(_engine(model), TOK, model_name="tiny")
  server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
  thread = threading.Thread(target=server.run, daemon=True)
  thread.start()
  deadline = time.time() + 30
  while not server.started and time.time() < deadline:
    time.sleep(0.05)
  return app, server, thread, port


def test_shutdown_drains_a_running_request(model):
  app, server, thread, port = _serve(model)
  result = {}

  def request():
    result["r"] = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": "drain", "max_tokens": 30, "temperature": 0})
  client = threading.Thread(target=request)
  client.start()
  deadline = time.time() + 30
  while app.state.worker.outstanding == 0 and time.time() < deadline:
    time.sleep(0.01)
  server.should_exit = True  # shutdown while the request is being generated
  client.join(timeout=60)
  thread.join(timeout=30)
  assert result["r"].status_code == 200
  assert result["r"].json()["choices"][0]["text"] == _offline_text(model, "drain", 30)


def test_64_concurrent_streaming_clients_over_http(model):
  app, server, thread, port = _serve(model)
  prompts = [f"p{i}" for i in range(64)]

  async def one(client, prompt):
    text = ""
    async with client.stream("POST", "/v1/completions", json={
        "model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0, "stream": True}) as r:
      async for line in r.aiter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
          text += json.loads(line[6:])["choices"][0]["text"]
    return text

  async def main():
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
      return await asyncio.gather(*(one(client, p) for p in prompts))
  try:
    texts = asyncio.run(main())
  finally:
    server.should_exit = True
    thread.join(timeout=30)
  expected = [_offline_text(model, p, 4) for p in prompts]
  assert texts == expected
  assert not thread.is_alive() and not app.state.worker.accepting  # drained and stopped


WIM_BODY = {"model": "tiny", "context": "abcdefghij", "query": "q", "segment_tokens": 4, "max_margin_tokens": 3,
            "max_tokens": 3, "extraction_template": "?{query}", "classification_template": "{margin}",
            "answer_template": "{margins}|{query}", "relevant_prefix": "a"}


def _offline_wim(model):
  """The same document read by `wim.WiMRequest` on an engine of its own: what the endpoint must stream."""
  from lwjax.serving import wim
  engine = _engine(model)
  bos, enc = [TOK.bos_id], TOK.encode
  context = bos + enc(WIM_BODY["context"])
  # The margins spliced into the relevance and answer prompts as the tokens the model wrote (lwjax.serving.templates).
  prompts = wim.WiMPrompts(extraction=lambda q: enc(f"?{q}"), classification=lambda q, m: bos + list(m),
                           answer=lambda q, ms: sum(([*([] if i == 0 else enc("\n")), *m] for i, m in enumerate(ms)),
                                                    []) + enc(f"|{q}"),
                           is_relevant=lambda out: TOK.decode(out).strip().upper().startswith("A"))
  greedy = SamplingParams(temperature=0.0, max_tokens=3)
  run = wim.WiMRequest(engine, [context[i:i + 4] for i in range(0, len(context), 4)], "q", prompts,
                       margin_params=greedy, classify_params=SamplingParams(temperature=0.0, max_tokens=4),
                       answer_params=greedy).start()
  engine.run_until_done()
  return [(TOK.decode(m.tokens), m.relevant) for m in run.margins], TOK.decode(run.answer)


def test_wim_streams_margins_in_order_then_the_answer(client, model):
  with client.stream("POST", "/v1/wim", json=WIM_BODY) as r:
    assert r.status_code == 200
    events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
  margins, answer = _offline_wim(model)
  assert [e["object"] for e in events] == ["wim.margin"] * 3 + ["wim.answer"]
  assert [(e["text"], e["relevant"]) for e in events[:3]] == margins and [e["segment"] for e in events[:3]] == [0, 1, 2]
  assert events[-1]["text"] == answer
  body = client.post("/v1/wim", json={**WIM_BODY, "stream": False}).json()
  assert [(m["text"], m["relevant"]) for m in body["margins"]] == margins and body["answer"] == answer
  assert body["usage"]["prompt_tokens"] > len(WIM_BODY["context"])


@pytest.mark.parametrize("change, status, param", [
    ({"extraction_template": "no placeholder"}, 400, "extraction_template"),
    ({"context": "x" * 80}, 400, "context"),
    ({"segment_tokens": 0}, 400, "segment_tokens"),
    ({"model": "other"}, 404, "model"),
])
def test_wim_bad_requests_name_the_field(client, change, status, param):
  r = client.post("/v1/wim", json={**WIM_BODY, "stream": False, **change})
  assert r.status_code == status and r.json()["error"]["param"] == param, r.text


@pytest.mark.slow
def test_wim_client_leaving_early_cancels_the_document_and_frees_its_pages(model):
  engine = _engine(model)
  with TestClient(create_app(engine, TOK, model_name="tiny")) as c:
    seen = []
    with c.stream("POST", "/v1/wim", json={**WIM_BODY, "context": "abcdefghijklmnopqrst"}) as r:  # 6 segments
      assert r.status_code == 200
      for line in r.iter_lines():
        if line.startswith("data: {"):
          seen.append(json.loads(line[6:]))
          break  # the first margin is enough: leave
    assert seen[0]["object"] == "wim.margin" and seen[0]["segment"] == 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (c.get("/health").json()["outstanding"] or engine.requests):
      time.sleep(0.05)
    assert c.get("/health").json()["outstanding"] == 0 and not engine.requests
    assert engine.kv.allocator.num_free == 64
    assert next(engine._ids) < 13  # a whole document: 6 turns, 6 relevance requests and the answer


def test_wim_documents_beyond_what_the_pool_holds_wait_for_their_turn(model):
  """Each document keeps its context's pages between its turns: eight at once on a pool for about two would
  leave nothing running that could free pages (the engine's `Stalled`). The server starts documents only while
  their pages fit in half the pool; the rest wait, and every one is answered as if read alone."""
  engine = Engine(model, num_pages=16, page_size=4, max_num_seqs=8, eos_id=TOK.eos_id, detokenize=TOK.decode)
  margins, answer = _offline_wim(model)
  with TestClient(create_app(engine, TOK, model_name="tiny")) as c:
    bodies = [None] * 8

    def read(i):
      bodies[i] = c.post("/v1/wim", json={**WIM_BODY, "stream": False})
    threads = [threading.Thread(target=read, args=(i,)) for i in range(8)]
    for t in threads:
      t.start()
    for t in threads:
      t.join(timeout=180)
    assert all(b is not None and b.status_code == 200 for b in bodies), [b and b.text for b in bodies]
    for b in bodies:
      assert [(m["text"], m["relevant"]) for m in b.json()["margins"]] == margins and b.json()["answer"] == answer
    assert engine.kv.allocator.num_free == 16 and c.get("/health").json()["outstanding"] == 0


def test_metrics_count_the_requests_sent(client):
  """/metrics in Prometheus text (vLLM's names where vLLM has one): after 3 requests of 4 tokens (one with n=2),
  the counters and the latency histograms moved by exactly that."""
  from prometheus_client.parser import text_string_to_metric_families

  def scrape():
    values = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
      for sample in family.samples:
        values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values
  before = scrape()
  for body in ({"prompt": "ab"}, {"prompt": "cd", "n": 2}):
    r = client.post("/v1/completions", json={"model": "tiny", "max_tokens": 4, "ignore_eos": True, **body})
    assert r.status_code == 200, r.text
  after = scrape()
  moved = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in after}
  assert moved["lwjax_requests_total"] == 3 and moved["vllm:request_success_total"] == 3
  assert moved["vllm:prompt_tokens_total"] == 3 + 3 * 2  # BOS + 2 bytes, once plus twice
  assert moved["vllm:generation_tokens_total"] == 12
  assert moved["vllm:time_to_first_token_seconds_count"] == 3 and moved["vllm:inter_token_latency_seconds_count"] == 9
  assert moved["vllm:e2e_request_latency_seconds_count"] == 3
  assert after["vllm:num_requests_running"] == 0 and after["vllm:kv_cache_usage_perc"] == 0.0


HF_TOKENIZERS = os.path.join(os.path.dirname(__file__), os.pardir, "fixtures", "hf", "tokenizers")


def _answers_a_then_stops(tok) -> GPT:
  """A tiny GPT whose greedy continuation of any prompt is "A" then <|eot_id|>: its blocks add nothing to the
  residual stream, so the next token depends on the last one alone, through a hand-set embedding and head."""
  cfg = GPTConfig(vocab_size=tok.vocab_size, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=4, d_ff=16,
                  max_seq_len=160)
  model = GPT(cfg, rngs=nnx.Rngs(0))
  for block in model.layers:
    block.attn.wo[...] = jnp.zeros_like(block.attn.wo[...])
    block.mlp.w_down[...] = jnp.zeros_like(block.mlp.w_down[...])
  a, eot = tok.token_to_id("A"), tok.token_to_id("<|eot_id|>")
  embed = np.zeros((cfg.vocab_size, cfg.d_model), np.float32)
  embed[:, 0], embed[a] = 1.0, np.eye(cfg.d_model)[1]  # every token points along axis 0, "A" along axis 1
  head = np.zeros((cfg.d_model, cfg.vocab_size), np.float32)
  head[0, a], head[1, eot] = 1.0, 1.0  # after any token "A", after "A" <|eot_id|>
  model.embed[...], model.lm_head[...] = jnp.asarray(embed), jnp.asarray(head)
  return model


def test_chat_renders_the_tokenizers_template_and_stops_at_its_end_of_turn():
  """With the llama3_style tokenizer (eos <|end_of_text|>; <|eot_id|> a stop id through generation_config only),
  the engine gets the chat template's ids (one BOS, the template's) and generation ends at <|eot_id|>: without
  the stop ids it would go on "A", <|eot_id|>, "A", ... to max_tokens."""
  tok = hf_tokenizer.load(os.path.join(HF_TOKENIZERS, "llama3_style"))
  assert tok.eos_id != tok.token_to_id("<|eot_id|>") and tok.token_to_id("<|eot_id|>") in tok.eos_ids
  engine = Engine(_answers_a_then_stops(tok), num_pages=64, page_size=4, max_num_seqs=4, eos_id=tok.eos_id,
                  stop_ids=tok.eos_ids, detokenize=tok.decode)
  received = []
  add_request = engine.add_request

  def recording(prompt, *args, **kwargs):
    received.append(list(prompt))
    return add_request(prompt, *args, **kwargs)
  engine.add_request = recording
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say A."}]
  with TestClient(create_app(engine, tok, model_name="tiny")) as c:
    r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 8,
                                             "temperature": 0})
  assert r.status_code == 200, r.text
  expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
  assert received == [expected] and expected.count(tok.bos_id) == 1
  assert tok.decode(expected, skip_special_tokens=False).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
  choice = r.json()["choices"][0]
  assert (choice["message"]["content"], choice["finish_reason"]) == ("A", "stop")
  assert r.json()["usage"]["completion_tokens"] == 2


def test_a_conversation_the_chat_template_refuses_is_a_400_naming_it():
  tok = hf_tokenizer.load(os.path.join(HF_TOKENIZERS, "gemma_style"))
  engine = Engine(GPT(dataclasses.replace(CFG, vocab_size=tok.vocab_size), rngs=nnx.Rngs(0)), num_pages=16,
                  page_size=4, eos_id=tok.eos_id, stop_ids=tok.eos_ids, detokenize=tok.decode)
  messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}]
  with TestClient(create_app(engine, tok, model_name="tiny")) as c:
    r = c.post("/v1/chat/completions", json={"model": "tiny", "messages": messages})
  assert r.status_code == 400, r.text
  error = r.json()["error"]
  assert error["param"] == "messages" and "System role not supported" in error["message"]
  assert "gemma_style/chat_template.jinja" in error["message"]
