"""OpenAI-compatible HTTP API over the engine (NanoFlow §4 serving front end), on FastAPI.

`/v1/completions`, `/v1/chat/completions` (both with SSE streaming), `/v1/wim` (Writing in the Margins over
a long context: each margin and its relevance streamed as an event while the context is still being read;
the client exits early by closing the stream), `/v1/models`, `/health` and Prometheus `/metrics`. The engine
runs in one background thread (`EngineThread`); request handlers talk to it through a submission queue and
per-request asyncio queues, so the event loop never blocks on the device. Bad input gets a 400 naming the
field, a full queue a 429, an unknown model a 404; on shutdown new requests get 503 while the running ones
drain.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import queue
import threading
import time
import uuid
from typing import Any

import fastapi
import pydantic
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from lwjax.serving import wim
from lwjax.serving.engine import Engine
from lwjax.serving.sampling import SamplingParams


class EngineThread:
  """Owns the engine: submissions, cancellations and iterations all happen on its thread."""

  def __init__(self, engine: Engine, *, max_queued: int):
    self.engine, self.max_queued = engine, max_queued
    self._inbox: queue.Queue = queue.Queue()
    self._outstanding = 0
    self._lock = threading.Lock()
    self.accepting = True
    self.counters = {"requests_total": 0, "requests_rejected_total": 0, "generated_tokens_total": 0,
                     "prompt_tokens_total": 0}
    self._wim_runs: dict[int, tuple] = {}  # out queue -> (WiM document, its event loop, the pages it reserves)
    # WiM documents not started yet: (make_run, out queue, event loop, pages). A document keeps its context's
    # pages between its turns, so the documents started at once must leave pages for their turns: more than the
    # pool holds would leave nothing running that frees any.
    self._wim_waiting: collections.deque = collections.deque()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, name="lwjax-engine", daemon=True)
    self._thread.start()

  @property
  def outstanding(self) -> int:
    return self._outstanding

  def _admit(self, prompt_tokens: int) -> None:
    """Counts one more outstanding request, or refuses it: 503 while draining, 429 when the queue is full."""
    with self._lock:
      if not self.accepting:
        raise fastapi.HTTPException(503, "server is shutting down")
      if self._outstanding >= self.max_queued:
        self.counters["requests_rejected_total"] += 1
        raise fastapi.HTTPException(429, f"queue full ({self.max_queued} requests); retry later")
      self._outstanding += 1
      self.counters["requests_total"] += 1
      self.counters["prompt_tokens_total"] += prompt_tokens

  def submit(self, prompt: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
    """Queues a request; its tokens, then ("done", request) arrive on the returned asyncio queue."""
    self._admit(len(prompt))
    out: asyncio.Queue = asyncio.Queue()
    self._inbox.put(("add", prompt, params, out, loop))
    return out

  def cancel(self, out: asyncio.Queue) -> None:
    self._inbox.put(("cancel", out))

  def cancel_wim(self, out: asyncio.Queue) -> None:
    """Stops the WiM document whose events go to `out` (its client left); its pages are freed."""
    self._inbox.put(("cancel_wim", out))

  def submit_wim(self, make_run, prompt_tokens: int, loop: asyncio.AbstractEventLoop,
                 reserve_tokens: int | None = None) -> asyncio.Queue:
    """Queues a WiM document: `make_run(engine, on_event)` builds its `wim.WiMRequest` on the engine thread;
    ("margin", Margin), ("answer", tokens), ("exit", margin) and finally ("done", run) arrive on the queue.

    The document starts once the pages of `reserve_tokens` (its longest request; default its context) fit, with
    those of the documents already started, in half the pool (the rest is for their turns), or at once when no
    other document runs; until then it waits, in arrival order."""
    self._admit(prompt_tokens)
    out: asyncio.Queue = asyncio.Queue()
    self._inbox.put(("wim", make_run, out, loop, reserve_tokens or prompt_tokens))
    return out

  def _loop(self) -> None:
    by_queue: dict[int, Any] = {}
    while not self._stop.is_set():
      block = not self.engine.scheduler.has_work()
      try:
        while True:
          self._handle(self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait(), by_queue)
          block = False
      except queue.Empty:
        pass
      if not self.engine.scheduler.has_work():
        continue
      try:
        finished = self.engine.step()
      except Exception:  # a failed iteration must not hang its clients: fail them all
        logging.exception("engine iteration failed")
        finished = list(self.engine.requests.values())
        for request in finished:
          self.engine.scheduler.finish(request, "error")
          del self.engine.requests[request.id]
      for request in finished:
        entry = by_queue.pop(id(request), None)
        if entry is None:  # a turn of a WiM document: its events go through the document
          continue
        out, loop = entry
        loop.call_soon_threadsafe(out.put_nowait, ("done", request))
        with self._lock:
          self._outstanding -= 1
      self._retire_wim_runs()

  def _retire_wim_runs(self) -> None:
    for out in [o for o, (run, _, _) in self._wim_runs.items() if run.done]:
      run, loop, _ = self._wim_runs.pop(out)
      loop.call_soon_threadsafe(out.put_nowait, ("done", run))
      with self._lock:
        self._outstanding -= 1
    self._start_waiting_wim()

  def _start_waiting_wim(self) -> None:
    budget = self.engine.kv.allocator.num_pages // 2
    while self._wim_waiting:
      make_run, out, loop, pages = self._wim_waiting[0]
      reserved = sum(r[2] for r in self._wim_runs.values())
      if self._wim_runs and reserved + pages > budget:
        return
      self._wim_waiting.popleft()

      def on_event(kind, payload, out=out, loop=loop):
        loop.call_soon_threadsafe(out.put_nowait, (kind, payload))
      try:
        run = make_run(self.engine, on_event)
        self._wim_runs[out] = (run, loop, pages)
        run.start()
      except Exception as e:  # e.g. a prompt over the context length: the document fails, not the server
        logging.exception("WiM document refused")
        self._wim_runs.pop(out, None)
        loop.call_soon_threadsafe(out.put_nowait, ("error", str(e)))
        with self._lock:
          self._outstanding -= 1

  def _handle(self, item, by_queue) -> None:
    if item[0] == "wim":
      _, make_run, out, loop, tokens = item
      self._wim_waiting.append((make_run, out, loop, -(-tokens // self.engine.kv.allocator.page_size)))
      self._start_waiting_wim()
      return
    if item[0] == "cancel_wim":
      waiting = [w for w in self._wim_waiting if w[1] is item[1]]
      for w in waiting:  # its client left before it started
        self._wim_waiting.remove(w)
        with self._lock:
          self._outstanding -= 1
      entry = self._wim_runs.get(item[1])
      if entry is not None and not entry[0].done:
        entry[0].cancel()
      self._retire_wim_runs()
      return
    if item[0] == "add":
      _, prompt, params, out, loop = item

      def on_token(request, token, out=out, loop=loop):
        self.counters["generated_tokens_total"] += 1
        loop.call_soon_threadsafe(out.put_nowait, ("token", token))
      request = self.engine.add_request(prompt, params, on_token=on_token)
      request.out_queue = out
      by_queue[id(request)] = (out, loop)
    else:
      for request in self.engine.requests.values():
        if getattr(request, "out_queue", None) is item[1]:
          self.engine.cancel(request.id)

  def drain(self, timeout: float = 60.0) -> None:
    """Refuses new requests, waits for the outstanding ones, stops the thread."""
    with self._lock:
      self.accepting = False
    deadline = time.monotonic() + timeout
    while self._outstanding and time.monotonic() < deadline:
      time.sleep(0.02)
    self._stop.set()
    self._thread.join(timeout=5)


class CompletionRequest(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="ignore")
  model: str
  prompt: str | list[int]
  max_tokens: int = pydantic.Field(16, ge=1)
  temperature: float = pydantic.Field(1.0, ge=0.0, le=100.0)
  top_p: float = pydantic.Field(1.0, gt=0.0, le=1.0)
  top_k: int = pydantic.Field(0, ge=0)
  n: int = pydantic.Field(1, ge=1, le=16)
  stop: str | list[str] | None = None
  seed: int | None = None
  stream: bool = False


WIM_EXTRACTION = ('\n\nGiven the above context, extract all information relevant to the query: "{query}". '
                  'If the context is not relevant, answer "I don\'t know."\n')
WIM_CLASSIFICATION = ('Query: "{query}"\nInformation: {margin}\n'
                      'Is the information relevant to the query? Answer YES or NO.\n')
WIM_ANSWER = "\n\nRelevant information:\n{margins}\n\nQuery: {query}\nAnswer:"


class WiMBody(pydantic.BaseModel):
  """A long context read with margins (the paper's prompts by default; `{query}`, `{margin}`, `{margins}`)."""
  model_config = pydantic.ConfigDict(extra="ignore")
  model: str
  context: str = pydantic.Field(min_length=1)
  query: str = pydantic.Field(min_length=1)
  segment_tokens: int = pydantic.Field(256, ge=1)
  max_margin_tokens: int = pydantic.Field(64, ge=1)
  max_tokens: int = pydantic.Field(64, ge=1)
  temperature: float = pydantic.Field(0.0, ge=0.0, le=100.0)
  extraction_template: str = pydantic.Field(WIM_EXTRACTION, pattern=r"\{query\}")
  classification_template: str = pydantic.Field(WIM_CLASSIFICATION, pattern=r"\{margin\}")
  answer_template: str = pydantic.Field(WIM_ANSWER, pattern=r"\{margins\}")
  relevant_prefix: str = pydantic.Field("YES", min_length=1)
  stream: bool = True


class ChatMessage(pydantic.BaseModel):
  role: str = pydantic.Field(pattern="^(system|user|assistant)$")
  content: str


class ChatRequest(CompletionRequest):
  prompt: str | list[int] = ""
  messages: list[ChatMessage] = pydantic.Field(min_length=1)


def chat_prompt(messages: list[ChatMessage]) -> str:
  """A plain chat template: one `<|role|>` header per message, then the assistant's turn."""
  return "".join(f"<|{m.role}|>\n{m.content}\n" for m in messages) + "<|assistant|>\n"


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
  kind = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error"}.get(status, "server_error")
  return JSONResponse({"error": {"message": message, "type": kind, "param": param}}, status_code=status)


def create_app(engine: Engine, tokenizer, *, model_name: str, max_queued: int = 256) -> fastapi.FastAPI:
  """The app; the engine thread starts now and drains when the app shuts down."""
  worker = EngineThread(engine, max_queued=max_queued)
  app = fastapi.FastAPI(title="lwjax", on_shutdown=[worker.drain])
  app.state.worker = worker

  @app.exception_handler(RequestValidationError)
  async def invalid(_, exc: RequestValidationError):
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"] if p != "body")
    return _error(400, f"{param}: {first['msg']}", param)

  @app.exception_handler(fastapi.HTTPException)
  async def http_error(_, exc: fastapi.HTTPException):
    return _error(exc.status_code, str(exc.detail))

  def encode(prompt) -> list[int]:
    if isinstance(prompt, list):
      if any(not 0 <= t < engine.vocab_size for t in prompt):
        raise _Invalid("prompt", f"token ids must be in [0, {engine.vocab_size})")
      return prompt
    ids = tokenizer.encode(prompt)
    return ([tokenizer.bos_id] if tokenizer.bos_id is not None else []) + ids

  def sampling(req: CompletionRequest, prompt_len: int) -> SamplingParams:
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    try:
      params = SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, top_k=req.top_k,
                              top_p=req.top_p, seed=req.seed, stop=stop)
    except ValueError as e:
      raise _Invalid(str(e).split(":")[0], str(e)) from None
    if prompt_len + req.max_tokens > engine.max_model_len:
      raise _Invalid("prompt", f"{prompt_len} prompt tokens + max_tokens {req.max_tokens} exceed the context "
                     f"length {engine.max_model_len}")
    return params

  async def generate(req: CompletionRequest, prompt, chat: bool):
    if req.model != model_name:
      return _error(404, f"model {req.model!r} not found (valid: {model_name!r})", "model")
    try:
      ids = encode(prompt)
      params = sampling(req, len(ids))
    except _Invalid as e:
      return _error(400, e.message, e.param)
    loop = asyncio.get_running_loop()
    queues = [worker.submit(ids, _seeded(params, req.seed, i), loop) for i in range(req.n)]
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    if req.stream:
      return StreamingResponse(_stream(worker, queues, rid, req, chat, tokenizer), media_type="text/event-stream")
    requests = [await _drain(q) for q in queues]
    choices = [_choice(i, _final_text(r, tokenizer), r.finish_reason, chat) for i, r in enumerate(requests)]
    usage = {"prompt_tokens": len(ids), "completion_tokens": sum(len(r.output) for r in requests)}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model_name, "choices": choices, "usage": {**usage, "total_tokens": sum(usage.values())}}

  @app.post("/v1/completions")
  async def completions(req: CompletionRequest):
    return await generate(req, req.prompt, chat=False)

  @app.post("/v1/chat/completions")
  async def chat_completions(req: ChatRequest):
    return await generate(req, chat_prompt(req.messages), chat=True)

  @app.post("/v1/wim")
  async def writing_in_the_margins(req: WiMBody):
    if req.model != model_name:
      return _error(404, f"model {req.model!r} not found (valid: {model_name!r})", "model")
    if getattr(engine, "hybrid", False):
      return _error(400, "a hybrid (Mamba) model cannot cut its state back to a segment's end", "model")
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    context = bos + tokenizer.encode(req.context)
    segments = [context[i:i + req.segment_tokens] for i in range(0, len(context), req.segment_tokens)]
    prompts = wim.WiMPrompts(
        extraction=lambda query: tokenizer.encode(req.extraction_template.format(query=query)),
        classification=lambda query, margin: bos + tokenizer.encode(
            req.classification_template.format(query=query, margin=tokenizer.decode(margin))),
        answer=lambda query, margins: tokenizer.encode(req.answer_template.format(
            query=query, margins="\n".join(tokenizer.decode(m) for m in margins))),
        is_relevant=lambda output: tokenizer.decode(output).strip().upper().startswith(req.relevant_prefix.upper()))
    longest = len(context) + len(prompts.answer(req.query, [[0] * req.max_margin_tokens] * len(segments)))
    if longest + req.max_tokens > engine.max_model_len:
      return _error(400, f"context: {len(context)} tokens, with the margins and the answer up to {longest} + "
                    f"max_tokens {req.max_tokens}, exceed the context length {engine.max_model_len}", "context")
    sample = {"temperature": req.temperature}
    margin_p = SamplingParams(max_tokens=req.max_margin_tokens, **sample)
    classify_p = SamplingParams(max_tokens=4, temperature=0.0)
    answer_p = SamplingParams(max_tokens=req.max_tokens, **sample)

    def make_run(eng, on_event):
      return wim.WiMRequest(eng, segments, req.query, prompts, margin_params=margin_p, classify_params=classify_p,
                            answer_params=answer_p, on_event=on_event)
    out = worker.submit_wim(make_run, len(context), asyncio.get_running_loop(), longest + req.max_tokens)
    rid = f"wim-{uuid.uuid4().hex[:24]}"

    def margin_event(m):
      return {"id": rid, "object": "wim.margin", "segment": m.segment, "text": tokenizer.decode(m.tokens),
              "relevant": m.relevant}
    if req.stream:
      return StreamingResponse(_stream_wim(worker, out, rid, margin_event, tokenizer),
                               media_type="text/event-stream")
    margins, answer = [], None
    while True:
      kind, value = await out.get()
      if kind == "margin":
        margins.append(margin_event(value))
      elif kind == "answer":
        answer = tokenizer.decode(value)
      elif kind == "error":
        return _error(400, value, "context")
      elif kind == "done":
        return {"id": rid, "object": "wim", "model": model_name, "segments": len(segments), "margins": margins,
                "answer": answer, "usage": {"prompt_tokens": value.stats.prefill_tokens,
                                            "completion_tokens": value.stats.decode_tokens}}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "lwjax"}]}

  @app.get("/health")
  async def health():
    return {"status": "ok" if worker.accepting else "draining", "outstanding": worker.outstanding}

  @app.get("/metrics")
  async def metrics():
    lines = [f"lwjax_{k} {v}" for k, v in worker.counters.items()]
    lines += [f"lwjax_requests_outstanding {worker.outstanding}",
              f"lwjax_kv_pages_free {engine.kv.allocator.num_free}",
              f"lwjax_preemptions_total {engine.scheduler.num_preemptions}",
              f"lwjax_prefix_hit_tokens_total {engine.scheduler.num_prefix_hit_tokens}"]
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

  return app


class _Invalid(Exception):
  def __init__(self, param: str, message: str):
    super().__init__(message)
    self.param, self.message = param, message


def _seeded(params: SamplingParams, seed: int | None, i: int) -> SamplingParams:
  return dataclasses.replace(params, seed=None if seed is None else seed + i)


def _final_text(request, tokenizer) -> str:
  """The request's text: cut at a stop string by the engine, else the detokenized output."""
  return request.text if request.text or not request.output else tokenizer.decode(request.output)


async def _drain(q: asyncio.Queue):
  while True:
    kind, value = await q.get()
    if kind == "done":
      return value


def _choice(index: int, text: str, finish_reason: str | None, chat: bool) -> dict:
  body = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
  return {"index": index, **body, "finish_reason": finish_reason}


async def _stream(worker: EngineThread, queues, rid: str, req, chat: bool, tokenizer):
  """SSE events: one per new text piece of each choice, then the finish reasons, then [DONE].

  Text that could still turn into a stop string is held back until it cannot, so a stream never
  shows text that the final, stop-truncated answer does not have.
  """
  stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
  holdback = max((len(s) for s in stops), default=1) - 1
  obj = "chat.completion.chunk" if chat else "text_completion"
  pending = {i: q for i, q in enumerate(queues)}
  emitted = {i: "" for i in pending}
  tokens = {i: [] for i in pending}
  try:
    while pending:
      getters = {asyncio.ensure_future(q.get()): i for i, q in pending.items()}
      done, rest = await asyncio.wait(getters, return_when=asyncio.FIRST_COMPLETED)
      for fut in rest:
        fut.cancel()
      for fut in done:
        i = getters[fut]
        kind, value = fut.result()
        if kind == "token":
          tokens[i].append(value)
          # A trailing replacement character may be the start of a multi-byte character: hold it back.
          text = tokenizer.decode(tokens[i]).rstrip("\ufffd")
          safe = "" if any(s in text for s in stops) else text[len(emitted[i]):len(text) - holdback]
          piece, finish = safe, None
          if not piece:
            continue
        else:
          del pending[i]
          piece, finish = _final_text(value, tokenizer)[len(emitted[i]):], value.finish_reason
        emitted[i] += piece
        delta = {"delta": {"content": piece}} if chat else {"text": piece}
        chunk = {"id": rid, "object": obj, "created": int(time.time()), "model": req.model,
                 "choices": [{"index": i, **delta, "finish_reason": finish}]}
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"
  finally:
    for q in pending.values():  # the client went away: stop generating for it
      worker.cancel(q)


async def _stream_wim(worker: EngineThread, out: asyncio.Queue, rid: str, margin_event, tokenizer):
  """SSE events of a WiM document: each margin (in segment order, with its relevance), then the answer, then
  [DONE]. A client that closes the stream early (its question answered by a margin) cancels the document."""
  finished = False
  try:
    while True:
      kind, value = await out.get()
      if kind == "margin":
        yield f"data: {json.dumps(margin_event(value))}\n\n"
      elif kind == "answer":
        yield f"data: {json.dumps({'id': rid, 'object': 'wim.answer', 'text': tokenizer.decode(value)})}\n\n"
      elif kind == "error":
        yield f"data: {json.dumps({'id': rid, 'object': 'error', 'message': value})}\n\n"
        finished = True
        break
      elif kind == "done":
        finished = True
        break
    yield "data: [DONE]\n\n"
  finally:
    if not finished:
      worker.cancel_wim(out)
