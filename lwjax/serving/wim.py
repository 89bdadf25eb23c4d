"""Writing in the Margins (arXiv 2408.14906, §2-3) on the serving engine: a long context read segment by segment,
a margin written after each, the margins classified, the answer written from the context and the kept margins.

For one document (`WiMRequest`), with segments s_1..s_n and a query q:

1. Segment i is prefilled after the KV of s_1..s_{i-1} (a continuation of the previous turn, cut back to the
   end of s_{i-1}: the context is prefilled once, never recomputed), then the extraction prompt with q, and
   the margin m_i is generated (`Engine.add_request(parent=..., keep=...)`, shared pages, copy-on-write).
2. Each margin is classified relevant or not by its own request with its own cache (prompt: q and m_i), batched
   by the engine with everything else.
3. After the last segment, the kept margins and q are prefilled after the whole context's KV and the answer is
   generated.

Nothing here loops over a request: each step of the engine finishes some turns, and their callbacks submit the
next ones, so the engine batches the turns of many documents (and ordinary requests) together. Margins are
reported in segment order as events (`on_event`), each with its relevance, while later segments are still being
read; `early_exit(margin)` (e.g. "this margin answers the question") stops the document there, cancelling what
is in flight and freeing its pages. What the prompts say is the task's business (`WiMPrompts`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
import uuid
from collections.abc import Callable, Sequence

from lwjax.serving.sampling import SamplingParams
from lwjax.serving.scheduler import Request, RequestError, Status


@dataclasses.dataclass(frozen=True)
class WiMPrompts:
  """The token ids of each prompt of the pattern, made by the task from the query (and margins)."""
  extraction: Callable[[str], list[int]]  # query -> what follows a segment, before its margin
  classification: Callable[[str, list[int]], list[int]]  # (query, margin) -> a relevance request's prompt
  answer: Callable[[str, list[list[int]]], list[int]]  # (query, kept margins) -> what follows the context
  is_relevant: Callable[[list[int]], bool]  # a relevance request's output -> relevant?


@dataclasses.dataclass
class Margin:
  segment: int
  tokens: list[int]
  relevant: bool | None = None  # None until classified
  seconds: float = 0.0  # from the document's start to the margin's classification


@dataclasses.dataclass
class WiMStats:
  """Compute of one document: tokens prefilled (fed to the model) and decoded (generated), by kind."""
  prefill_tokens: int = 0
  decode_tokens: int = 0
  requests: int = 0

  def add(self, request: Request, fed: int) -> None:
    """`fed`: the new prompt tokens of the request (a continuation's shared prefix is not fed again)."""
    self.prefill_tokens += fed
    self.decode_tokens += len(request.output)
    self.requests += 1



def _guarded(callback):
  """A turn's callback that fails its document, not the engine step it runs in: a ValueError (a turn the engine
  refuses, e.g. longer than the context) is the document's input (400); anything else a server error (500)."""
  @functools.wraps(callback)
  def run(self: WiMRequest, *args):
    try:
      callback(self, *args)
    except Exception as e:  # noqa: BLE001
      error_id = uuid.uuid4().hex[:12]
      logging.exception("WiM document failed (error id %s)", error_id)
      self.fail(RequestError(400 if isinstance(e, ValueError) else 500, f"{type(e).__name__}: {e}", error_id))
  return run


class WiMRequest:
  """One document read with margins on `engine`; `start()` submits its first turn, the engine does the rest.

  `done` turns True when the answer is written (`answer` tokens), at an early exit / cancel (`exited`), or when
  the document fails (`error`: one of its turns failed in the engine, or could not be submitted); a document
  that ends keeps no pages (its in-flight turns are cancelled, its retained context released).
  Events to `on_event(kind, payload)`: ("margin", Margin) in segment order, ("answer", tokens),
  ("exit", Margin | None), ("error", RequestError).
  """

  def __init__(self, engine, segments: Sequence[Sequence[int]], query: str, prompts: WiMPrompts, *,
               margin_params: SamplingParams, classify_params: SamplingParams, answer_params: SamplingParams,
               on_event: Callable[[str, object], None] | None = None,
               early_exit: Callable[[Margin], bool] | None = None):
    if not segments or any(not s for s in segments):
      raise ValueError("segments: expected one or more non-empty token lists")
    self.engine, self.segments, self.query, self.prompts = engine, [list(s) for s in segments], query, prompts
    self.margin_params, self.classify_params, self.answer_params = margin_params, classify_params, answer_params
    self.on_event, self.early_exit = on_event, early_exit
    self.margins: list[Margin | None] = [None] * len(self.segments)
    self.answer: list[int] | None = None
    self.done = self.exited = False
    self.error: RequestError | None = None
    self.stats = WiMStats()
    self._context_end = 0
    self._last_turn: Request | None = None
    self._in_flight: dict[int, Request] = {}
    self._fed: dict[int, int] = {}
    self._reported = 0
    self._start_time = 0.0
    self.first_margin_seconds: float | None = None

  # -- submission --

  def start(self) -> WiMRequest:
    self._start_time = time.perf_counter()
    self._turn(0, parent=None)
    return self

  def _submit(self, prompt, params, on_finish, *, parent=None, keep=None, retain_kv=False) -> Request:
    request = self.engine.add_request(prompt, params, on_finish=on_finish, parent=parent, keep=keep,
                                      retain_kv=retain_kv)
    self._in_flight[request.id] = request
    self._fed[request.id] = len(prompt)
    return request

  def _turn(self, index: int, parent: Request | None) -> None:
    prompt = self.segments[index] + self.prompts.extraction(self.query)
    self._submit(prompt, self.margin_params, lambda r: self._margin_written(index, r), parent=parent,
                 keep=self._context_end if parent is not None else None, retain_kv=True)

  # -- callbacks (run inside Engine.step) --

  def _finished(self, request: Request) -> bool:
    """Bookkeeping of a finished request; False when the document no longer wants its result (a failed turn
    fails the document)."""
    self._in_flight.pop(request.id, None)
    self.stats.add(request, self._fed.pop(request.id, 0))
    if request.finish_reason == "error" and not self.done:
      self.fail(request.error or RequestError(500, f"turn {request.id} failed"))
    return not self.done and request.finish_reason not in ("cancelled", "error")

  @_guarded
  def _margin_written(self, index: int, request: Request) -> None:
    if not self._finished(request):
      self.engine.release(request)
      return
    self._context_end += len(self.segments[index])
    self.margins[index] = Margin(index, self._strip(request.output))
    self._submit(self.prompts.classification(self.query, self.margins[index].tokens), self.classify_params,
                 lambda r: self._classified(index, r))
    if index + 1 < len(self.segments):
      self._turn(index + 1, parent=request)  # shares the context's pages, cut back to the segment's end
      self.engine.release(request)
    else:
      self._last_turn = request
      self._maybe_answer()

  @_guarded
  def _classified(self, index: int, request: Request) -> None:
    if not self._finished(request):
      return
    margin = self.margins[index]
    margin.relevant = bool(self.prompts.is_relevant(self._strip(request.output)))
    margin.seconds = time.perf_counter() - self._start_time
    while self._reported < len(self.margins) and self.margins[self._reported] is not None \
        and self.margins[self._reported].relevant is not None:
      reported = self.margins[self._reported]
      self._reported += 1
      if self.first_margin_seconds is None:
        self.first_margin_seconds = reported.seconds
      self._emit("margin", reported)
      if self.early_exit is not None and self.early_exit(reported):
        self._stop(reported)
        return
    self._maybe_answer()

  def _maybe_answer(self) -> None:
    if self._last_turn is None or self._reported < len(self.margins) or self.done:
      return
    kept = [m.tokens for m in self.margins if m.relevant]
    parent, self._last_turn = self._last_turn, None
    self._submit(self.prompts.answer(self.query, kept), self.answer_params, self._answered, parent=parent,
                 keep=self._context_end)
    self.engine.release(parent)

  @_guarded
  def _answered(self, request: Request) -> None:
    if not self._finished(request):
      return
    self.answer = self._strip(request.output)
    self.done = True
    self._emit("answer", self.answer)

  # -- stopping --

  def fail(self, error: RequestError) -> None:
    """Ends the document with `error` (its turns cancelled, its pages released) and reports it."""
    if self.done:
      return
    self.error = error
    self._stop(None, event=("error", error))

  def cancel(self) -> None:
    """Stops the document: in-flight requests are cancelled (their pages freed at the engine's next step)."""
    self._stop(None)

  def _stop(self, margin: Margin | None, event: tuple[str, object] | None = None) -> None:
    self.done = self.exited = True
    for request in list(self._in_flight.values()):
      if request.status != Status.FINISHED:  # one finished in this very step has its callback still to run
        self.engine.cancel(request.id)
    if self._last_turn is not None:
      self.engine.release(self._last_turn)
      self._last_turn = None
    self._emit(*(event or ("exit", margin)))

  def _emit(self, kind: str, payload) -> None:
    if self.on_event is not None:
      self.on_event(kind, payload)

  def _strip(self, tokens: list[int]) -> list[int]:
    return list(tokens[:-1]) if tokens and tokens[-1] in self.engine.stop_ids else list(tokens)

