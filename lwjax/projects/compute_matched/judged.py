"""The false-positive rate as an LLM judge sees it, at every sampling budget (Smaller, Weaker, Yet Better, arXiv
2408.16737, §3.1: the paper has Gemini and humans judge 50 right-answer solutions of each source).

GSM8K and MATH have no step checker, so the share of answer-filtered training data whose reasoning is wrong is
asked of a judge (`lwjax.judge`, any OpenAI-compatible endpoint, `config.judge`). At each budget, each source's
right-answer candidates among its first k samples per problem are its filtered data; `judge.max_candidates` of
them are drawn at random and judged, and the rate is reported with its standard error and n.

The draws are nested: one seeded order of a source's candidates, and at each budget the first
`max_candidates` of that order that the budget's data holds. A candidate judged at one budget is the same
request at the next (the answers are cached under `candidates.dir`), so the budgets cost far fewer requests
than budgets x max_candidates, and the rates of neighbouring budgets share most of their sample.

On compact iGSM the judge is measured against the exact checker on the same candidates (its agreement).
"""

from __future__ import annotations

import json
import logging
import os
import random

import jax

from lwjax import judge as judge_lib

SOURCES = ("wc", "se")


def _picked(problems: list[dict], k: int, order: list[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
  """(problem position, candidate index) of the first `limit` right-answer candidates, in `order`, among the
  first k of each problem; sorted."""
  chosen = []
  for p, i in order:
    if i < k and problems[p]["candidates"][i]["answer_correct"]:
      chosen.append((p, i))
      if len(chosen) == limit:
        break
  return sorted(chosen)


def false_positive_rates(config, task, sets: dict, budget_rows: list[dict], workdir: str) -> list[dict] | None:
  """For each budget row ({"budget": {"se": k_se, "wc": k_wc}}): {"budget", "se": summary, "wc": summary}, each
  summary `judge.summary` of the judged candidates plus `samples_per_problem` and `kept` (the right-answer
  candidates at that budget). The judged candidates, verdicts and answers go to `<workdir>/judged.jsonl`. None
  without `judge.base_url`, and on every process but the first."""
  j = config.judge
  if not j.base_url or jax.process_index() != 0:
    return None
  judge = judge_lib.Judge.from_config(j, cache_path=os.path.join(config.candidates.dir, "judge_answers.jsonl"))
  rng, out, lines = random.Random(config.seed), [{"budget": row["budget"]} for row in budget_rows], []
  for source in SOURCES:
    problems = sets[source]
    order = [(p, i) for p, problem in enumerate(problems) for i in range(len(problem["candidates"]))]
    rng.shuffle(order)
    picks = [_picked(problems, row["budget"][source], order, j.max_candidates) for row in budget_rows]
    union = sorted({pick for chosen in picks for pick in chosen})
    pick_sets = [set(chosen) for chosen in picks]
    judgements = dict(zip(union, judge.judge([(problems[p]["record"]["question"], problems[p]["record"]["solution"],
                                                problems[p]["candidates"][i]["text"]) for p, i in union]),
                          strict=True))
    for row, result, chosen in zip(budget_rows, out, picks, strict=True):
      k = row["budget"][source]
      exact = [problems[p]["candidates"][i]["correct"] for p, i in chosen] if task.step_checker else None
      kept = sum(c["answer_correct"] for problem in problems for c in problem["candidates"][:k])
      result[source] = {"samples_per_problem": k, "kept": kept,
                        **judge_lib.summary([judgements[pick] for pick in chosen], exact)}
      s = result[source]
      logging.info("judged FPR of %s data at %d samples per problem: %.3f ± %.3f (n=%d of %d kept, %d unread)%s",
                   source.upper(), k, s["false_positive_rate"], s["false_positive_rate_se"], s["n"], kept,
                   s["unparsed"], f"; exact {s['exact_false_positive_rate']:.3f}, agreement {s['agreement']:.3f}"
                   if exact is not None else "")
    lines += [{"source": source, "problem": problems[p]["index"], "candidate": i,
               "verdict": judgements[(p, i)].verdict, "answer": judgements[(p, i)].text,
               "budgets": [row["budget"][source] for row, chosen in zip(budget_rows, pick_sets, strict=True)
                           if (p, i) in chosen],
               **({"exact": problems[p]["candidates"][i]["correct"]} if task.step_checker else {})}
              for p, i in union]
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "judged.jsonl"), "w") as f:
    f.writelines(json.dumps(line) + "\n" for line in lines)
  return out
