"""Retry data: solutions with wrong steps taken back by [BACK] (Physics of LMs 2.2, Results 2-6; retry_weak, Result 8).

Before each step, with probability `retry_rate`, the writer first starts a wrong step, "Define <param>
as", then writes the marker and goes on with the right step:

  ... Define Film Studio's Backpack as [BACK]. Define Film Studio's School Daypack as g; so g = ...

The wrong parameter is one that cannot be computed yet (some dependency has no step so far), drawn
uniformly from all parameters of the problem; with `retry_weak` it is drawn from the parameters of the
later steps instead, which needs no dependency graph (the paper's cheap "fake mistakes"; such a
parameter may in fact be ready). The paper finds masking the wrong steps out of the loss unnecessary;
`wrong_step_spans` and `loss_mask_segments` give the spans to mask for that ablation: each wrong step up to
the marker, while the marker itself stays trained so that the model learns to take a step back.
"""

from __future__ import annotations

import dataclasses
import random
from typing import TYPE_CHECKING

from lwjax.data.igsm import compact, graph
from lwjax.data.igsm.solution import join_sentences, sentences, solution_steps

if TYPE_CHECKING:
  from lwjax.data.igsm.problem import Problem

BACK = "[BACK]"


@dataclasses.dataclass(frozen=True)
class RetrySolution:
  """`masked_spans`: [start, end) character spans of the wrong steps, markers excluded."""
  text: str
  masked_spans: tuple[tuple[int, int], ...]
  num_retries: int


def write_retry_solution(problem: Problem, rng: random.Random, retry_rate: float,
                         retry_weak: bool = False) -> RetrySolution:
  """The shortest solution of `problem` with a wrong step and BACK before each step w.p. `retry_rate`."""
  if not 0.0 <= retry_rate <= 1.0:
    raise ValueError(f"retry_rate={retry_rate}: expected a probability in [0, 1]")
  s, rules = problem.structure, problem.rules
  steps = solution_steps(problem)
  written, done = [], set()
  for index, (p, text) in enumerate(steps):
    if rng.random() < retry_rate:
      if retry_weak:
        wrong = [q for q, _ in steps[index + 1:]]
      else:
        wrong = [q for q in s.params if q not in done
                 and not all(d in done for d in graph.dependencies(q, s, rules))]
      if wrong:
        written.append(f"Define {s.name(rng.choice(wrong))} as {BACK}")
    written.append(text)
    done.add(p)
  text = join_sentences(written, problem.answer)
  if problem.fmt == "compact":
    text = compact.to_compact(problem, text)
  spans = wrong_step_spans(text)
  return RetrySolution(text, tuple(spans), len(spans))


def wrong_step_spans(text: str) -> list[tuple[int, int]]:
  """[start, end) of each wrong step of a solution text: from the sentence start up to its BACK marker."""
  spans = []
  for start, sentence in sentences(text):
    if BACK in sentence:
      spans.append((start, start + len(sentence[:sentence.index(BACK)].rstrip())))
  return spans


def loss_mask_segments(text: str) -> list[tuple[str, bool]]:
  """`text` cut into (piece, trained) segments, the wrong steps untrained; the pieces concatenate to `text`,
  so a tokenizer that encodes them one by one gets a per-token loss mask."""
  segments, at = [], 0
  for start, end in wrong_step_spans(text):
    segments += [(text[at:start], True), (text[start:end], False)]
    at = end
  segments.append((text[at:], True))
  return [(piece, trained) for piece, trained in segments if piece]
