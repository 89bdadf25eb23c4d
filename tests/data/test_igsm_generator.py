"""iGSM generator: exact op counts and answers against independent references, splits, formats, determinism."""

import collections
import json
import os
import random
import re
import subprocess
import sys

import pytest

from lwjax.data import igsm

CASES = [(preset, op, seed) for preset, top in (("med", 23), ("hard", 21), ("small", 5))
         for op in range(1, top + 1)
         for seed in range(3)]


def _children(problem):
  children = collections.defaultdict(list)
  for layer, item, child in problem.structure.edges:
    children[layer, item].append(child)
  return children


def reference_values(problem):
  """Values straight from the edges and rules, by recursion, without the library's graph code."""
  children, memo = _children(problem), {}

  def value(kind, layer, item, target):
    key = (kind, layer, item, target)
    if key not in memo:
      if kind == "inst":
        deps, combine, modifier, const = problem.rules[key]
        if not deps:
          result = const
        else:
          terms = [value(*d) for d in deps]
          result = terms[0] - terms[1] if combine == "diff" else sum(terms)
          result = const + result if modifier == "more" else const * result if modifier == "times" else result
      else:
        result = sum(value("inst", layer, item, c) * (1 if target == layer + 1 else value("abs", layer + 1, c, target))
                     for c in children[layer, item])
      memo[key] = result % 23
    return memo[key]

  return value


def reference_needed_and_ops(problem):
  """The parameters the question needs (breadth-first search from the question) and their operations."""
  children = _children(problem)

  def deps_and_ops(p):
    kind, layer, item, target = p
    if kind == "inst":
      deps, _, modifier, _ = problem.rules[p]
      return list(deps), (len(deps) - 1 + (modifier != "none")) if deps else 0
    counts = [("inst", layer, item, c) for c in children[layer, item]]
    if target == layer + 1:
      return counts, len(counts) - 1
    return counts + [("abs", layer + 1, c, target) for c in children[layer, item]], 2 * len(counts) - 1

  needed, queue, ops = set(), collections.deque([tuple(problem.query)]), 0
  while queue:
    p = queue.popleft()
    if p in needed:
      continue
    needed.add(p)
    deps, count = deps_and_ops(p)
    ops += count
    queue.extend(tuple(d) for d in deps)
  return needed, ops


@pytest.mark.parametrize("preset", ["med", "hard", "small"])
def test_op_and_answer_match_independent_references(preset):
  for _, op, seed in [c for c in CASES if c[0] == preset]:
    problem = igsm.generate(op=op, seed=seed, preset=preset)
    needed, ops = reference_needed_and_ops(problem)
    assert problem.op == ops == op, (op, seed)
    # The written solution: one step per needed parameter, two operator signs per operation.
    assert {tuple(p) for p in problem.solution_order} == needed
    assert len(re.findall(r" [-+*] ", problem.solution)) == 2 * op
    assert problem.answer == reference_values(problem)(*problem.query)
    assert problem.solution.endswith(f"Answer: {problem.answer}.")
    assert problem.ip == len(problem.structure.edges) <= igsm.PRESETS[preset].max_ip


def test_statement_states_every_instance_parameter_once():
  for preset, op, seed in CASES[::5]:
    problem = igsm.generate(op=op, seed=seed, preset=preset)
    s = problem.structure
    assert sorted(problem.statement_order) == sorted(s.instance_params)
    assert problem.statement.count("The number of each ") == problem.ip
    for p in s.instance_params:
      assert problem.statement.count(f"The number of each {s.name(p)} equals") == 1
    assert 2 <= len(s.items) <= 4 and all(2 <= len(items) <= 4 for items in s.items)
    # Every item above the last layer holds items, every item below the first is held.
    assert {(layer, item) for layer, item, _ in s.edges} == {
        (layer, item) for layer in range(len(s.items) - 1) for item in range(len(s.items[layer]))}
    assert {(layer + 1, child) for layer, _, child in s.edges} == {
        (layer, item) for layer in range(1, len(s.items)) for item in range(len(s.items[layer]))}


def test_formats_share_the_problem():
  pq = igsm.generate(op=9, seed=4, fmt="pq")
  qp = igsm.generate(op=9, seed=4, fmt="qp")
  assert pq.statement == qp.statement and pq.solution == qp.solution
  assert pq.question == f"{pq.statement} {pq.query_text}" and qp.question == f"{qp.query_text} {qp.statement}"
  assert qp.question.startswith("How many ") and pq.question.endswith(" have?")


def test_train_and_test_templates_are_disjoint():
  templates = {}
  for split in ("train", "test"):
    problems = [igsm.generate(op=op, seed=seed, split=split) for op in (1, 2, 3) for seed in range(40)]
    assert all(p.split == split and (p.template_hash < 16) == (split == "train") for p in problems)
    templates[split] = collections.Counter(p.template for p in problems)
  assert not set(templates["train"]) & set(templates["test"])
  # Templates recur (small ops have few), so disjointness is a real constraint, not a given.
  assert max(templates["train"].values()) > 1 and max(templates["test"].values()) > 1
  # Templates abstract names and numbers away: they never mention them.
  problem = igsm.generate(op=5, seed=0)
  assert not any(name in problem.template for items in problem.structure.items for name in items)


def test_deterministic_for_a_seed_and_different_across_seeds():
  a, b = igsm.generate(op=11, seed=7, preset="hard"), igsm.generate(op=11, seed=7, preset="hard")
  assert a.to_json() == b.to_json() and a.question == b.question and a.solution == b.solution
  assert len({igsm.generate(op=11, seed=s).question for s in range(10)}) == 10


def test_same_text_in_a_process_with_another_hash_seed():
  code = ("from lwjax.data import igsm; p = igsm.generate(op=14, seed=3, preset='hard', split='test');"
          "print(p.question); print(p.solution)")
  hash_seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"  # str hashes (set orders) differ
  output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONHASHSEED": hash_seed}).stdout
  problem = igsm.generate(op=14, seed=3, preset="hard", split="test")
  assert output == f"{problem.question}\n{problem.solution}\n"


def test_json_round_trip():
  problem = igsm.generate(op=13, seed=2, fmt="qp", split="test")
  back = igsm.Problem.from_json(json.loads(json.dumps(problem.to_json())))
  assert back == problem
  assert (back.question, back.solution, back.answer, back.op, back.split) == (
      problem.question, problem.solution, problem.answer, problem.op, problem.split)


def test_train_op_law_and_validation():
  rng = random.Random(0)
  ops = [igsm.sample_train_op(rng, "med") for _ in range(2000)]
  assert min(ops) == 1 and max(ops) == 15 and ops.count(1) > ops.count(15)
  with pytest.raises(ValueError, match="preset"):
    igsm.generate(op=3, preset="easy")
  with pytest.raises(ValueError, match="fmt"):
    igsm.generate(op=3, fmt="pqp")
  with pytest.raises(ValueError, match="split"):
    igsm.generate(op=3, split="val")
  with pytest.raises(ValueError, match="op"):
    igsm.generate(op=0)
