"""Iteration-level scheduling with chunked prefill and preemption (NanoFlow, arXiv 2408.12757, §4).

Each iteration forms one dense batch under a token budget: every running request contributes the
tokens whose keys/values are not cached yet — one for a decode, up to a chunk for a prompt — and waiting
requests are admitted while pages and budget last. When the page pool runs out, the most recently
admitted request is preempted by recomputation: its pages are freed and it returns to the head of the
queue with its generated tokens, to be prefilled again (prefix-cache hits make that cheap).
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from collections.abc import Callable

from lwjax.serving.kv_cache import OutOfPages, PagedKVCache
from lwjax.serving.sampling import SamplingParams


class Stalled(RuntimeError):
  """The next waiting request can never be admitted: nothing runs that could free the pages it needs."""

  def __init__(self, message: str, request: Request):
    super().__init__(message)
    self.request = request


@dataclasses.dataclass(frozen=True)
class RequestError:
  """Why a request failed: an HTTP-style `status` (4xx: its input; 5xx: the server), the message, and the id
  under which the server logged it."""
  status: int
  message: str
  error_id: str = ""


class Status(enum.Enum):
  WAITING = "waiting"
  RUNNING = "running"
  FINISHED = "finished"


@dataclasses.dataclass
class Request:
  """One generation: the prompt, what is generated so far, and how much of it is in the KV cache."""
  id: int
  prompt: list[int]
  params: SamplingParams
  seed: int
  on_token: Callable[[Request, int], None] | None = None
  on_finish: Callable[[Request], None] | None = None
  retain_kv: bool = False  # keep the KV cache when finished, for a continuation (Engine.add_request(parent=...))
  output: list[int] = dataclasses.field(default_factory=list)
  num_computed: int = 0  # leading tokens of prompt + output whose keys/values are cached
  status: Status = Status.WAITING
  finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
  cancelled: bool = False
  error: RequestError | None = None  # set with finish_reason "error"
  # With params.logprobs: per output token, (its logprob, the top token ids, their logprobs).
  logprobs: list[tuple[float, list[int], list[float]]] = dataclasses.field(default_factory=list)
  # With params.prompt_logprobs: per prompt position p >= 1, the same for prompt token p given the tokens before.
  prompt_logprobs: dict[int, tuple[float, list[int], list[float]]] = dataclasses.field(default_factory=dict)

  @property
  def shares_prefix(self) -> bool:
    """Whether cached prefix blocks may stand in for its prompt: not when the prompt's logprobs are wanted."""
    return self.params.prompt_logprobs is None
  text: str = ""

  @property
  def tokens(self) -> list[int]:
    return self.prompt + self.output

  @property
  def fully_sampled(self) -> bool:
    """Every token max_tokens allows is sampled (some may still be in flight on the device): the request needs
    no more model work, and ends once its last tokens are read."""
    return len(self.output) >= self.params.max_tokens

  @property
  def num_pending(self) -> int:
    """Tokens still to feed to the model before the next token can be sampled."""
    return len(self.prompt) + len(self.output) - self.num_computed


@dataclasses.dataclass
class Work:
  """A request's share of one iteration: feed `tokens`; sample after them when `samples`."""
  request: Request
  tokens: list[int]
  slots: list[tuple[int, int]]
  samples: bool
  start: int = 0  # the position of tokens[0] in the request's sequence


class Scheduler:
  """FIFO admission, a token budget per iteration, preemption by recomputation."""

  def __init__(self, kv: PagedKVCache, *, max_num_seqs: int, max_batch_tokens: int, prefill_chunk: int):
    if prefill_chunk > max_batch_tokens:
      raise ValueError(f"prefill_chunk ({prefill_chunk}) exceeds max_batch_tokens ({max_batch_tokens})")
    self.kv = kv
    self.max_num_seqs, self.max_batch_tokens, self.prefill_chunk = max_num_seqs, max_batch_tokens, prefill_chunk
    self.waiting: collections.deque[Request] = collections.deque()
    self.running: list[Request] = []
    self.num_preemptions = 0
    self.num_prefix_hit_tokens = 0

  def add(self, request: Request) -> None:
    self.waiting.append(request)

  def has_work(self) -> bool:
    return bool(self.waiting or self.running)

  def schedule(self, only: Request | None = None) -> list[Work]:
    """The work of the next iteration; reserves its KV slots.

    A running request that is `fully_sampled` (its last token sampled but not read yet: asynchronous
    scheduling) gets no work and does not hold a batch row: a waiting request may take the row now rather than
    one iteration later, once the token is read and the request finished.

    When nothing runs and the first waiting request does not fit, a later one that fits is admitted out of
    order (a continuation whose parent's pages it shares, say): nothing running could ever free pages for the
    first, so waiting in order would wait forever. `Stalled` only when no waiting request fits at all.

    `only`: the work of that request alone (the engine isolating a request suspected of failing iterations).
    """
    if only is not None:
      return self._schedule_alone(only)
    budget, work = self.max_batch_tokens, []
    for request in list(self.running):
      if request not in self.running or request.fully_sampled:  # preempted earlier in this loop, or done
        continue
      n = min(request.num_pending, self.prefill_chunk, budget)
      if n == 0:
        continue
      slots = self._reserve(request, n)
      if slots is None:
        continue
      work.append(self._work(request, n, slots))
      budget -= n
    active = sum(not r.fully_sampled for r in self.running)
    while self.waiting and budget > 0 and active < self.max_num_seqs:
      request = self.waiting[0]
      if not self._fits(request, budget):
        break  # admission by free pages: wait for running requests to finish
      work.append(self._admit(request, budget))
      active += 1
      budget -= len(work[-1].tokens)
    if not work and not self.running and self.waiting:
      for request in list(self.waiting)[1:]:
        if self._fits(request, budget):
          return self._schedule_alone(request)
      request = self.waiting[0]
      needed = self.kv.pages_needed(request.id, min(request.num_pending, self.prefill_chunk, budget))
      raise Stalled(f"request {request.id} needs {needed} free KV pages, {self.kv.allocator.num_free} of "
                    f"{self.kv.allocator.num_pages} are free, and no running request will free any: the rest are "
                    "held by finished requests that retain their KV (release them with Engine.release) or the "
                    "pool is too small (raise num_pages)", request)
    return work

  def _fits(self, request: Request, budget: int) -> bool:
    """Whether the waiting `request`'s next chunk (within `budget` tokens) fits the free pages; registers its
    sequence (and its prefix-cache hits) first."""
    if request.id not in self.kv:
      request.num_computed = self.kv.add_sequence(request.id, request.tokens, share=request.shares_prefix)
      self.num_prefix_hit_tokens += request.num_computed
    n = min(request.num_pending, self.prefill_chunk, budget)
    return self.kv.pages_needed(request.id, n) <= self.kv.allocator.num_free

  def _schedule_alone(self, request: Request) -> list[Work]:
    """The work of `request` only, admitting it out of order if it waits; Stalled if its pages do not fit."""
    if request in self.waiting:
      if not self._fits(request, self.max_batch_tokens):
        raise Stalled(f"request {request.id} needs more KV pages than the {self.kv.allocator.num_free} free",
                      request)
      return [self._admit(request, self.max_batch_tokens)]
    if request not in self.running or request.fully_sampled:
      return []
    n = min(request.num_pending, self.prefill_chunk, self.max_batch_tokens)
    slots = self._reserve(request, n) if n else None
    return [self._work(request, n, slots)] if slots is not None else []

  def _admit(self, request: Request, budget: int) -> Work:
    """Moves a waiting request that `_fits` to running; the work of its first chunk."""
    self.waiting.remove(request)
    request.status = Status.RUNNING
    self.running.append(request)
    n = min(request.num_pending, self.prefill_chunk, budget)
    return self._work(request, n, self.kv.append(request.id, n))

  def _work(self, request: Request, n: int, slots) -> Work:
    start = request.num_computed
    request.num_computed += n
    return Work(request, request.tokens[start:start + n], slots, samples=request.num_pending == 0, start=start)

  def _reserve(self, request: Request, n: int):
    """Slots for `request`, preempting the newest other requests while pages are short; None if it was."""
    while True:
      try:
        return self.kv.append(request.id, n)
      except OutOfPages:  # the newest request that still needs work (a fully sampled one ends within an iteration)
        victim = next(r for r in reversed(self.running) if not r.fully_sampled)
        self.preempt(victim)
        if victim is request:
          return None

  def preempt(self, request: Request) -> None:
    """Frees the request's pages and queues it first again; it recomputes its tokens on re-admission."""
    self.running.remove(request)
    self.kv.free(request.id)
    request.num_computed = 0
    request.status = Status.WAITING
    self.waiting.appendleft(request)
    self.num_preemptions += 1

  def finish(self, request: Request, reason: str) -> None:
    if request in self.running:
      self.running.remove(request)
    elif request in self.waiting:
      self.waiting.remove(request)
    if request.id in self.kv and reason == "error":  # its KV may be partly unwritten: publish none of it
      self.kv.free(request.id)
    elif request.id in self.kv:
      self.kv.commit_blocks(request.id, request.tokens)
      self.kv.offload_blocks(request.id, request.tokens)
      if not (request.retain_kv and reason in ("stop", "length")):  # a cancelled or failed one keeps nothing
        self.kv.free(request.id)
    request.status, request.finish_reason = Status.FINISHED, reason
