"""OpenAI-compatible HTTP API over the engine (NanoFlow §4 serving front end), on FastAPI.

`/v1/completions`, `/v1/chat/completions` (both with SSE streaming; a chat is rendered by the tokenizer's chat
template when it has one, a Hugging Face tokenizer's, else by `chat_prompt`), `/v1/wim` (Writing in the Margins
over a long context: each margin and its relevance streamed as an event while the context is still being read;
the client exits early by closing the stream), `/v1/models`, `/health` and Prometheus `/metrics`. The engine
runs in one background thread (`EngineThread`); request handlers talk to it through a submission queue and
per-request asyncio queues, so the event loop never blocks on the device. Bad input gets a 400 naming the
field, a full queue a 429, an unknown model a 404; on shutdown new requests get 503 while the running ones
drain.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hmac
import json
import logging
import queue
import threading
import time
import uuid
from typing import Annotated, Any

import fastapi
import pydantic
import uvicorn
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lwjax.data.chat_template import ChatTemplateError
from lwjax.serving import wim
from lwjax.serving.engine import Engine
from lwjax.serving.logits_processors import MAX_ABS_LOGIT_BIAS, MAX_ABS_PENALTY, MAX_LOGIT_BIAS
from lwjax.serving.metrics import ServerMetrics
from lwjax.serving.sampling import MAX_TOP_LOGPROBS, SamplingParams
from lwjax.serving.scheduler import RequestError
from lwjax.serving.templates import PromptTemplate, TemplateError


class EngineThread:
  """Owns the engine: submissions, cancellations and iterations all happen on its thread.

  Every admitted unit (a request, or a WiM document) is answered exactly once: its queue gets ("done", request)
  (a failed request carries its `RequestError`), or ("error", RequestError) then ("done", None) when it was refused
  or aborted; a WiM document gets its events, then ("done", run). Nothing one request does can stop the thread: a
  refused submission, a failed iteration or a callback that raises ends that request alone. At shutdown, what is
  still running past the deadline is answered 503 from the draining thread, even while the engine thread is busy
  (compiling a new shape, say).
  """

  def __init__(self, engine: Engine, *, max_queued: int, drain_seconds: float = 30.0, model_name: str = "lwjax"):
    self.engine, self.max_queued, self.drain_seconds = engine, max_queued, drain_seconds
    self.metrics = ServerMetrics(model_name)
    self._model_name = model_name  # the metrics label
    self._inbox: queue.Queue = queue.Queue()
    self._lock = threading.Lock()
    self._unanswered: dict[int, tuple] = {}  # id(out queue) -> (out, loop): admitted, not answered yet
    self.accepting = True
    self._admitted_at: dict[int, float] = {}  # id(out queue) -> when it was admitted (latency metrics)
    # The engine thread's own books.
    self._requests: dict[int, asyncio.Queue] = {}  # id(request) -> its out queue (ordinary requests)
    self._by_out: dict[int, Any] = {}  # id(out queue) -> its request, for cancellation
    self._wim_runs: dict[int, tuple] = {}  # id(out queue) -> (WiM document, out, its event loop, pages reserved)
    # WiM documents not started yet: (make_run, out queue, event loop, pages). A document keeps its context's
    # pages between its turns, so the documents started at once must leave pages for their turns: more than the
    # pool holds would leave nothing running that frees any.
    self._wim_waiting: collections.deque = collections.deque()
    self._stop = threading.Event()
    self._drain_lock = threading.Lock()
    self._thread = threading.Thread(target=self._loop, name="lwjax-engine", daemon=True)
    self._thread.start()

  @property
  def _pool(self):
    """One replica's KV page allocator (every replica's is the same size; a WiM document's turns that share its
    context run on one replica)."""
    return self.engine.replicas[0].kv.allocator

  @property
  def outstanding(self) -> int:
    return len(self._unanswered)

  def _admit(self, prompt_tokens: int, outs: list, loop) -> None:
    """`prompt_tokens`: of all `outs` together."""
    """Registers `outs` as outstanding (all or none), or refuses: 503 while draining, 429 past max_queued (with
    Retry-After, as OpenAI and vLLM do)."""
    with self._lock:
      if not self.accepting:
        raise fastapi.HTTPException(503, "server is shutting down", headers={"Retry-After": "5"})
      if len(self._unanswered) + len(outs) > self.max_queued:
        self.metrics.rejected.labels(self._model_name).inc()
        raise fastapi.HTTPException(429, f"queue full ({len(self._unanswered)} of {self.max_queued} requests "
                                    "outstanding); retry later", headers={"Retry-After": "1"})
      for out in outs:
        self._unanswered[id(out)] = (out, loop)
        self._admitted_at[id(out)] = time.monotonic()
    self.metrics.requests.labels(self._model_name).inc(len(outs))
    self.metrics.prompt_tokens.labels(self._model_name).inc(prompt_tokens)

  def _answer(self, out: asyncio.Queue, *items, failed: bool = False) -> bool:
    """Posts the last `items` of `out`'s unit and counts it answered; False (nothing posted) if it already was."""
    with self._lock:
      entry = self._unanswered.pop(id(out), None)
      if entry is None:
        return False
      admitted = self._admitted_at.pop(id(out), None)
    if failed:
      self.metrics.failed.labels(self._model_name).inc()
    else:
      if admitted is not None:
        self.metrics.e2e.labels(self._model_name).observe(time.monotonic() - admitted)
      ends = [value for kind, value in items if kind == "done" and value is not None]
      reason = getattr(ends[0], "finish_reason", None) if ends else None
      self.metrics.success.labels(self._model_name, reason or "stop").inc()
    for item in items:
      _post(entry[1], out, item)
    return True

  def submit(self, prompt: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
    """Queues a request; its tokens, then ("done", request) arrive on the returned asyncio queue."""
    return self.submit_many([(prompt, params)], loop)[0]

  def submit_many(self, requests: list[tuple[list[int], SamplingParams]], loop) -> list[asyncio.Queue]:
    """Queues requests admitted together (the n choices of one API call): all of them, or a 429 for all."""
    queues = [asyncio.Queue() for _ in requests]
    self._admit(sum(len(prompt) for prompt, _ in requests), queues, loop)
    for (prompt, params), out in zip(requests, queues, strict=True):
      self._inbox.put(("add", prompt, params, out, loop))
    return queues

  def cancel(self, out: asyncio.Queue) -> None:
    self._inbox.put(("cancel", out))

  def cancel_wim(self, out: asyncio.Queue) -> None:
    """Stops the WiM document whose events go to `out` (its client left); its pages are freed."""
    self._inbox.put(("cancel_wim", out))

  def submit_wim(self, make_run, prompt_tokens: int, loop: asyncio.AbstractEventLoop,
                 reserve_tokens: int | None = None) -> asyncio.Queue:
    """Queues a WiM document: `make_run(engine, on_event)` builds its `wim.WiMRequest` on the engine thread;
    ("margin", Margin), ("answer", tokens), ("exit", margin), ("error", RequestError) and finally ("done", run)
    arrive on the queue.

    The document starts once the pages of `reserve_tokens` (its longest request; default its context) fit, with
    those of the documents already started, in half the pool (the rest is for their turns), or at once when no
    other document runs; until then it waits, in arrival order."""
    out: asyncio.Queue = asyncio.Queue()
    self._admit(prompt_tokens, [out], loop)
    self._inbox.put(("wim", make_run, out, loop, reserve_tokens or prompt_tokens))
    return out

  def leaks(self, timeout: float = 30.0) -> list[str]:
    """What the server still holds (checked on the engine thread between iterations): unanswered requests, WiM
    documents, and the engine's `leaks()`. Empty once every request has finished or failed."""
    result: list[str] = []
    checked = threading.Event()
    self._inbox.put(("check", result, checked))
    if not checked.wait(timeout):
      return ["the engine thread did not answer"]
    return result

  # -- the engine thread --

  def _loop(self) -> None:
    while not self._stop.is_set():
      try:
        self._iterate()
      except Exception:  # noqa: BLE001 - a bug here must not leave every client hanging
        error_id = uuid.uuid4().hex[:12]
        logging.exception("engine thread: unexpected failure (error id %s); failing every request", error_id)
        try:
          self._abort_all(500, f"internal error (error id {error_id})", error_id)
        except Exception:  # noqa: BLE001
          logging.exception("engine thread: failing the requests failed too (error id %s)", error_id)
          self._answer_all(RequestError(500, f"internal error (error id {error_id})", error_id))
          time.sleep(0.1)  # no tight loop of failures

  def _iterate(self) -> None:
    block = not self.engine.has_work()
    try:
      while True:
        item = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        block = False
        self._handle(item)
    except queue.Empty:
      pass
    if self.engine.has_work():
      self._deliver(self.engine.step())
    self._retire_wim_runs()

  def _deliver(self, finished) -> None:
    for request in finished:
      out = self._requests.pop(id(request), None)
      if out is None:  # a turn of a WiM document: its events go through the document
        continue
      self._by_out.pop(id(out), None)
      self._answer(out, ("done", request), failed=request.error is not None)

  def _retire_wim_runs(self) -> None:
    for key in [k for k, (run, *_) in self._wim_runs.items() if run.done]:
      run, out, _, _ = self._wim_runs.pop(key)
      self._answer(out, ("done", run), failed=run.error is not None)
    self._start_waiting_wim()

  def _start_waiting_wim(self) -> None:
    budget = self._pool.num_pages // 2
    while self._wim_waiting:
      make_run, out, loop, pages = self._wim_waiting[0]
      reserved = sum(entry[3] for entry in self._wim_runs.values())
      if self._wim_runs and reserved + pages > budget:
        return
      self._wim_waiting.popleft()

      def on_event(kind, payload, out=out, loop=loop):
        _post(loop, out, (kind, payload))
      try:
        run = make_run(self.engine, on_event)
        self._wim_runs[id(out)] = (run, out, loop, pages)
        run.start()
      except Exception as e:  # noqa: BLE001 - e.g. a turn over the context length: the document fails, not the server
        error_id = uuid.uuid4().hex[:12]
        logging.exception("WiM document refused (error id %s)", error_id)
        entry = self._wim_runs.pop(id(out), None)
        if entry is not None:
          entry[0].cancel()  # whatever it submitted
        status = 400 if isinstance(e, ValueError) else 500
        self._answer(out, ("error", RequestError(status, str(e), error_id)), ("done", None), failed=True)

  def _handle(self, item) -> None:
    kind = item[0]
    if kind == "add":
      _, prompt, params, out, loop = item
      if id(out) not in self._unanswered:  # answered already (aborted at shutdown)
        return

      last = [self._admitted_at.get(id(out), time.monotonic()), True]  # (time of the last event, first token?)

      def on_token(request, token, out=out, loop=loop, last=last):
        now = time.monotonic()
        (self.metrics.ttft if last[1] else self.metrics.itl).labels(self._model_name).observe(now - last[0])
        last[0], last[1] = now, False
        self.metrics.generation_tokens.labels(self._model_name).inc()
        _post(loop, out, ("token", (token, request.logprobs[-1] if request.params.logprobs is not None else None)))
      try:
        request = self.engine.add_request(prompt, params, on_token=on_token)
      except Exception as e:  # noqa: BLE001 - what validation missed: this request fails, alone
        error_id = uuid.uuid4().hex[:12]
        logging.warning("request refused by the engine (error id %s): %s", error_id, e)
        status = 400 if isinstance(e, ValueError) else 500
        self._answer(out, ("error", RequestError(status, str(e), error_id)), failed=True)
        return
      self._requests[id(request)] = out
      self._by_out[id(out)] = request
    elif kind == "cancel":
      request = self._by_out.get(id(item[1]))
      if request is not None:
        self.engine.cancel(request.id)
    elif kind == "wim":
      _, make_run, out, loop, tokens = item
      if id(out) in self._unanswered:
        self._wim_waiting.append((make_run, out, loop, -(-tokens // self._pool.page_size)))
        self._start_waiting_wim()
    elif kind == "cancel_wim":
      for waiting in [w for w in self._wim_waiting if w[1] is item[1]]:  # its client left before it started
        self._wim_waiting.remove(waiting)
        self._answer(waiting[1], ("done", None))
      entry = self._wim_runs.get(id(item[1]))
      if entry is not None and not entry[0].done:
        entry[0].cancel()
      self._retire_wim_runs()
    elif kind == "abort":
      self._abort_all(*item[1:])
    elif kind == "check":
      _, result, checked = item
      result += self._leaks()
      checked.set()

  def _leaks(self) -> list[str]:
    problems = []
    if self._unanswered:
      problems.append(f"{len(self._unanswered)} requests not answered")
    if self._requests or self._by_out:
      problems.append(f"{len(self._requests)} requests awaiting delivery")
    if self._wim_runs or self._wim_waiting:
      problems.append(f"WiM documents: {len(self._wim_runs)} running, {len(self._wim_waiting)} waiting")
    return problems + self.engine.leaks()

  def _abort_all(self, status: int, message: str, error_id: str = "") -> None:
    """Fails every request and document now, on the engine thread (shutdown past its deadline, or a failure of
    this thread): their pages freed, their clients answered if they were not already."""
    error = RequestError(status, message, error_id)
    for run, *_ in list(self._wim_runs.values()):
      run.fail(error)
    while self._wim_waiting:
      _, out, _, _ = self._wim_waiting.popleft()
      self._answer(out, ("error", error), ("done", None), failed=True)
    for request in list(self.engine.requests.values()):
      self.engine.fail_request(request, status, message, error_id)
    self.engine.run_until_done()  # the cancellations the failed documents made
    self._deliver([r for r in list(self._by_out.values())])
    self._retire_wim_runs()
    self._answer_all(error)

  def _answer_all(self, error: RequestError) -> None:
    """Answers every unanswered unit with `error` (from any thread)."""
    with self._lock:
      outs = [out for out, _ in self._unanswered.values()]
    for out in outs:
      self._answer(out, ("error", error), ("done", None), failed=True)

  def drain(self, timeout: float | None = None) -> None:
    """Refuses new requests (503), lets the outstanding ones finish until the deadline (`drain_seconds`), answers
    what is left with 503 at once (the engine thread frees their pages when it next can), and stops the thread.
    Safe to call more than once (a signal and the app's shutdown)."""
    with self._drain_lock:
      if self._stop.is_set():
        return
      with self._lock:
        self.accepting = False
      deadline = time.monotonic() + (self.drain_seconds if timeout is None else timeout)
      while self._unanswered and time.monotonic() < deadline and self._thread.is_alive():
        time.sleep(0.02)
      if self._unanswered:
        logging.warning("shutdown: %d requests still running at the drain deadline; answering them 503",
                        len(self._unanswered))
        message = "the server shut down before the request finished"
        self._inbox.put(("abort", 503, message))
        self._answer_all(RequestError(503, message))
        until = time.monotonic() + 2  # let the engine thread free what it held, if it is not busy
        while self._thread.is_alive() and time.monotonic() < until and not self._inbox.empty():
          time.sleep(0.02)
      self._stop.set()
      self._thread.join(timeout=5)
      if not self._thread.is_alive():  # the engine is ours now: free what the last requests held
        self._abort_all(503, "the server shut down before the request finished")


def _post(loop: asyncio.AbstractEventLoop, out: asyncio.Queue, item) -> None:
  """Puts `item` on an asyncio queue from the engine thread; a loop already closed (its client gone with the
  app) drops it."""
  with contextlib.suppress(RuntimeError):
    loop.call_soon_threadsafe(out.put_nowait, item)


class StreamOptions(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="forbid")
  include_usage: bool = False


class _Generation(pydantic.BaseModel):
  """The sampling fields completions and chat share (OpenAI's, with vLLM's `top_k`, `ignore_eos`,
  `repetition_penalty`, `min_tokens` and `stop_token_ids`). Fields
  OpenAI defines that this server does not implement yet are declared, so that setting one is a 400 naming it
  (`_unsupported`) rather than silently ignored; unknown fields are refused the same way unless the server runs
  with `server.ignore_unknown_fields` (`model_extra`)."""
  model_config = pydantic.ConfigDict(extra="allow")
  model: str
  temperature: float = pydantic.Field(1.0, ge=0.0, le=100.0)
  top_p: float = pydantic.Field(1.0, gt=0.0, le=1.0)
  top_k: int = pydantic.Field(0, ge=0)
  n: int = pydantic.Field(1, ge=1, le=16)
  stop: str | list[str] | None = None
  seed: int | None = None
  stream: bool = False
  stream_options: StreamOptions | None = None
  ignore_eos: bool = False
  user: str | None = pydantic.Field(None, description="accepted; no effect (OpenAI uses it for abuse monitoring)")
  presence_penalty: float = pydantic.Field(
      0.0, ge=-MAX_ABS_PENALTY, le=MAX_ABS_PENALTY, allow_inf_nan=False,
      description="subtracted from the logit of each token the output holds already")
  frequency_penalty: float = pydantic.Field(
      0.0, ge=-MAX_ABS_PENALTY, le=MAX_ABS_PENALTY, allow_inf_nan=False,
      description="times its count in the output so far, subtracted from each token's logit")
  repetition_penalty: float = pydantic.Field(
      1.0, gt=0.0, allow_inf_nan=False,
      description="a token of the prompt or the output: a positive logit divided by it, a negative one multiplied")
  logit_bias: dict[str, Annotated[float, pydantic.Field(ge=-MAX_ABS_LOGIT_BIAS, le=MAX_ABS_LOGIT_BIAS,
                                                        allow_inf_nan=False)]] | None = pydantic.Field(
      None, max_length=MAX_LOGIT_BIAS, description="{token id: bias added to its logit before sampling}")
  min_tokens: int = pydantic.Field(0, ge=0, description="no stop token or string ends the output before this many")
  stop_token_ids: list[Annotated[int, pydantic.Field(ge=0)]] | None = pydantic.Field(
      None, description="token ids that end the output, beside the tokenizer's EOS ids")


class CompletionRequest(_Generation):
  prompt: str | list[str] | list[int] | list[list[int]] = pydantic.Field(
      description="a string, a list of strings, a list of token ids, or a list of token-id lists (one choice per "
                  "prompt and n, indexed prompt-major)")
  max_tokens: int = pydantic.Field(16, ge=0, description="0 (with echo): score the prompt, generate nothing")
  logprobs: int | None = pydantic.Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                        description="each token's logprob and this many top alternatives")
  echo: bool = pydantic.Field(False, description="the prompt before the completion, in the text and the logprobs")
  best_of: int | None = pydantic.Field(None, description="only unset or equal to n")
  suffix: str | None = pydantic.Field(None, description="refused: no insertion mode")


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
  model_config = pydantic.ConfigDict(extra="forbid")
  role: str = pydantic.Field(pattern="^(system|user|assistant)$",
                             description="system, user or assistant (the chat template has no tool or developer turn)")
  content: str
  name: str | None = None


class ChatRequest(_Generation):
  messages: list[ChatMessage] = pydantic.Field(min_length=1)
  max_tokens: int | None = pydantic.Field(None, ge=1)
  max_completion_tokens: int | None = pydantic.Field(None, ge=1, description="max_tokens under its newer name")
  logprobs: bool = False
  top_logprobs: int | None = pydantic.Field(None, ge=0, le=MAX_TOP_LOGPROBS)
  tools: list | None = pydantic.Field(None, description="refused: no tool calling")
  tool_choice: Any = pydantic.Field(None, description="refused: no tool calling")
  response_format: dict | None = pydantic.Field(None, description="refused: no constrained decoding")

  @property
  def max_new_tokens(self) -> int:
    return self.max_completion_tokens or self.max_tokens or 16


def chat_prompt(messages: list[ChatMessage]) -> str:
  """A plain chat template: one `<|role|>` header per message, then the assistant's turn."""
  return "".join(f"<|{m.role}|>\n{m.content}\n" for m in messages) + "<|assistant|>\n"


def has_chat_template(tokenizer) -> bool:
  return getattr(tokenizer, "chat_template", None) is not None


def chat_text(tokenizer, messages: list[ChatMessage]) -> str:
  """The chat's prompt text: the tokenizer's chat template with the generation prompt (the template writes BOS
  and the special tokens itself), or `chat_prompt` for a tokenizer without one. A template that refuses the
  conversation raises `ChatTemplateError`."""
  if has_chat_template(tokenizer):
    return tokenizer.apply_chat_template([m.model_dump(exclude_none=True) for m in messages],
                                         add_generation_prompt=True)
  return chat_prompt(messages)


def _error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
  return JSONResponse({"error": _error_body(status, message, param)}, status_code=status, headers=headers)


def _error_body(status: int, message: str, param: str | None = None) -> dict:
  kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
          503: "service_unavailable"}.get(status, "server_error")
  return {"message": message, "type": kind, "param": param, "code": status}


def _request_error(error: RequestError) -> JSONResponse:
  param = error.message.split(":")[0] if error.status == 400 and ":" in error.message else None
  return _error(error.status, error.message, param if param and param.isidentifier() else None)


def create_app(engine: Engine, tokenizer, *, model_name: str, max_queued: int = 256, drain_seconds: float = 30.0,
               ignore_unknown_fields: bool = False, api_key: str | None = None) -> fastapi.FastAPI:
  """The app; the engine thread starts now and drains when the app shuts down (`drain_seconds`: how long the
  running requests may take to finish before they are answered 503). A field the API does not know is a 400,
  or with `ignore_unknown_fields` (vLLM's behaviour) ignored and logged once per field name. With `api_key`,
  every endpoint but /health needs `Authorization: Bearer <api_key>` (401 otherwise)."""
  worker = EngineThread(engine, max_queued=max_queued, drain_seconds=drain_seconds, model_name=model_name)
  app = fastapi.FastAPI(title="lwjax", on_shutdown=[worker.drain])
  app.state.worker = worker

  if api_key:
    expected = api_key.encode()

    @app.middleware("http")
    async def require_api_key(http: fastapi.Request, call_next):
      if http.url.path != "/health":
        header = http.headers.get("authorization", "")
        given = header[len("bearer "):].strip() if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), expected):  # constant time
          return _error(401, "missing or wrong API key (send Authorization: Bearer <key>)",
                        headers={"WWW-Authenticate": "Bearer"})
      return await call_next(http)

  @app.exception_handler(RequestValidationError)
  async def invalid(_, exc: RequestValidationError):
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"] if p != "body")
    return _error(400, f"{param}: {first['msg']}" if param else first["msg"], param or None)

  @app.exception_handler(fastapi.HTTPException)
  async def http_error(_, exc: fastapi.HTTPException):
    return _error(exc.status_code, str(exc.detail), headers=exc.headers)

  ignored_fields: set[str] = set()

  def encode(prompt, add_bos: bool = True) -> list[int]:
    if isinstance(prompt, list):
      if any(not 0 <= t < engine.vocab_size for t in prompt):
        raise _Invalid("prompt", f"token ids must be in [0, {engine.vocab_size})")
      ids = prompt
    else:
      bos = [tokenizer.bos_id] if tokenizer.bos_id is not None and add_bos else []
      ids = bos + tokenizer.encode(prompt)
    if not ids:
      raise _Invalid("prompt", "empty: the prompt has no tokens (valid: a non-empty string or token list)")
    return ids

  def check_fields(req: _Generation, chat: bool) -> None:
    """400 for a field set to what this server does not do, or a field it does not know."""
    for field, message in _unsupported(req, chat):
      raise _Invalid(field, f"{field}: {message}")
    for field in req.model_extra or {}:
      if not ignore_unknown_fields:
        known = ", ".join(sorted(type(req).model_fields))
        raise _Invalid(field, f"{field}: unknown field (this server's fields: {known}; or start it with "
                       "server.ignore_unknown_fields=true to ignore unknown fields, as vLLM does)")
      if field not in ignored_fields:
        ignored_fields.add(field)
        logging.warning("ignoring the unknown request field %r (server.ignore_unknown_fields)", field)

  def sampling(req: _Generation, max_tokens: int, logprobs: int | None, prompts: list[list[int]]) -> SamplingParams:
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    try:
      params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                              seed=req.seed, stop=stop, ignore_eos=req.ignore_eos, logprobs=logprobs,
                              logit_bias=req.logit_bias or (), presence_penalty=req.presence_penalty,
                              frequency_penalty=req.frequency_penalty, repetition_penalty=req.repetition_penalty,
                              min_tokens=req.min_tokens, stop_token_ids=req.stop_token_ids or ())
      engine.check_params(params)
      for ids in prompts:
        engine.check_length(len(ids), max_tokens)
    except ValueError as e:
      raise _Invalid(str(e).split(":")[0], str(e)) from None
    return params

  async def generate(http: fastapi.Request, req: _Generation, chat: bool):
    if req.model != model_name:
      return _error(404, f"model {req.model!r} not found (valid: {model_name!r})", "model")
    try:
      check_fields(req, chat)
      texts = [chat_text(tokenizer, req.messages)] if chat else _prompt_list(req.prompt)
      prompts = [encode(p, add_bos=not (chat and has_chat_template(tokenizer))) for p in texts]
      max_tokens = req.max_new_tokens if chat else req.max_tokens
      logprobs = ((req.top_logprobs or 0) if req.logprobs else None) if chat else req.logprobs
      echo = not chat and req.echo
      # max_tokens 0 (scoring): the engine samples one token, dropped below.
      params = sampling(req, max(1, max_tokens), logprobs, prompts)
      if echo and logprobs is not None:
        params = dataclasses.replace(params, prompt_logprobs=logprobs)
    except _Invalid as e:
      return _error(400, e.message, e.param)
    except ChatTemplateError as e:
      return _error(400, f"messages: the model's chat template refused them: {e}", "messages")
    except UnicodeEncodeError as e:
      return _error(400, f"text is not valid Unicode (a lone surrogate at {e.start}): {e.reason}")
    loop = asyncio.get_running_loop()
    queues = worker.submit_many([(ids, _seeded(params, req.seed, i)) for ids in prompts for i in range(req.n)], loop)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    prompt_tokens = sum(len(ids) * req.n for ids in prompts)
    if req.stream:
      prompt_chars = [len(t if isinstance(t, str) else tokenizer.decode(t)) for t in texts for _ in range(req.n)]
      return StreamingResponse(_stream(worker, queues, rid, req, chat, tokenizer, prompt_tokens, prompt_chars),
                               media_type="text/event-stream")
    requests = await _unless_disconnected(http, asyncio.gather(*(_drain(q) for q in queues)))
    if requests is None:  # the client left: stop generating for it
      for q in queues:
        worker.cancel(q)
      return _error(499, "client closed the request")
    errors = [r for r in requests if isinstance(r, RequestError)] + [r.error for r in requests
                                                                       if not isinstance(r, RequestError) and r.error]
    if errors:
      return _request_error(errors[0])
    choices = []
    for k, r in enumerate(requests):
      if max_tokens == 0:
        r.output, r.logprobs, r.text, r.finish_reason = [], [], "", "length"
      text = _final_text(r, tokenizer)
      prompt = texts[k // req.n]
      prompt_text = prompt if isinstance(prompt, str) else tokenizer.decode(prompt)
      choice = _choice(k, prompt_text + text if echo else text, r.finish_reason, chat)
      if logprobs is not None:
        choice["logprobs"] = (_chat_logprobs(r.output, r.logprobs, tokenizer) if chat else _completion_logprobs(
            r, tokenizer, 0 if echo else len(prompt_text), prompts[k // req.n] if echo else None))
      choices.append(choice)
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": sum(len(r.output) for r in requests)}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model_name, "choices": choices, "usage": {**usage, "total_tokens": sum(usage.values())}}

  @app.post("/v1/completions")
  async def completions(req: CompletionRequest, http: fastapi.Request):
    return await generate(http, req, chat=False)

  @app.post("/v1/chat/completions")
  async def chat_completions(req: ChatRequest, http: fastapi.Request):
    return await generate(http, req, chat=True)

  @app.post("/v1/wim")
  async def writing_in_the_margins(req: WiMBody, http: fastapi.Request):
    if req.model != model_name:
      return _error(404, f"model {req.model!r} not found (valid: {model_name!r})", "model")
    if getattr(engine, "hybrid", False):
      return _error(400, "a hybrid (Mamba) model cannot cut its state back to a segment's end", "model")
    try:
      run_spec = _wim_document(req, engine, tokenizer)
    except TemplateError as e:
      return _error(400, str(e), e.field)
    except _Invalid as e:
      return _error(400, e.message, e.param)
    except UnicodeEncodeError as e:
      return _error(400, f"text is not valid Unicode (a lone surrogate at {e.start}): {e.reason}")
    segments, make_run, longest = run_spec
    out = worker.submit_wim(make_run, sum(map(len, segments)), asyncio.get_running_loop(), longest)
    rid = f"wim-{uuid.uuid4().hex[:24]}"

    def margin_event(m):
      return {"id": rid, "object": "wim.margin", "segment": m.segment, "text": tokenizer.decode(m.tokens),
              "relevant": m.relevant}
    if req.stream:
      return StreamingResponse(_stream_wim(worker, out, rid, margin_event, tokenizer),
                               media_type="text/event-stream")
    margins, answer, error = [], None, None

    async def read():
      nonlocal answer, error
      while True:
        kind, value = await out.get()
        if kind == "margin":
          margins.append(margin_event(value))
        elif kind == "answer":
          answer = tokenizer.decode(value)
        elif kind == "error":
          error = value
        elif kind == "done":
          return value or True
    run = await _unless_disconnected(http, read())
    if run is None:
      worker.cancel_wim(out)
      return _error(499, "client closed the request")
    if error is not None:
      return _request_error(error)
    return {"id": rid, "object": "wim", "model": model_name, "segments": len(segments), "margins": margins,
            "answer": answer, "usage": {"prompt_tokens": run.stats.prefill_tokens,
                                        "completion_tokens": run.stats.decode_tokens}}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "lwjax"}]}

  @app.get("/health")
  async def health():
    return {"status": "ok" if worker.accepting else "draining", "outstanding": worker.outstanding}

  @app.get("/metrics")
  async def metrics():
    body = worker.metrics.exposition(engine, worker.outstanding)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

  return app


class DrainingServer(uvicorn.Server):
  """uvicorn's server, whose SIGTERM (or first SIGINT) starts the engine's drain at once: new requests get 503,
  running ones finish until `drain_seconds`, the rest are answered 503. uvicorn waits for open connections before
  the app's shutdown runs, so without this a request that never finished kept the process alive."""

  def __init__(self, config: uvicorn.Config, worker: EngineThread):
    super().__init__(config)
    self.worker = worker

  def handle_exit(self, sig, frame) -> None:
    if not self.should_exit:
      threading.Thread(target=self.worker.drain, name="lwjax-drain", daemon=True).start()
    super().handle_exit(sig, frame)


def make_server(app: fastapi.FastAPI, *, host: str = "127.0.0.1", port: int = 8000,
                log_level: str = "info") -> DrainingServer:
  """The uvicorn server for `create_app`'s app; connections still open past the drain deadline (plus 5 s) are
  closed."""
  worker = app.state.worker
  config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          timeout_graceful_shutdown=int(worker.drain_seconds) + 5)
  return DrainingServer(config, worker)


CLASSIFY_MAX_TOKENS = 4  # a relevance request's answer ("YES" / "NO")


def _wim_document(req: WiMBody, engine: Engine, tokenizer):
  """(segments, make_run, tokens of the document's longest turn) for a WiM body, every check done: templates
  parsed with their real placeholders, and every turn the document will make (each margin turn, each relevance
  turn, the answer) within the context length and the KV pool, margins at their longest."""
  extraction = PromptTemplate(req.extraction_template, "extraction_template", text_fields=("query",),
                              required=("query",))
  classification = PromptTemplate(req.classification_template, "classification_template", text_fields=("query",),
                                  token_fields=("margin",), required=("margin",))
  answer = PromptTemplate(req.answer_template, "answer_template", text_fields=("query",), token_fields=("margins",),
                          required=("margins",))
  enc = tokenizer.encode
  bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
  context = bos + enc(req.context)
  if not context:
    raise _Invalid("context", "empty: the context has no tokens")
  segments = [context[i:i + req.segment_tokens] for i in range(0, len(context), req.segment_tokens)]
  query = {"query": req.query}
  separator = enc("\n")
  margin_max = req.max_margin_tokens
  turns = {  # (prompt tokens, max_tokens) of the longest turn of each kind
      "margin": (len(context) + extraction.length(enc, query), margin_max),
      "relevance": (len(bos) + classification.length(enc, query, {"margin": margin_max}), CLASSIFY_MAX_TOKENS),
      "answer": (len(context) + answer.length(
          enc, query, {"margins": len(segments) * margin_max + (len(segments) - 1) * len(separator)}), req.max_tokens),
  }
  for kind, (prompt_tokens, max_tokens) in turns.items():
    try:
      engine.check_length(prompt_tokens, max_tokens, field="context")
    except ValueError as e:
      raise _Invalid("context", f"{e} (the document's longest {kind} turn: context {len(context)} tokens, margins of "
                     f"up to max_margin_tokens {margin_max})") from None
  longest = max(p + m for p, m in turns.values())

  def margins_joined(margins):
    joined: list[int] = []
    for i, m in enumerate(margins):
      joined += (separator if i else []) + list(m)
    return joined
  prompts = wim.WiMPrompts(
      extraction=lambda q: extraction.render(enc, {"query": q}),
      classification=lambda q, margin: bos + classification.render(enc, {"query": q}, {"margin": margin}),
      answer=lambda q, margins: answer.render(enc, {"query": q}, {"margins": margins_joined(margins)}),
      is_relevant=lambda output: tokenizer.decode(output).strip().upper().startswith(req.relevant_prefix.upper()))
  sample = {"temperature": req.temperature}
  margin_p = SamplingParams(max_tokens=margin_max, **sample)
  classify_p = SamplingParams(max_tokens=CLASSIFY_MAX_TOKENS, temperature=0.0)
  answer_p = SamplingParams(max_tokens=req.max_tokens, **sample)

  def make_run(eng, on_event):
    return wim.WiMRequest(eng, segments, req.query, prompts, margin_params=margin_p, classify_params=classify_p,
                          answer_params=answer_p, on_event=on_event)
  return segments, make_run, longest


class _Invalid(Exception):
  def __init__(self, param: str, message: str):
    super().__init__(message)
    self.param, self.message = param, message


def _prompt_list(prompt) -> list:
  """A completion's prompts: a string or a token-id list is one prompt; a list of either, one each."""
  if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
    return [prompt]
  if not prompt:
    raise _Invalid("prompt", "prompt: empty (valid: a string, a list of strings, token ids or token-id lists)")
  return list(prompt)


def _unsupported(req: _Generation, chat: bool) -> list[tuple[str, str]]:
  """(field, why) for each field set to something this server does not do; empty when it does all of it."""
  problems = []
  if req.stream_options is not None and not req.stream:
    problems.append(("stream_options", "only with stream=true"))
  if chat:
    for field in ("tools", "tool_choice", "response_format"):
      if getattr(req, field) is not None:
        problems.append((field, "not supported by this server"))
    if req.top_logprobs is not None and not req.logprobs:
      problems.append(("top_logprobs", "needs logprobs=true"))
  else:
    if req.max_tokens == 0 and not req.echo:
      problems.append(("max_tokens", "0 only with echo=true (scoring the prompt)"))
    if req.echo and req.stream:
      problems.append(("echo", "not with stream=true yet"))
    if req.best_of not in (None, req.n):
      problems.append(("best_of", f"only unset or equal to n ({req.n})"))
    if req.suffix is not None:
      problems.append(("suffix", "no insertion mode: refused"))
  return problems


def _token_text(tokenizer, token: int) -> str:
  return tokenizer.decode([token])


MIN_REPORTED_LOGPROB = -9999.0  # a token the sampler masked (-inf) is reported as this, as vLLM does: JSON has no -inf


def _completion_logprobs(request, tokenizer, prompt_chars: int, prompt_ids: list[int] | None = None) -> dict:
  """OpenAI's completions `logprobs`: tokens, token_logprobs, top_logprobs ({token: logprob}) and text_offset
  (character offsets into prompt + completion). With `prompt_ids` (echo) the prompt's tokens come first, the
  first with no logprob (None), as OpenAI and vLLM give it."""
  entries = list(request.logprobs)
  ids = list(request.output)
  if prompt_ids is not None:
    ids = list(prompt_ids) + ids
    entries = [None] + [request.prompt_logprobs.get(p) for p in range(1, len(prompt_ids))] + entries
  return _completion_logprobs_of(ids, entries, tokenizer, prompt_chars)


def _completion_logprobs_of(ids: list[int], entries: list, tokenizer, first_offset: int) -> dict:
  """`_completion_logprobs` of tokens `ids` with their (logprob, top ids, top logprobs) entries (None: no logprob),
  the first token at character `first_offset`."""
  tokens = [_token_text(tokenizer, t) for t in ids]
  offsets, at = [], first_offset
  for text in tokens:
    offsets.append(at)
    at += len(text)
  return {"tokens": tokens, "token_logprobs": [e and _reported(e[0]) for e in entries],
          "top_logprobs": [e and {_token_text(tokenizer, i): _reported(v) for i, v in zip(e[1], e[2], strict=True)}
                           for e in entries],
          "text_offset": offsets}


def _chat_logprobs(ids: list[int], entries: list, tokenizer) -> dict:
  """OpenAI's chat `logprobs` of tokens `ids` with their (logprob, top ids, top logprobs) entries:
  {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
  def entry(token: int, logprob: float) -> dict:
    text = _token_text(tokenizer, token)
    return {"token": text, "logprob": _reported(logprob), "bytes": list(text.encode("utf-8"))}
  return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in zip(top_ids, values, strict=True)]}
                      for t, (lp, top_ids, values) in zip(ids, entries, strict=True)]}


def _reported(logprob: float) -> float:
  """A logprob JSON can carry: -inf (a masked token) and NaN (logits a tiny repetition_penalty overflowed) as the
  floor."""
  return logprob if logprob >= MIN_REPORTED_LOGPROB else MIN_REPORTED_LOGPROB


def _seeded(params: SamplingParams, seed: int | None, i: int) -> SamplingParams:
  return dataclasses.replace(params, seed=None if seed is None else seed + i)


def _final_text(request, tokenizer) -> str:
  """The request's text: the engine's (cut at a stop string, without a stop token), else the detokenized output."""
  if request.text or not request.output or request.finish_reason == "stop":
    return request.text
  return tokenizer.decode(request.output)


async def _drain(q: asyncio.Queue):
  """The request's end: the finished request, or the RequestError the engine refused it with."""
  while True:
    kind, value = await q.get()
    if kind in ("done", "error"):
      return value


async def _unless_disconnected(http: fastapi.Request, awaitable, poll_seconds: float = 0.25):
  """The awaitable's result, or None (the awaitable cancelled) once the client has disconnected."""
  task = asyncio.ensure_future(awaitable)
  while True:
    done, _ = await asyncio.wait({task}, timeout=poll_seconds)
    if done:
      return task.result()
    if await http.is_disconnected():
      task.cancel()
      return None


def _choice(index: int, text: str, finish_reason: str | None, chat: bool) -> dict:
  body = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
  return {"index": index, **body, "finish_reason": finish_reason}


def _error_event(error: RequestError) -> str:
  return f"data: {json.dumps({'error': _error_body(error.status, error.message)})}\n\n"


async def _stream(worker: EngineThread, queues, rid: str, req, chat: bool, tokenizer, prompt_tokens: int = 0,
                  prompt_chars: list[int] | None = None):
  """SSE events: one per new text piece of each choice (chat: a first delta with the role), then the finish
  reasons, with `stream_options.include_usage` a last chunk with the usage and no choices, then [DONE]. A choice
  that fails sends an `error` event (OpenAI's error object; the others are cancelled) before [DONE].

  Text that could still turn into a stop string is held back until it cannot, so a stream never
  shows text that the final, stop-truncated answer does not have. With logprobs, each chunk carries those of the
  tokens received since the previous chunk of its choice (completions: `logprobs` with text offsets continuing
  from the prompt's length, `prompt_chars`; chat: `logprobs.content`), the last chunk the rest: together, the
  non-streamed answer's.
  """
  stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
  stop_token_ids = set(req.stop_token_ids or ())
  holdback = max((len(s) for s in stops), default=1) - 1
  obj = "chat.completion.chunk" if chat else "text_completion"
  pending = {i: q for i, q in enumerate(queues)}
  emitted = {i: "" for i in pending}
  tokens = {i: [] for i in pending}
  entries = {i: [] for i in pending}  # the logprob entry of each token received
  reported = {i: 0 for i in pending}  # tokens whose logprobs a chunk carried
  offsets = {i: (prompt_chars or [0] * len(queues))[i] for i in pending}  # text offset of the next reported token
  wants_logprobs = req.logprobs if chat else req.logprobs is not None
  completion_tokens = 0
  failed = False

  def logprobs_until(i, ids, all_entries):
    """The logprobs of choice i's tokens `ids` (`all_entries` theirs) after the last reported."""
    new_ids, new_entries = ids[reported[i]:], all_entries[reported[i]:]
    reported[i] = len(ids)
    if chat:
      return _chat_logprobs(new_ids, new_entries, tokenizer)
    body = _completion_logprobs_of(new_ids, new_entries, tokenizer, offsets[i])
    offsets[i] += sum(len(t) for t in body["tokens"])
    return body

  def chunk(i, delta, finish):
    return {"id": rid, "object": obj, "created": int(time.time()), "model": req.model,
            "choices": [{"index": i, **delta, "finish_reason": finish}]}
  try:
    if chat:
      for i in pending:
        yield f"data: {json.dumps(chunk(i, {'delta': {'role': 'assistant', 'content': ''}}, None))}\n\n"
    while pending and not failed:
      getters = {asyncio.ensure_future(q.get()): i for i, q in pending.items()}
      done, rest = await asyncio.wait(getters, return_when=asyncio.FIRST_COMPLETED)
      for fut in rest:
        fut.cancel()
      for fut in done:
        i = getters[fut]
        kind, value = fut.result()
        if kind == "token":
          tokens[i].append(value[0])
          entries[i].append(value[1])
          # A trailing replacement character may be the start of a multi-byte character: hold it back.
          shown = tokens[i][:-1] if tokens[i][-1] in stop_token_ids else tokens[i]  # it ends the output, unshown
          text = tokenizer.decode(shown).rstrip("\ufffd")
          safe = "" if any(s in text for s in stops) else text[len(emitted[i]):len(text) - holdback]
          piece, finish, ids = safe, None, (tokens[i], entries[i])
          if not piece:
            continue
        else:
          del pending[i]
          error = value if kind == "error" else value.error
          if error is not None:
            yield _error_event(error)
            failed = True
            break
          piece, finish = _final_text(value, tokenizer)[len(emitted[i]):], value.finish_reason
          ids = (value.output, value.logprobs)
          completion_tokens += len(value.output)
        emitted[i] += piece
        delta = {"delta": {"content": piece}} if chat else {"text": piece}
        if wants_logprobs:
          delta["logprobs"] = logprobs_until(i, *ids)
        yield f"data: {json.dumps(chunk(i, delta, finish))}\n\n"
    if not failed and req.stream_options is not None and req.stream_options.include_usage:
      usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
               "total_tokens": prompt_tokens + completion_tokens}
      yield f"data: {json.dumps({**chunk(0, {}, None), 'choices': [], 'usage': usage})}\n\n"
    yield "data: [DONE]\n\n"
  finally:
    for q in pending.values():  # the client went away, or a choice failed: stop generating the rest
      worker.cancel(q)


async def _stream_wim(worker: EngineThread, out: asyncio.Queue, rid: str, margin_event, tokenizer):
  """SSE events of a WiM document: each margin (in segment order, with its relevance), then the answer, then
  [DONE]; a failed document sends an `error` event instead of what is left. A client that closes the stream
  early (its question answered by a margin) cancels the document."""
  finished = False
  try:
    while True:
      kind, value = await out.get()
      if kind == "margin":
        yield f"data: {json.dumps(margin_event(value))}\n\n"
      elif kind == "answer":
        yield f"data: {json.dumps({'id': rid, 'object': 'wim.answer', 'text': tokenizer.decode(value)})}\n\n"
      elif kind == "error":
        yield _error_event(value)
      elif kind == "done":
        finished = True
        break
    yield "data: [DONE]\n\n"
  finally:
    if not finished:
      worker.cancel_wim(out)
