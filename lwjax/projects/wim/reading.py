"""Documents read three ways on one serving engine, same model, same documents (Writing in the Margins, arXiv
2408.14906, §3-4), whatever the prompts: the generated tasks' symbolic ones or the paper's chat prompts on a
published set.

- WiM (`lwjax.serving.wim`): segment by segment with margins, relevance requests, the answer from the context and
  the kept margins;
- full context: the whole document in one prefill, then the answer;
- retrieval-only: the segments whose margins WiM's classifier kept, without margins, then the answer.

Compute per document: tokens prefilled and decoded. Retrieval-only is charged WiM's segment and margin turns (it
needs them to choose) plus its own answer request, less WiM's answer turn.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import numpy as np

from lwjax.serving import wim
from lwjax.serving.sampling import SamplingParams

METHODS = ("wim", "full", "retrieval")


@dataclasses.dataclass(frozen=True)
class Reading:
  """One document as the engine reads it (token ids)."""
  head: list[int]  # what the context starts with: bos, or a chat model's system turn and the excerpt's opening
  segments: list[list[int]]  # the context, segment by segment
  query: str
  direct: list[int]  # what follows the context when answering without margins


@dataclasses.dataclass
class Outputs:
  runs: list[wim.WiMRequest]
  answers: dict[str, list[list[int]]]  # per method, per document: the answer's tokens (as generated)
  prefill: dict[str, list[int]]
  decode: dict[str, list[int]]
  wim_seconds: float


def read_three(engine, docs: Sequence[Reading], prompts: wim.WiMPrompts, *, margin_params: SamplingParams,
               classify_params: SamplingParams, answer_params: SamplingParams, pool_tokens: int,
               margin_tokens: int) -> Outputs:
  """The three methods on `docs` (`pool_tokens`: the engine's KV pool, in tokens)."""
  start = time.perf_counter()
  runs = [wim.WiMRequest(engine, d.segments, d.query, prompts, margin_params=margin_params,
                         classify_params=classify_params, answer_params=answer_params) for d in docs]
  # A document keeps its context's KV between its turns: start as many at once as half the pool holds (the
  # rest is for the margins, the classifications and preemption), not all of them.
  per_doc = max(sum(map(len, r.segments)) for r in runs) + margin_tokens + 64
  wave = max(1, pool_tokens // (2 * per_doc))
  for first in range(0, len(runs), wave):
    for run, d in zip(runs[first:first + wave], docs[first:first + wave], strict=True):
      run.segments[0] = d.head + run.segments[0]
      run.start()
    engine.run_until_done()
  wim_seconds = time.perf_counter() - start
  # Full context, and retrieval-only over the segments WiM kept, as ordinary requests in one batch.
  full = [engine.add_request(d.head + [i for s in d.segments for i in s] + d.direct, answer_params) for d in docs]
  chosen = [[i for s, m in zip(d.segments, run.margins, strict=True) if m.relevant for i in s]
            for d, run in zip(docs, runs, strict=True)]
  retrieval = [engine.add_request(d.head + c + d.direct, answer_params) for c, d in zip(chosen, docs, strict=True)]
  engine.run_until_done()
  answer_cost = [(len(prompts.answer(d.query, [m.tokens for m in r.margins if m.relevant])), len(r.answer or []) + 1)
                 for d, r in zip(docs, runs, strict=True)]
  return Outputs(
      runs=runs,
      answers={"wim": [r.answer or [] for r in runs], "full": [q.output for q in full],
               "retrieval": [q.output for q in retrieval]},
      prefill={"wim": [r.stats.prefill_tokens for r in runs], "full": [len(q.prompt) for q in full],
               "retrieval": [r.stats.prefill_tokens - a + len(q.prompt)
                             for r, (a, _), q in zip(runs, answer_cost, retrieval, strict=True)]},
      decode={"wim": [r.stats.decode_tokens for r in runs], "full": [len(q.output) for q in full],
              "retrieval": [r.stats.decode_tokens - o + len(q.output)
                            for r, (_, o), q in zip(runs, answer_cost, retrieval, strict=True)]},
      wim_seconds=wim_seconds)


def summary(scores, prefill, decode) -> dict:
  """Mean score ± standard error over documents, and the mean compute per document."""
  scores = np.asarray(scores, float)
  return {"score": float(scores.mean()), "se": float(scores.std(ddof=1) / np.sqrt(len(scores))) if len(scores) > 1
          else 0.0, "prefill_tokens": float(np.mean(prefill)), "decode_tokens": float(np.mean(decode))}
