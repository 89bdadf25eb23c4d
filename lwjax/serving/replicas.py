"""Data-parallel serving: independent engine replicas behind one front (the data parallelism of vLLM and SGLang
servers, beside the tensor parallelism NanoFlow, arXiv 2408.12757, §6, serves a large model with).

A mesh (data, fsdp=1, tensor) is cut along `data` into sub-meshes of `tensor` devices (`replica_meshes`); each
holds one `Engine`, tensor parallel over its devices, with its own copy of the weights, KV pool, scheduler and
prefix cache. Replicas share nothing on the device, so nothing crosses `data`: each iteration's collectives stay
inside a replica's `tensor` group.

Dispatch is least-loaded, not round-robin: a request goes to the replica with the fewest tokens still to compute
(prompt tokens not yet in its KV cache plus output tokens max_tokens still allows; ties to the lowest index, so a
burst of equal requests alternates). Request sizes in the serving traces differ by two orders of magnitude, and
round-robin would let one replica queue the long ones while another idles. The count is a proxy: a prefill token
costs less than a decode token on an accelerator, and a request may stop at eos long before max_tokens. Not done:
routing by cached prefix (SGLang's cache-aware router), so a conversation's next turn may land on a replica
without its KV. A continuation (`parent=`) always runs on its parent's replica, where the KV it shares lies.

`step` runs one iteration of each replica with work in turn, on the calling thread: with asynchronous scheduling
an iteration is dispatched before the previous one's tokens are read, so one replica's device work runs while the
host waits on another's. The replicas draw request ids from one counter: ids, and the seeds of requests that set
none, are those one engine would give, so a request's tokens do not depend on the replica it lands on.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence

from jax.sharding import Mesh

from lwjax.serving import tensor_parallel
from lwjax.serving.engine import DEFAULT_PARAMS, Engine
from lwjax.serving.sampling import SamplingParams
from lwjax.serving.scheduler import Request

REPLICA_AXIS = "data"


def check_mesh(sizes: Mapping[str, int]) -> None:
  """ConfigError unless a mesh of axis `sizes` is replicas over `data`, each split over `tensor` alone."""
  tensor_parallel.check_mesh({axis: 1 if axis == REPLICA_AXIS else size for axis, size in sizes.items()})


def replica_meshes(mesh: Mesh) -> list[Mesh]:
  """The sub-meshes (data=1, fsdp, tensor) of `mesh`'s rows along `data`: replica i gets the i-th `tensor` group."""
  check_mesh(mesh.shape)
  axis = mesh.axis_names.index(REPLICA_AXIS)
  return [Mesh(mesh.devices.take([i], axis=axis), mesh.axis_names) for i in range(mesh.shape[REPLICA_AXIS])]


class EngineReplicas:
  """Engines behind the interface of one (`add_request`, `step`, `cancel`, ...): what the server, WiM and the
  benchmarks use of an `Engine`; pools and schedulers are read per replica through `replicas`."""

  def __init__(self, engines: Sequence[Engine]):
    if not engines:
      raise ValueError("engines: none (valid: at least one Engine)")
    self.replicas = tuple(engines)
    first = self.replicas[0]
    self.vocab_size, self.eos_id, self.stop_ids = first.vocab_size, first.eos_id, first.stop_ids
    self.max_model_len, self.detokenize = first.max_model_len, first.detokenize

  @classmethod
  def build(cls, model, mesh: Mesh, offload: Callable[[int], object] | None = None, **engine_kwargs
            ) -> EngineReplicas:
    """One `Engine(model, mesh=<its sub-mesh>, **engine_kwargs)` per row of `mesh` along `data` (the model's
    weights copied onto each; already there where the model was loaded onto `mesh`, replicated over `data`), replica
    i with its own KV offload store `offload(i)` when given."""
    ids = itertools.count()
    return cls([Engine(model, mesh=sub, request_ids=ids, offload=offload(i) if offload else None, **engine_kwargs)
                for i, sub in enumerate(replica_meshes(mesh))])

  # -- requests --

  def add_request(self, prompt: Sequence[int], params: SamplingParams = DEFAULT_PARAMS, on_token=None, *,
                  on_finish=None, parent: Request | None = None, keep: int | None = None,
                  retain_kv: bool = False) -> Request:
    """`Engine.add_request` on the least-loaded replica, or on the parent's for a continuation."""
    engine = self._holding(parent) if parent is not None else self.least_loaded()
    if engine is None:  # the parent's KV is gone: its replica's own check says why
      engine = self.replicas[0]
    return engine.add_request(prompt, params, on_token, on_finish=on_finish, parent=parent, keep=keep,
                              retain_kv=retain_kv)

  def least_loaded(self) -> Engine:
    return min(self.replicas, key=outstanding_tokens)

  def check_params(self, params: SamplingParams) -> None:
    self.replicas[0].check_params(params)

  def check_length(self, prompt_tokens: int, max_tokens: int, field: str = "prompt") -> None:
    self.replicas[0].check_length(prompt_tokens, max_tokens, field)  # every replica has the same sizes

  def cancel(self, request_id: int) -> None:
    for engine in self.replicas:
      engine.cancel(request_id)  # a no-op where the id is not the engine's

  def fail_request(self, request: Request, status: int, message: str, error_id: str = "") -> None:
    engine = next((e for e in self.replicas if request.id in e.requests), None)
    if engine is not None:
      engine.fail_request(request, status, message, error_id)

  def release(self, request: Request) -> None:
    engine = self._holding(request)
    (engine or self.replicas[0]).release(request)

  def _holding(self, request: Request) -> Engine | None:
    """The replica whose KV cache holds `request`'s sequence."""
    return next((e for e in self.replicas if request.id in e.kv), None)

  @property
  def requests(self) -> dict[int, Request]:
    return {rid: r for engine in self.replicas for rid, r in engine.requests.items()}

  # -- iterations --

  def step(self) -> list[Request]:
    """One iteration of every replica with work; the requests that finished in them."""
    finished = []
    for engine in self.replicas:
      if engine.has_work():
        finished += engine.step()
    return finished

  def has_work(self) -> bool:
    return any(engine.has_work() for engine in self.replicas)

  def run_until_done(self) -> None:
    while self.has_work():
      self.step()

  def leaks(self) -> list[str]:
    return [f"replica {i}: {problem}" for i, engine in enumerate(self.replicas) for problem in engine.leaks()]

  # -- counters, summed over the replicas --

  @property
  def num_iterations(self) -> int:
    return sum(e.num_iterations for e in self.replicas)

  @property
  def num_model_calls(self) -> int:
    return sum(e.num_model_calls for e in self.replicas)

  @property
  def num_failed_iterations(self) -> int:
    return sum(e.num_failed_iterations for e in self.replicas)

  @property
  def host_seconds(self) -> float:
    return sum(e.host_seconds for e in self.replicas)

  @property
  def num_compiled_programs(self) -> int:
    return sum(e.num_compiled_programs for e in self.replicas)


def outstanding_tokens(engine: Engine) -> int:
  """Tokens `engine` has still to compute for its requests: prompt tokens not in its KV cache, and the output
  tokens max_tokens still allows."""
  return sum(max(0, len(r.prompt) - r.num_computed) + max(0, r.params.max_tokens - len(r.output))
             for r in engine.requests.values())
