"""Batched greedy decoding with the KV cache, scored by the iGSM step checker (Physics of LMs 2.2, Sec. 2 metrics).

Per op: full-solution accuracy (every step right, `igsm.check`), answer accuracy, the rate of [BACK] at
inference (share of solutions with at least one retry, and retries per solution), the length of the
generated solutions in steps (retries removed) relative to the shortest solution, over those with the
right answer, and the accuracy of always answering the most frequent answer of the same problems (the
constant-answer baseline).
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from lwjax.data import igsm


def make_greedy_decoder(graphdef, *, prompt_len: int, max_new_tokens: int):
  """A jitted `decode(params, prompts_bp, lengths_b) -> tokens [b, max_new_tokens]`: the prompts
  (right-padded to `prompt_len`) prefilled in one ragged batch, then greedy decode steps under `lax.scan`."""

  @jax.jit
  def decode(params, prompts_bp, lengths_b):
    model = nnx.merge(graphdef, params)
    batch = prompts_bp.shape[0]
    cache = model.init_cache(batch, prompt_len + max_new_tokens)
    logits, cache = model.prefill(prompts_bp, cache, num_new=lengths_b)
    first = jnp.argmax(logits[jnp.arange(batch), lengths_b - 1], -1).astype(jnp.int32)

    def step(carry, _):
      token, cache = carry
      logits, cache = model.decode_step(token, cache)
      return (jnp.argmax(logits, -1).astype(jnp.int32), cache), token
    _, tokens_nb = jax.lax.scan(step, (first, cache), None, length=max_new_tokens)
    return tokens_nb.T

  return decode


def generate_solutions(decode, params, tokenizer, questions: list[str], *, prompt_len: int,
                       batch_size: int) -> list[str]:
  """Greedy solutions of `questions`, cut at the first eos; fixed batch shape, so one compilation."""
  solutions = []
  for start in tqdm(range(0, len(questions), batch_size), desc="greedy decode", unit="batch"):
    chunk = questions[start:start + batch_size]
    prompts = np.zeros((batch_size, prompt_len), np.int32)
    lengths = np.ones(batch_size, np.int32)
    for i, question in enumerate(chunk):
      ids = [tokenizer.bos_id] + tokenizer.encode(question)
      if len(ids) > prompt_len:
        raise ValueError(f"a question of {len(ids)} tokens exceeds prompt_len={prompt_len}")
      prompts[i, :len(ids)], lengths[i] = ids, len(ids)
    tokens = np.asarray(decode(params, prompts, lengths))
    for row in tokens[:len(chunk)]:
      ends = np.flatnonzero(row == tokenizer.eos_id)
      solutions.append(tokenizer.decode(row[:ends[0]] if len(ends) else row).strip())
  return solutions


def _prefix(verdict) -> int:
  """Steps written right before the first error (all of them when the solution is correct)."""
  return verdict.num_steps if verdict.correct else verdict.first_error


def score(records: list[dict], solutions: list[str]) -> dict[str, dict[str, float]]:
  """Checker metrics per op (keys "op<k>") and over all records ("all")."""
  groups = collections.defaultdict(list)
  for record, solution in zip(records, solutions, strict=True):
    problem = igsm.problem_of(record)
    groups[f"op{record['op']}"].append((record, igsm.check(problem, solution), len(problem.solution_order)))
  groups["all"] = [item for key in list(groups) for item in groups[key]]
  metrics = {}
  for key, items in groups.items():
    verdicts = [v for _, v, _ in items]
    answers = collections.Counter(r["answer"] for r, _, _ in items)
    ratios = [v.num_steps / shortest for _, v, shortest in items if v.answer_correct]
    metrics[key] = {
        "n": len(items),
        "accuracy": float(np.mean([v.correct for v in verdicts])),
        "answer_accuracy": float(np.mean([v.answer_correct for v in verdicts])),
        "constant_answer_accuracy": answers.most_common(1)[0][1] / len(items),
        "back_rate": float(np.mean([v.num_retries > 0 for v in verdicts])),
        "retries_per_solution": float(np.mean([v.num_retries for v in verdicts])),
        "length_vs_shortest": float(np.mean(ratios)) if ratios else float("nan"),
        # Partial credit: the share of the shortest solution's steps written right before the first error.
        "correct_prefix": float(np.mean([min(_prefix(v), shortest) / shortest for _, v, shortest in items])),
    }
  return metrics
