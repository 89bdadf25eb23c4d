"""Fault injection for the serving engine (NanoFlow §4 engine): an `Engine` that fails where it is told, to show
that a failure ends only the requests it belongs to and that nothing leaks (tests, and a deployment's own
chaos checks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from lwjax.serving.engine import Engine
from lwjax.serving.scheduler import Request


class InjectedFault(RuntimeError):
  """Raised by `FaultInjectingEngine` where it was told to fail."""


class FaultInjectingEngine(Engine):
  """An `Engine` whose iterations raise `InjectedFault`:

  - `fail_iterations`: at these iteration numbers (`num_iterations` when the iteration starts), once each;
  - `fail_request_if(request) -> bool`: in every iteration that runs work of a request it picks (e.g. by a marker in
    its prompt): a request the engine cannot serve, failing wherever it goes;
  - `where`: "before" the model call (host-side preparation) or "after" it (the device ran, its tokens are
    in flight);
  - `lose_kv`: the KV pools' buffers are deleted first, as when a call that took them (donated) failed.
  """

  def __init__(self, model, *, fail_iterations: Iterable[int] = (),
               fail_request_if: Callable[[Request], bool] | None = None, where: str = "before", lose_kv: bool = False,
               **engine_kwargs):
    if where not in ("before", "after"):
      raise ValueError(f"where: {where!r} (valid: 'before', 'after')")
    super().__init__(model, **engine_kwargs)
    self.fail_iterations = set(fail_iterations)
    self.fail_request_if, self.where, self.lose_kv = fail_request_if, where, lose_kv
    self.num_injected = 0

  def _dispatch(self, work):
    picked = [w.request.id for w in work if self.fail_request_if is not None and self.fail_request_if(w.request)]
    due = self.num_iterations in self.fail_iterations
    if not (picked or due):
      return super()._dispatch(work)
    self.fail_iterations.discard(self.num_iterations)
    out = super()._dispatch(work) if self.where == "after" else None
    self.num_injected += 1
    if self.lose_kv:
      for pool in self.kv.k + self.kv.v:
        pool.delete()
    raise InjectedFault(f"injected at iteration {self.num_iterations}" + (f" for requests {picked}" if picked else "")
                        + (f" after dispatching {len(out)} groups" if out is not None else ""))
