"""Continuous-batching inference engine over a paged KV cache (NanoFlow, arXiv 2408.12757, §4).

Each iteration the scheduler picks decodes and prefill chunks under a token budget; the engine runs
them as two dense, left-padded groups of rows (decodes [b, 1], prefill chunks [b, chunk]) with static,
bucketed shapes in one model call (`GPT.paged_step_groups`: one pass over the weights for both, attention
per group), samples the next tokens, streams them to callbacks, and retires finished requests. Hybrids
and nano-batches run the groups as separate calls (`paged_step`). `LLM.generate` is the offline batch API
on top. With a `mesh`, a GPT or a hybrid is served tensor parallel (`lwjax.serving.tensor_parallel`): the same
programs with explicit shardings, the host side unchanged; a hybrid's recurrent-state pools lie over heads there.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lwjax import kernels, memory_maps
from lwjax.models.gpt import GPT
from lwjax.serving import tensor_parallel
from lwjax.serving.kv_cache import PagedKVCache
from lwjax.serving.logits_processors import batch_processing, process_logits, uses_processing
from lwjax.serving.sampling import (
  MAX_TOP_LOGPROBS,
  SamplingParams,
  batch_arrays,
  sample,
  sample_with_logprobs,
  token_logprobs,
)
from lwjax.serving.scheduler import Request, RequestError, Scheduler, Stalled, Status, Work
from lwjax.training.mesh import SERVING_RULES


def _bucket(n: int, limit: int, smallest: int = 1) -> int:
  """The power of two >= max(n, smallest) (capped at limit): few distinct shapes, few compilations."""
  return min(limit, 1 << max(0, (max(n, smallest) - 1).bit_length()))


def padded_rows(n: int, max_num_seqs: int, nano_batches: int) -> int:
  """The rows a group of `n` runs as: a power of two (few shapes to compile) that the nano-batches split evenly."""
  rows = max(_bucket(n, max_num_seqs), nano_batches)
  return -(-rows // nano_batches) * nano_batches


MIN_CHUNK_WIDTH, MIN_TABLE_PAGES = 16, 8  # smallest buckets: fewer shapes to compile, little padding
MAX_MAPS_FRACTION = 0.6  # of vm.max_map_count: past it the engine drops its compiled programs (lwjax.memory_maps)
SEED_MODULUS = 2**32  # every integer seed is accepted, taken modulo this (the sampler's keys are uint32)
MAX_FAILED_ITERATIONS = 3  # consecutive failed iterations with no request to blame: every request fails


PLACEHOLDER = -1  # an output token sampled on the device but not yet read by the host
DEFAULT_PARAMS = SamplingParams()  # frozen, so one instance can be every call's default


def _sample(logits, sampling_arrays, num_logprobs: int, processing=None, previous_tokens=None):
  """Tokens, or (tokens, (logprobs, top ids, top logprobs)) when a row asks for logprobs (`num_logprobs` > 0).
  With `processing` (`batch_processing`'s arrays and each row's placeholder source), the logits are processed
  first; an output token still in flight is read from `previous_tokens`."""
  if processing is not None:
    in_flight = previous_tokens[processing["output_source"]][:, None]
    output_ids = jnp.where(processing["output_ids"] == PLACEHOLDER, in_flight, processing["output_ids"])
    logits = process_logits(logits, {**processing, "output_ids": output_ids})
  if num_logprobs:
    return sample_with_logprobs(logits, *sampling_arrays, num_logprobs)
  return sample(logits, *sampling_arrays)


def _run(graphdef, shardings, params, tokens, k_pools, v_pools, slot_pages, slot_offsets, page_table, lengths,
         previous_tokens, previous_index, sampling_arrays, sample_rows, nano_batches, states, recurrent_rows,
         num_logprobs=0, prompt_targets=None, processing=None):
  """One group of rows: fill placeholders from the previous iteration's device tokens, run, sample.

  A hybrid (Mamba layers) also takes its per-slot recurrent `states` and, per row, (state slot, fresh,
  number of real tokens); a GPT gets None for both. `prompt_targets` [b, t] (the next prompt token of each
  position): the logits of every position are kept and the prompt logprobs returned, {"tokens": what `_sample`
  gives, "prompt": `token_logprobs`}. `shardings`: the engine's mesh placement (`tensor_parallel.EngineShardings`),
  None on one device."""
  tokens = jnp.where(tokens == PLACEHOLDER, previous_tokens[previous_index], tokens)
  model = nnx.merge(graphdef, params)
  last_only = prompt_targets is None
  with tensor_parallel.axis_rules(shardings):
    if states is None:
      logits, k_pools, v_pools = model.paged_step(tokens, k_pools, v_pools, (slot_pages, slot_offsets),
                                                  page_table, lengths, nano_batches, last_only=last_only)
    else:
      state_slots, fresh, num_new = recurrent_rows
      logits, k_pools, v_pools, states = model.paged_step(
          tokens, k_pools, v_pools, (slot_pages, slot_offsets), page_table, lengths, nano_batches,
          last_only=last_only, states=states, state_slots=state_slots, fresh=fresh, num_new=num_new)
  sampled = _sample(logits[sample_rows, -1], sampling_arrays, num_logprobs, processing, previous_tokens)
  if prompt_targets is not None:
    sampled = {"tokens": sampled, "prompt": token_logprobs(logits, prompt_targets, MAX_TOP_LOGPROBS)}
  return sampled, k_pools, v_pools, states


def _run_mixed(graphdef, shardings, params, k_pools, v_pools, previous_tokens, groups, num_logprobs=0):
  """Decodes and prefill chunks in one model call: `groups` holds per group (tokens, placeholder sources,
  slot pages, slot offsets, page table, lengths, sampling arrays, sample rows, logit processing or None);
  returns (the sampled tokens of each group, k_pools, v_pools)."""
  model = nnx.merge(graphdef, params)
  inputs = [(jnp.where(tokens == PLACEHOLDER, previous_tokens[source], tokens), (pages, offsets), table, lengths)
            for tokens, source, pages, offsets, table, lengths, *_ in groups]
  with tensor_parallel.axis_rules(shardings):
    logits, k_pools, v_pools = model.paged_step_groups(inputs, k_pools, v_pools)
  sampled = tuple(_sample(group_logits[rows], arrays, num_logprobs, processing, previous_tokens)
                  for group_logits, (*_, arrays, rows, processing) in zip(logits, groups, strict=True))
  return sampled, k_pools, v_pools


@functools.lru_cache(maxsize=16)
def compiled_mixed(graphdef, shardings=None):
  """`_run_mixed` jitted for one model structure and placement; on a mesh with explicit shardings: parameters as
  `shardings.params`, KV pools over kv heads, the rest (tokens, tables, sampled tokens) replicated."""
  fn = functools.partial(_run_mixed, graphdef, shardings)
  if shardings is None:
    return jax.jit(fn, donate_argnums=(1, 2), static_argnums=5)
  pool, rest = shardings.kv_pool, shardings.replicated
  return jax.jit(fn, donate_argnums=(1, 2), static_argnums=5, in_shardings=(shardings.params, pool, pool, rest, rest),
                 out_shardings=(rest, pool, pool))


@functools.lru_cache(maxsize=16)
def compiled_step(graphdef, shardings=None):
  """The jitted step for one model structure (and mesh placement, as `compiled_mixed`), shared by engines of that
  structure. The graph definition is bound here once: hashing it as a static argument on every call costs ~0.3 ms.
  Both need no weights: `lwjax.launch.serving_compile` lowers them for a TPU slice from an abstract model."""
  fn = functools.partial(_run, graphdef, shardings)
  if shardings is None:
    return jax.jit(fn, static_argnums=(12, 15), donate_argnums=(2, 3, 13))
  pool, rest = shardings.kv_pool, shardings.replicated
  states = rest if shardings.states is None else shardings.states  # a hybrid's state pools: over heads
  # Every argument but the static nano_batches (12) and num_logprobs (15): params, tokens, the pools, the rest, the
  # states (13) among them.
  in_shardings = (shardings.params, rest, pool, pool) + (rest,) * 8 + (states,) + (rest,) * 3
  return jax.jit(fn, static_argnums=(12, 15), donate_argnums=(2, 3, 13), in_shardings=in_shardings,
                 out_shardings=(rest, pool, pool, states))


def _tokens_of(sampled):
  """The sampled tokens of a group's step output: tokens, (tokens, logprob arrays), or a dict of either and the
  prompt logprobs."""
  if isinstance(sampled, dict):
    sampled = sampled["tokens"]
  return sampled[0] if isinstance(sampled, tuple) else sampled


class Engine:
  """Serves a GPT: `add_request` queues work, `step` runs one iteration, `run_until_done` drains.

  A hybrid (`lwjax.models.mamba_hybrid.HybridGPT`) is served the same way: its attention layers use the paged
  KV cache, its Mamba layers a recurrent state per running sequence, kept in a slot of a state pool on the
  device for as long as the sequence runs (a preempted sequence recomputes from its first token). The prefix
  cache is off for hybrids: a shared KV prefix would not bring the Mamba state at its end with it.

  A failure fails requests, never the engine: `step` does not raise. A request the scheduler can never admit
  ends with finish_reason "error" and a 503 `RequestError`; a callback that raises fails its request. A failed
  iteration rolls every running request back to recompute (tokens already streamed are kept; the ones sampled
  but not read are sampled again, identically: a token depends only on its request's seed and index), then
  runs each request of that iteration alone, one iteration each: one that fails alone fails (500, with the
  error id the log names), the others go on with the output they would have had. `leaks()` lists what an idle
  engine still holds.
  """

  def __init__(self, model: GPT, *, num_pages: int = 256, page_size: int = 16, max_num_seqs: int = 16,
               max_batch_tokens: int = 512, prefill_chunk: int = 128, max_model_len: int | None = None,
               eos_id: int | None = None, detokenize: Callable[[list[int]], str] | None = None,
               kv_dtype=None, offload=None, async_scheduling: bool = True, nano_batches: int = 1,
               mixed_batches: bool = True, stop_ids: Sequence[int] = (), mesh: jax.sharding.Mesh | None = None,
               rules=SERVING_RULES, request_ids: Iterator[int] | None = None):
    """`mixed_batches`: an iteration's decodes and prefill chunks in one model call (a GPT with nano_batches=1;
    False: one call per group, as hybrids and nano-batches always run). `stop_ids`: ids that end a request as
    `eos_id` does (a chat model's end of turn: Llama-3's <|eot_id|> beside <|end_of_text|>); `ignore_eos`
    ignores them too. `mesh` (axes data, fsdp, tensor; `tensor_parallel.serving_mesh`): serve tensor parallel
    over its `tensor` axis, weights placed by their logical axes under `rules`, the KV pool over kv heads and a
    hybrid's recurrent states over heads (`lwjax.serving.tensor_parallel`); a ValueError (a ConfigError naming the
    model key) when the mesh does not divide the model's heads, kv heads, MLP hidden or vocabulary. `request_ids`:
    where request ids (and the seeds of requests that set none) come from; replicas behind one front share one
    (`lwjax.serving.replicas`)."""
    self.hybrid = hasattr(model, "init_slot_states")
    cfg = model.gpt_cfg if self.hybrid else model.cfg
    if self.hybrid and (offload is not None or nano_batches != 1):
      raise ValueError("a hybrid model serves without KV offload and with nano_batches=1 (its Mamba states are "
                       "not in the prefix cache; its layers are not split into nano-batches)")
    num_kv_layers = len(model.attention_layers) if self.hybrid else cfg.n_layers
    self.graphdef, self.params = nnx.split(model)
    # Hybrids: one recurrent-state slot per running sequence, plus a last one that padding rows write to.
    self._state_shapes = jax.eval_shape(lambda: model.init_slot_states(max_num_seqs + 1)) if self.hybrid else None
    self.shardings = None
    if mesh is not None:
      tensor_parallel.check_mesh(mesh.shape)
      tensor_parallel.check_shapes(cfg, mesh.shape, rules)
      self.shardings = tensor_parallel.EngineShardings.build(
          self.params, cfg.n_kv_heads, mesh, rules,
          *((self._state_shapes, model.slot_state_axes()) if self.hybrid else ()))
      self.params = self.shardings.place_params(self.params)
    self._run = compiled_step(self.graphdef, self.shardings)
    self.mixed_batches = mixed_batches and not self.hybrid and nano_batches == 1
    self._run_mixed = compiled_mixed(self.graphdef, self.shardings) if self.mixed_batches else None
    self.eos_id, self.detokenize, self.vocab_size = eos_id, detokenize, cfg.vocab_size
    self.stop_ids = frozenset(stop_ids) | ({eos_id} if eos_id is not None else set())
    self.max_model_len = max_model_len or cfg.max_seq_len
    self.max_pages = -(-self.max_model_len // page_size)
    self.max_num_seqs, self.prefill_chunk = max_num_seqs, prefill_chunk
    self.kv = PagedKVCache(num_layers=num_kv_layers, kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                           num_pages=num_pages, page_size=page_size, dtype=kv_dtype or cfg.dtype,
                           offload=offload, prefix_caching=not self.hybrid,
                           sharding=self.shardings.kv_pool if self.shardings else None)
    self.states = self._fresh_states()
    self._state_slots: dict[int, int] = {}
    self.scheduler = Scheduler(self.kv, max_num_seqs=max_num_seqs, max_batch_tokens=max_batch_tokens,
                               prefill_chunk=prefill_chunk)
    self._ids = itertools.count() if request_ids is None else request_ids
    self.requests: dict[int, Request] = {}
    self.num_iterations = 0
    self.num_model_calls = 0  # one per iteration with mixed batches; one per group of rows otherwise
    # Wall time of `step` split into the host's own work and the wait for sampled tokens (device time not
    # hidden behind host work): host_seconds / num_iterations is the per-iteration host cost.
    self.host_seconds = self.wait_seconds = 0.0
    self.async_scheduling, self.nano_batches = async_scheduling, nano_batches
    self._in_flight = None
    # The previous iteration's sampled tokens travel padded to one size (at most two groups of rows), so that
    # how many rows it sampled never makes a new shape to compile.
    self._max_rows = self._padded_rows(max_num_seqs)
    self._previous_size = 2 * self._max_rows
    self._programs_checked = 0
    # Where attention's cost does not depend on the page table's width, every table is passed whole: one table
    # shape, a few times fewer programs to compile (a long WiM read compiled hundreds with bucketed widths).
    self._whole_tables = kernels.decode_attention_ignores_table_width(cfg.dtype, cfg.attention_impl)
    # Failure isolation: requests of a failed iteration, each to be run alone once before rejoining the batch.
    self._suspects: list[Request] = []
    self._iteration_requests: list[Request] = []
    self._ran_alone = False
    self._prompt_logprobs_in_flight: list = []  # (group, width, device arrays) of chunks run, not yet read
    self._failed_alone: dict[int, int] = {}  # request id -> iterations it failed alone, in a row
    self._failed_iterations = 0
    self.num_failed_iterations = 0

  def _fresh_states(self):
    """A hybrid's recurrent-state pools, zeroed (on a mesh, over heads); None for a GPT."""
    if self._state_shapes is None:
      return None
    if self.shardings is None:
      return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self._state_shapes)
    return jax.tree.map(lambda s, where: jnp.zeros(s.shape, s.dtype, device=where), self._state_shapes,
                        self.shardings.states)

  def add_request(self, prompt: Sequence[int], params: SamplingParams = DEFAULT_PARAMS,
                  on_token: Callable[[Request, int], None] | None = None, *,
                  on_finish: Callable[[Request], None] | None = None, parent: Request | None = None,
                  keep: int | None = None, retain_kv: bool = False) -> Request:
    """Queues a request; `on_token(request, token)` streams its tokens, `on_finish(request)` runs when it ends.

    A continuation: with `parent` (a finished request made with `retain_kv=True`), the request's tokens are the
    parent's first `keep` tokens (default: all whose KV is cached) followed by `prompt`, and those `keep`
    tokens' KV is the parent's, shared page by page and cut back to `keep` (never recomputed; copy-on-write
    protects the parent). `retain_kv` keeps this request's own KV after it finishes, until `release`.
    """
    if not prompt:
      raise ValueError("prompt: empty (valid: at least one token)")
    if not all(isinstance(t, (int, np.integer)) and 0 <= t < self.vocab_size for t in prompt):
      raise ValueError(f"prompt: token ids must be integers in [0, {self.vocab_size})")
    prefix: list[int] = []
    if parent is not None and self.hybrid:
      raise ValueError("parent: a hybrid's Mamba state is kept for a sequence's end only, not per position, so it "
                       "cannot continue from a cut-back prefix (valid: parent=None)")
    if parent is not None:
      if parent.status != Status.FINISHED or parent.id not in self.kv:
        raise ValueError(f"parent: request {parent.id} is not a finished request with retained KV (valid: one "
                         "made with retain_kv=True that finished, not cancelled, and is not released)")
      cached = self.kv.length(parent.id)
      keep = cached if keep is None else keep
      if not 0 <= keep <= cached:
        raise ValueError(f"keep: {keep} outside [0, {cached}], the parent's cached tokens")
      prefix = parent.tokens[:keep]
    self.check_params(params)
    self.check_length(len(prefix) + len(prompt), params.max_tokens)
    request_id = next(self._ids)
    seed = (params.seed if params.seed is not None else request_id) % SEED_MODULUS
    request = Request(request_id, prefix + list(prompt), params, seed=seed, on_token=on_token, on_finish=on_finish,
                      retain_kv=retain_kv)
    if parent is not None:
      self.kv.fork(parent.id, request_id)
      self.kv.truncate(request_id, keep)
      request.num_computed = keep
    self.requests[request_id] = request
    self.scheduler.add(request)
    return request

  def check_params(self, params: SamplingParams) -> None:
    """ValueError naming the field unless every token id of `params` (logit_bias, stop_token_ids) is in the
    vocabulary."""
    for field, ids in (("logit_bias", [t for t, _ in params.logit_bias]), ("stop_token_ids", params.stop_token_ids)):
      outside = [t for t in ids if not 0 <= t < self.vocab_size]
      if outside:
        raise ValueError(f"{field}: token id {outside[0]} is outside the vocabulary (valid: 0 to "
                         f"{self.vocab_size - 1})")

  def check_length(self, prompt_tokens: int, max_tokens: int, field: str = "prompt") -> None:
    """ValueError naming `field` unless a request of `prompt_tokens` + `max_tokens` fits the context length and
    (with a copy-on-write page to spare) the KV pool."""
    total = prompt_tokens + max_tokens
    if total > self.max_model_len:
      raise ValueError(f"{field}: {prompt_tokens} tokens + max_tokens {max_tokens} exceed the context of "
                       f"{self.max_model_len} (valid: a shorter prompt or fewer max_tokens)")
    pages = -(-total // self.kv.page_size) + 1
    if pages > self.kv.allocator.num_pages:
      raise ValueError(f"{field}: {prompt_tokens} tokens + max_tokens {max_tokens} need {pages} KV pages, more than "
                       f"the pool's {self.kv.allocator.num_pages} (valid: a shorter request, or a larger engine "
                       "num_pages)")

  def fail_request(self, request: Request, status: int, message: str, error_id: str = "") -> None:
    """Ends a request now with finish_reason "error" (its pages freed, its `on_finish` run), e.g. at shutdown."""
    if request.status != Status.FINISHED:
      self._fail(request, status, message, error_id)
      self._retire([request])

  def release(self, request: Request) -> None:
    """Frees the KV a finished `retain_kv` request kept (its continuations keep the pages they share)."""
    if request.status != Status.FINISHED:
      raise ValueError(f"request {request.id} is {request.status.value}: release it once it has finished")
    if request.id in self.kv:
      self.kv.free(request.id)

  def cancel(self, request_id: int) -> None:
    """Stops a request at the next iteration; its pages are freed then (a finished one: nothing to do)."""
    request = self.requests.get(request_id)
    if request is not None:
      request.cancelled = True

  def step(self) -> list[Request]:
    """One iteration; returns the requests that finished in it (finish_reason "error" for failed ones).

    With asynchronous scheduling, this iteration is dispatched before the previous one's tokens are
    read: the host prepares iteration i + 1 while the device runs i. Sampled tokens enter the next
    batch on the device (placeholders), stop conditions are seen one iteration late, and the one extra
    token a finished request got meanwhile is discarded.
    """
    try:
      finished = self._step()
      self._failed_iterations = 0
      if self._ran_alone:
        self._failed_alone.clear()
    except Exception as e:  # noqa: BLE001 - any failure fails requests, never the engine
      finished = self._recover(e)
    return self._retire(finished)

  def _step(self) -> list[Request]:
    start, wait_before = time.perf_counter(), self.wait_seconds
    self._iteration_requests, self._ran_alone = [], False
    finished = [r for r in self.requests.values() if r.cancelled and r.status != Status.FINISHED]
    for request in finished:
      self.scheduler.finish(request, "cancelled")
    alone = next((r for r in self._suspects if r.status != Status.FINISHED), None)
    self._suspects = [r for r in self._suspects if r.status != Status.FINISHED]
    try:
      work = self.scheduler.schedule(only=alone)
    except Stalled as e:
      self._fail(e.request, 503, str(e))
      finished.append(e.request)
      work = []
    if alone is not None:
      self._suspects.remove(alone)
      self._ran_alone = True
    self._iteration_requests = [w.request for w in work] + [w.request for sampling, _ in self._in_flight or ()
                                                            for w in sampling]
    dispatched = self._dispatch(work)
    if self._prompt_logprobs_in_flight:  # read now (a wait for this iteration only): the request may end next
      self._record_prompt_logprobs()
    if self.num_compiled_programs > self._programs_checked:  # compiled a new shape: mind the JIT's mappings
      if memory_maps.near_limit(MAX_MAPS_FRACTION):
        logging.warning("serving engine: %d compiled programs hold over %.0f%% of the memory mappings the system "
                        "allows; dropping them (they compile again when next needed). To keep them, %s.",
                        self.num_compiled_programs, 100 * MAX_MAPS_FRACTION, memory_maps.FIX)
        self.drop_compiled_programs()
      self._programs_checked = self.num_compiled_programs
    if self.async_scheduling and alone is None:
      previous, self._in_flight = self._in_flight, dispatched
      finished += self._resolve(previous)
    else:  # a request run alone is resolved in its own iteration: a failure there is its own
      finished += self._resolve(self._in_flight) + self._resolve(dispatched)
      self._in_flight = None
    for w in work:
      if len(w.tokens) > 1 and w.request.status != Status.FINISHED:  # publish prefilled full blocks
        self.kv.commit_blocks(w.request.id, [t for t in w.request.tokens[:w.request.num_computed]
                                             if t != PLACEHOLDER])
    self.kv.retire_offloads()  # file the KV offload copies that have landed; never waits
    self.num_iterations += 1
    self.host_seconds += time.perf_counter() - start - (self.wait_seconds - wait_before)
    return finished

  def _retire(self, finished: list[Request]) -> list[Request]:
    """Drops finished requests from the engine's books, then runs their `on_finish` callbacks (which may add
    requests: a continuation); a callback that raises fails nothing else."""
    finished = list({r.id: r for r in finished}.values())
    for request in finished:
      self.requests.pop(request.id, None)
      self._state_slots.pop(request.id, None)
    for request in finished:
      if request.on_finish is not None:
        try:
          request.on_finish(request)
        except Exception:  # noqa: BLE001
          logging.exception("on_finish of request %d raised", request.id)
    return finished

  def _fail(self, request: Request, status: int, message: str, error_id: str = "") -> None:
    """Ends `request` with finish_reason "error"; its pages are freed (a failed request retains no KV)."""
    if request.status == Status.FINISHED:
      return
    if PLACEHOLDER in request.output:
      request.output[:] = [t for t in request.output if t != PLACEHOLDER]
    request.error = RequestError(status, message, error_id)
    self.scheduler.finish(request, "error")

  def _recover(self, error: Exception) -> list[Request]:
    """After a failed iteration: every running request rolled back to recompute, the iteration's requests to
    be run alone (or failed, if this iteration ran one alone), the KV pools rebuilt if the failure took them."""
    error_id = uuid.uuid4().hex[:12]
    self.num_failed_iterations += 1
    self._failed_iterations += 1
    logging.exception("engine iteration %d failed (error id %s)", self.num_iterations, error_id)
    message = f"the engine failed while serving this request (error id {error_id}): {type(error).__name__}: {error}"
    suspects = [r for r in {r.id: r for r in self._iteration_requests}.values() if r.status != Status.FINISHED]
    self._in_flight = None
    self._prompt_logprobs_in_flight = []
    finished = [r for r in self.requests.values() if r.status == Status.FINISHED]  # ended before the failure
    for request in list(self.scheduler.running):
      request.output[:] = [t for t in request.output if t != PLACEHOLDER]
      self.scheduler.preempt(request)
    self._state_slots.clear()
    self.states = self._fresh_states()
    blamed = []
    self.kv.allocator.clear_prefix_cache()  # blocks committed for the failed work may hold no KV: recompute them
    if self._ran_alone:  # a request failing alone twice in a row fails (once might be a transient fault)
      blamed = [r for r in suspects if self._failed_alone.pop(r.id, 0) >= 1]
      for r in suspects:
        if all(r is not b for b in blamed):
          self._failed_alone[r.id] = 1
          self._suspects.insert(0, r)
    elif self._failed_iterations > MAX_FAILED_ITERATIONS or (not suspects and self._failed_iterations > 1):
      blamed = [r for r in self.requests.values() if r.status != Status.FINISHED]
    else:
      self._suspects += [r for r in suspects if r.id not in {s.id for s in self._suspects}]
    if any(pool.is_deleted() for pool in self.kv.k + self.kv.v):  # donated to the failed call: the KV is gone
      logging.error("engine iteration failed after its KV pools were donated: every request with KV fails")
      self.kv.reset_pools()
      blamed = [r for r in self.requests.values() if r.status != Status.FINISHED]
      self._suspects = []
    for request in blamed:
      self._fail(request, 500, message, error_id)
      finished.append(request)
    return finished

  def leaks(self) -> list[str]:
    """What an idle engine still holds: requests, scheduled or in-flight work, KV sequences, referenced pages.
    Empty when every request has finished or failed and every retained KV was released; cached prefix blocks
    that nothing references count as free."""
    problems = []
    if self.requests:
      problems.append(f"{len(self.requests)} requests in the engine: {sorted(self.requests)[:8]}")
    if self.scheduler.waiting or self.scheduler.running:
      problems.append(f"scheduler: {len(self.scheduler.waiting)} waiting, {len(self.scheduler.running)} running")
    if self._in_flight:
      problems.append("sampled tokens in flight")
    held = self.kv.sequence_ids()
    if held:
      problems.append(f"KV held by {len(held)} sequences: {held[:8]}")
    if self.kv.allocator.num_free != self.kv.allocator.num_pages:
      problems.append(f"{self.kv.allocator.num_free} of {self.kv.allocator.num_pages} KV pages free")
    return problems

  @property
  def num_compiled_programs(self) -> int:
    """Programs compiled for this engine's model structure so far (one per distinct shape of a step)."""
    return sum(f._cache_size() for f in (self._run, self._run_mixed) if f is not None)

  def drop_compiled_programs(self) -> None:
    """Frees every compiled step program of this model structure (and the JIT code mappings they hold)."""
    for f in (self._run, self._run_mixed):
      if f is not None:
        f.clear_cache()

  @property
  def replicas(self) -> tuple[Engine, ...]:
    """The engines serving behind this one's interface: itself (`lwjax.serving.replicas.EngineReplicas` has
    several); what reads pools and schedulers (the server's metrics and WiM admission) reads them through this."""
    return (self,)

  def has_work(self) -> bool:
    """Requests queued or running, or sampled tokens not yet read back."""
    return self.scheduler.has_work() or bool(self._in_flight)

  def run_until_done(self) -> None:
    while self.has_work():
      self.step()

  def _dispatch(self, work: list[Work]):
    """Runs the iteration's decode rows and prefill chunks; returns [(sampling work, device tokens)]."""
    previous_tokens, previous_index = self._in_flight_tokens()
    if self.hybrid:  # state slots of requests no longer running (preempted, finished, fully sampled) become free
      running = {r.id for r in self.scheduler.running if not r.fully_sampled}
      for request_id in [i for i in self._state_slots if i not in running]:
        del self._state_slots[request_id]
    decodes = [w for w in work if len(w.tokens) == 1]
    chunks = [w for w in work if len(w.tokens) > 1]
    out = []
    # Chunks padded to the power of two that holds the longest (a 6-token prompt is not run as 64 tokens).
    chunk_width = _bucket(max((len(w.tokens) for w in chunks), default=1), self.prefill_chunk, MIN_CHUNK_WIDTH)
    groups = [(group, width) for group, width in ((decodes, 1), (chunks, chunk_width)) if group]
    # Logprobs only where a row asks for them (another program; none of their cost otherwise).
    num_logprobs = MAX_TOP_LOGPROBS if any(w.samples and w.request.params.logprobs is not None for w in work) else 0
    prompt_logprobs = any(self._wants_prompt_logprobs(w) for w in chunks)
    if self.mixed_batches and len(groups) > 1 and not prompt_logprobs:
      # Few shapes: a mixed program's shape would otherwise be the product of both groups' rows and page-table
      # buckets with the chunk width (hundreds of programs in a long WiM read, each holding ~200 memory maps of
      # JIT code while it is cached: the process reached vm.max_map_count). Both groups share one table width,
      # and the decode group always has all rows: a padded decode row costs one token.
      pages = max(self._table_pages(group) for group, _ in groups)
      prepared = [self._group_inputs(group, width, previous_index, pages, self._max_rows if width == 1 else None)
                  for group, width in groups]
      tokens, self.kv.k, self.kv.v = self._run_mixed(self.params, self.kv.k, self.kv.v, previous_tokens,
                                                     tuple(inputs for _, inputs in prepared), num_logprobs)
      out = [(sampling, group_tokens) for (sampling, _), group_tokens in zip(prepared, tokens, strict=True)]
      self.num_model_calls += 1
    else:
      out = [self._run_group(group, width, previous_tokens, previous_index, num_logprobs,
                             prompt_logprobs and width > 1) for group, width in groups]
      self.num_model_calls += len(groups)
    for sampling, _ in out:
      for w in sampling:
        w.request.output.append(PLACEHOLDER)
    return out

  def _in_flight_tokens(self):
    """The previous iteration's sampled tokens on device, and each request's index into them."""
    if not self._in_flight:  # on a mesh, placed as the sampled tokens are: one program for both (jit keys on it)
      return jnp.zeros((self._previous_size,), jnp.int32, device=self.shardings and self.shardings.replicated), {}
    index, arrays, size = {}, [], 0
    for sampling, sampled in self._in_flight:
      tokens = _tokens_of(sampled)
      for i, w in enumerate(sampling):
        index[w.request.id] = size + i
      arrays.append(tokens)
      size += tokens.shape[0]
    arrays.append(jnp.zeros((self._previous_size - size,), jnp.int32))
    return jnp.concatenate(arrays), index

  def _run_group(self, group: list[Work], width: int, previous_tokens, previous_index, num_logprobs: int = 0,
                 prompt_logprobs: bool = False):
    sampling, (tokens, source, slot_pages, slot_offsets, page_table, lengths, arrays, sample_rows, processing) = \
        self._group_inputs(group, width, previous_index)
    rows = tokens.shape[0]
    targets = None
    if prompt_logprobs:  # per column, the prompt token after it (left-padded rows, as the tokens)
      targets = np.zeros((rows, width), np.int32)
      for row, w in enumerate(group):
        following = w.request.tokens[w.start + 1:w.start + 1 + len(w.tokens)]
        targets[row, width - len(w.tokens):width - len(w.tokens) + len(following)] = following
    new_tokens, self.kv.k, self.kv.v, self.states = self._run(
        self.params, tokens, self.kv.k, self.kv.v, slot_pages, slot_offsets, page_table, lengths,
        previous_tokens, source, arrays, sample_rows, self.nano_batches, self.states,
        self._recurrent_rows(group, rows) if self.hybrid else None, num_logprobs, targets, processing)
    if prompt_logprobs:
      self._prompt_logprobs_in_flight.append((group, width, new_tokens["prompt"]))
    return sampling, new_tokens

  @staticmethod
  def _wants_prompt_logprobs(w: Work) -> bool:
    return w.request.params.prompt_logprobs is not None and w.start + 1 < len(w.request.prompt)

  def _record_prompt_logprobs(self) -> None:
    """Files the prompt logprobs of the chunks run so far: position p of the prompt gets the logprob of its token
    given the tokens before it (p >= 1)."""
    for group, width, (chosen, top_ids, top_logprobs) in self._prompt_logprobs_in_flight:
      chosen, top_ids, top_logprobs = np.asarray(chosen), np.asarray(top_ids), np.asarray(top_logprobs)
      for row, w in enumerate(group):
        request, k = w.request, w.request.params.prompt_logprobs
        if k is None or request.status == Status.FINISHED:
          continue
        first = width - len(w.tokens)
        for column in range(len(w.tokens)):
          position = w.start + column + 1  # the token this column's logits predict
          if position < len(request.prompt):
            request.prompt_logprobs[position] = (float(chosen[row, first + column]),
                                                 top_ids[row, first + column, :k].tolist(),
                                                 top_logprobs[row, first + column, :k].tolist())
    self._prompt_logprobs_in_flight = []

  def _padded_rows(self, n: int) -> int:
    return padded_rows(n, self.max_num_seqs, self.nano_batches)

  def _table_pages(self, group: list[Work]) -> int:
    """The page-table width a group needs: the pages of its longest row after this iteration, bucketed (or
    all pages, where the width costs nothing)."""
    if self._whole_tables:
      return self.max_pages
    used = max(-(-self.kv.length(w.request.id) // self.kv.page_size) for w in group)
    return _bucket(used, self.max_pages, MIN_TABLE_PAGES)

  def _group_inputs(self, group: list[Work], width: int, previous_index, pages: int | None = None,
                    rows: int | None = None):
    """The host arrays of one group of rows: (the works that sample, (tokens, placeholder sources, slot pages,
    slot offsets, page table, lengths, sampling arrays, sample rows, logit processing or None: `batch_processing`'s
    arrays and each sampled row's placeholder source)); `pages`: the page-table width, at least
    what the group needs (default: what it needs); `rows`: the rows, padded (default: a power of two)."""
    rows = rows or self._padded_rows(len(group))
    tokens = np.zeros((rows, width), np.int32)
    source = np.zeros((rows, width), np.int32)
    slot_pages = np.full((rows, width), self.kv.allocator.num_pages, np.int32)  # out of range: no write
    slot_offsets = np.zeros((rows, width), np.int32)
    for row, w in enumerate(group):
      n = len(w.tokens)
      tokens[row, width - n:] = w.tokens
      source[row, width - n:] = previous_index.get(w.request.id, 0)
      slot_pages[row, width - n:] = [p for p, _ in w.slots]
      slot_offsets[row, width - n:] = [o for _, o in w.slots]
    # The page table as wide as `_table_pages` says (attention reads the pages within each row's length only).
    table, lengths = self.kv.page_table([w.request.id for w in group], self.max_pages)
    pages = max(pages or 0, self._table_pages(group))
    page_table = np.zeros((rows, pages), np.int32)
    page_table[:len(group)] = table[:, :pages]
    all_lengths = np.zeros(rows, np.int32)
    all_lengths[:len(group)] = lengths
    sampling = [w for w in group if w.samples]
    sample_rows = np.zeros(rows, np.int32)  # static shape: rows past len(sampling) are ignored
    sample_rows[:len(sampling)] = [group.index(w) for w in sampling]
    # Rows past the sampling works repeat one (a group that samples nothing: one that processes its logits, if any,
    # so that its chunks run the program its last chunk will).
    filler = sampling[:1] or [next((w for w in group if uses_processing(w.request.params)), group[0])]
    padded = sampling + filler * (rows - len(sampling))
    requests = [w.request for w in padded]
    arrays = batch_arrays([r.params for r in requests], [r.seed for r in requests], [len(r.output) for r in requests])
    processing = batch_processing([r.params for r in requests], [r.prompt for r in requests],
                                  [r.output for r in requests], self.stop_ids, self.vocab_size)
    if processing is not None:
      processing["output_source"] = np.array([previous_index.get(r.id, 0) for r in requests], np.int32)
    return sampling, (tokens, source, slot_pages, slot_offsets, page_table, all_lengths, arrays, sample_rows,
                      processing)

  def _recurrent_rows(self, group: list[Work], rows: int):
    """Per row of a hybrid's batch: its state slot, whether its sequence starts here, its real tokens."""
    state_slots = np.full(rows, self.max_num_seqs, np.int32)  # padding rows: the spare slot
    fresh = np.zeros(rows, bool)
    num_new = np.zeros(rows, np.int32)
    for row, w in enumerate(group):
      request = w.request
      if request.id not in self._state_slots:
        used = set(self._state_slots.values())
        self._state_slots[request.id] = next(i for i in range(self.max_num_seqs) if i not in used)
      state_slots[row] = self._state_slots[request.id]
      fresh[row] = request.num_computed == len(w.tokens)  # this work feeds the sequence's first tokens
      num_new[row] = len(w.tokens)
    return state_slots, fresh, num_new

  def _resolve(self, dispatched) -> list[Request]:
    """Reads sampled tokens, replaces placeholders, streams them, and retires finished requests."""
    finished = []
    for sampling, sampled in dispatched or ():
      start = time.perf_counter()
      host_tokens = np.asarray(_tokens_of(sampled)).tolist()
      self.wait_seconds += time.perf_counter() - start
      if isinstance(sampled, dict):
        sampled = sampled["tokens"]
      logprobs = [np.asarray(a) for a in sampled[1]] if isinstance(sampled, tuple) else None
      for row, (w, token) in enumerate(zip(sampling, host_tokens, strict=False)):
        request = w.request
        if request.status == Status.FINISHED:
          continue  # the extra token of a request that finished one iteration late
        request.output[request.output.index(PLACEHOLDER)] = token
        if logprobs is not None and request.params.logprobs is not None:
          chosen, top_ids, top_logprobs = logprobs
          k = request.params.logprobs
          request.logprobs.append((float(chosen[row]), top_ids[row, :k].tolist(), top_logprobs[row, :k].tolist()))
        if request.on_token is not None:
          try:
            request.on_token(request, token)
          except Exception as e:  # noqa: BLE001 - its consumer failed: that request alone ends
            logging.exception("on_token of request %d raised", request.id)
            self._fail(request, 500, f"streaming the output failed: {type(e).__name__}: {e}")
            finished.append(request)
            continue
        if self._finished(request):
          finished.append(request)
    return finished

  def _finished(self, request: Request) -> bool:
    """Applies the stop rules to the resolved tokens; a finished request drops any in-flight extra token. None
    applies before `min_tokens` tokens (vLLM's; the sampler masked the stop ids until then); a token that stops
    is kept in the output, not in the text (vLLM's)."""
    resolved = len(request.output) - (request.output[-1] == PLACEHOLDER)
    output, params = request.output[:resolved], request.params
    reason, text = None, None
    if resolved <= params.min_tokens:
      pass
    elif output[-1] in params.stop_token_ids or (output[-1] in self.stop_ids and not params.ignore_eos):
      reason = "stop"
      if self.detokenize is not None:
        text = self.detokenize(output[:-1])
    elif params.stop and self.detokenize is not None:
      request.text = self.detokenize(output)
      # A stop string counts where it ends past the text of the first min_tokens tokens.
      held = len(self.detokenize(output[:params.min_tokens])) if params.min_tokens else 0
      hits = [i for i in (request.text.find(s, max(0, held - len(s) + 1)) for s in params.stop) if i >= 0]
      if hits:
        reason, text = "stop", request.text[:min(hits)]
    if reason is None and resolved >= params.max_tokens:
      reason = "length"
    if reason is not None:
      del request.output[resolved:]
      self.scheduler.finish(request, reason)
      if self.detokenize is not None:
        request.text = text if text is not None else self.detokenize(output)
      logging.debug("request %d finished (%s) after %d tokens", request.id, reason, resolved)
    return reason is not None


class LLM:
  """Offline batches: `LLM(model, tokenizer=...).generate(prompts, SamplingParams(...))`."""

  def __init__(self, model: GPT, *, tokenizer=None, **engine_kwargs):
    self.tokenizer = tokenizer
    if tokenizer is not None:
      engine_kwargs.setdefault("eos_id", tokenizer.eos_id)
      engine_kwargs.setdefault("stop_ids", getattr(tokenizer, "eos_ids", ()))
      engine_kwargs.setdefault("detokenize", tokenizer.decode)
    self.engine = Engine(model, **engine_kwargs)

  def generate(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams = DEFAULT_PARAMS
               ) -> list[list[Request]]:
    """For each prompt, its `params.n` finished requests (`.output` tokens, `.text`, `.finish_reason`)."""
    batches = []
    for prompt in prompts:
      tokens = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
      if isinstance(prompt, str) and getattr(self.tokenizer, "bos_id", None) is not None:
        tokens = [self.tokenizer.bos_id] + tokens
      seeds = [None] * params.n if params.seed is None else [params.seed + i for i in range(params.n)]
      batches.append([self.engine.add_request(tokens, _with_seed(params, s)) for s in seeds])
    self.engine.run_until_done()
    return batches


def _with_seed(params: SamplingParams, seed: int | None) -> SamplingParams:
  return dataclasses.replace(params, seed=seed, n=1)
