"""The iGSM problem generator with the op count controlled exactly (Physics of LMs 2.1, Sec. 2).

A draw: (1) a structure graph, sized as in the official generator: d layers and widths w0 <= w <= w1
from {2, 3, 4} with softmax weights that move towards larger graphs as op grows, and ip = the number of
edges, the minimum of two uniform draws up to the preset's max_ip; (2) a question parameter; (3) the
rules of the parameters it needs, built backwards from it with an op budget: each pending parameter
picks, among random candidate rules that keep the graph acyclic, the one whose cost (its operations plus
those of the abstract parameters it newly pulls in) is closest to a random share of the remaining budget,
so that the budget is spent exactly; (4) random rules for the other instance parameters (distractors that
the question does not need). A draw that cannot hit the budget, or falls in the other split, is redrawn.

Presets (the official generator's `max_op`/`max_edge`): med trains on op <= 15 with ip <= 20, hard on
op <= 21 with ip <= 28. Training ops follow its "light" law, the minimum of two uniform draws from
1..max_op. `eval_ops` are the out-of-distribution ops Part 2.1 evaluates (as read from its figures).
`small` is ours, not the paper's: ip <= 6 and op <= 3 for models trained in minutes on a CPU (questions of
~80 tokens instead of ~180 for med problems of the same op), beyond-distribution ops 4 and 5.
"""

from __future__ import annotations

import dataclasses
import math
import random

from lwjax.data.igsm import graph, names
from lwjax.data.igsm.graph import MOD, Param, Rule, Structure
from lwjax.data.igsm.problem import FORMATS, SPLITS, Problem

MAX_DEPS = 4  # parameters one sentence may combine
CANDIDATE_RULES = 24  # random rules weighed for each needed parameter
CONSTANT_SHARE = 0.25  # of the rules of parameters the question does not need


@dataclasses.dataclass(frozen=True)
class Preset:
  max_ip: int  # instance parameters (structure edges) per problem
  max_train_op: int
  eval_ops: tuple[int, ...]


PRESETS = {
    "med": Preset(max_ip=20, max_train_op=15, eval_ops=(20, 21, 22, 23)),
    "hard": Preset(max_ip=28, max_train_op=21, eval_ops=(28, 29, 30, 31, 32)),
    "small": Preset(max_ip=6, max_train_op=3, eval_ops=(4, 5)),
}


def sample_train_op(rng: random.Random, preset: str) -> int:
  """An op from the training law of `preset`: min of two uniform draws from 1..max_train_op."""
  top = PRESETS[preset].max_train_op
  return min(rng.randint(1, top), rng.randint(1, top))


def generate(op: int, seed: int = 0, preset: str = "med", fmt: str = "pq", split: str | None = None,
             max_draws: int = 100_000) -> Problem:
  """A problem whose shortest solution has exactly `op` operations, the same for the same arguments.

  `split` keeps the draw to templates of that split ("train" or "test"; None: either); `fmt` only
  changes the text (the same seed gives the same problem in both formats).
  """
  if preset not in PRESETS:
    raise ValueError(f"preset={preset!r}: expected one of {sorted(PRESETS)}")
  if fmt not in FORMATS:
    raise ValueError(f"fmt={fmt!r}: expected one of {FORMATS}")
  if split not in (*SPLITS, None):
    raise ValueError(f"split={split!r}: expected one of {SPLITS} or None")
  if op < 1:
    raise ValueError(f"op={op}: expected op >= 1")
  rng = random.Random(f"igsm/{preset}/{split}/{op}/{seed}")
  for _ in range(max_draws):
    problem = _draw(rng, op, PRESETS[preset].max_ip)
    if problem is not None and split in (None, problem.split):
      return dataclasses.replace(problem, fmt=fmt, preset=preset, seed=seed)
  raise RuntimeError(f"no problem with op={op} in {max_draws} draws (preset={preset}, split={split})")


def sample_structure(rng: random.Random, op: int, max_ip: int) -> Structure:
  """A layered structure graph in which every item above the last layer has children and every item below
  the first has parents."""
  closeness = min(max((op - 1) / (max_ip - 1), 0.0), 1.0)
  weights = [math.exp(-(closeness - centre) ** 2) for centre in (0.2, 0.5, 0.8)]
  while True:
    depth, t0, t1 = rng.choices((2, 3, 4), weights, k=3)
    widths = [rng.randint(min(t0, t1), max(t0, t1)) for _ in range(depth)]
    edges = set()
    for layer, (above, below) in enumerate(zip(widths, widths[1:], strict=False)):
      cover = {(layer, rng.randrange(above), child) for child in range(below)}
      parents = {parent for _, parent, _ in cover}
      cover.update((layer, parent, rng.randrange(below)) for parent in range(above) if parent not in parents)
      edges |= cover
    if len(edges) <= max_ip:
      break
  num_edges = min(rng.randint(len(edges), max_ip), rng.randint(len(edges), max_ip),
                  sum(a * b for a, b in zip(widths, widths[1:], strict=False)))
  others = sorted({(layer, parent, child) for layer in range(depth - 1) for parent in range(widths[layer])
                   for child in range(widths[layer + 1])} - edges)
  edges.update(rng.sample(others, num_edges - len(edges)))
  world = rng.choice(names.WORLDS)
  start = rng.randint(0, len(world) - depth)
  layers = world[start:start + depth]
  return Structure(tuple(category for category, _ in layers),
                   tuple(tuple(rng.sample(items, width)) for (_, items), width in zip(layers, widths, strict=False)),
                   tuple(sorted(edges)))


def _draw(rng: random.Random, op: int, max_ip: int) -> Problem | None:
  s = sample_structure(rng, op, max_ip)
  queries = [p for p in s.params if _closure(s, {}, [p], set())[0] <= op]
  query = rng.choice(queries)
  rules = _needed_rules(rng, s, query, op)
  if rules is None:
    return None
  rest = [p for p in s.instance_params if p not in rules]
  rng.shuffle(rest)
  for p in rest:
    allowed = _allowed(s, rules, p)
    rules[p] = _random_rule(rng, allowed) if allowed and rng.random() > CONSTANT_SHARE else _constant(rng)
  statement_order = list(s.instance_params)
  rng.shuffle(statement_order)
  solution_order = graph.topological_order(graph.ancestors(query, s, rules), s, rules, rng)
  problem = Problem(s, rules, query, tuple(statement_order), tuple(solution_order),
                    "".join(rng.sample(names.SYMBOLS, len(names.SYMBOLS))))
  return problem if problem.num_symbols <= len(names.SYMBOLS) else None


def _closure(s: Structure, rules: dict[Param, Rule], roots: list[Param],
             needed: set[Param]) -> tuple[int, list[Param], set[Param]]:
  """What making `roots` needed adds: (operations of the abstract parameters pulled in, the instance
  parameters pulled in, every parameter pulled in). Instance parameters without a rule pull in nothing."""
  cost, instances, seen, stack = 0, [], set(), list(roots)
  while stack:
    p = stack.pop()
    if p in needed or p in seen:
      continue
    seen.add(p)
    if p.kind == "abs":
      cost += graph.operations(p, s, rules)
      stack.extend(graph.dependencies(p, s, rules))
    else:
      instances.append(p)
  return cost, sorted(instances), seen


def _allowed(s: Structure, rules: dict[Param, Rule], p: Param) -> list[Param]:
  """The parameters `p` may depend on without closing a cycle: all but `p` and those that depend on it."""
  users: dict[Param, list[Param]] = {}
  for q in s.params:
    for d in graph.dependencies(q, s, rules):
      users.setdefault(d, []).append(q)
  blocked, stack = set(), [p]
  while stack:
    q = stack.pop()
    if q not in blocked:
      blocked.add(q)
      stack.extend(users.get(q, ()))
  return [q for q in s.params if q not in blocked]


def _constant(rng: random.Random) -> Rule:
  return Rule((), const=rng.randrange(MOD))


def _random_rule(rng: random.Random, allowed: list[Param]) -> Rule:
  deps = tuple(rng.sample(allowed, rng.randint(1, min(MAX_DEPS, len(allowed)))))
  combine = "diff" if len(deps) == 2 and rng.random() < 0.5 else "sum"
  modifier = rng.choice(("none", "more", "times"))
  const = {"none": 0, "more": rng.randrange(MOD), "times": rng.randint(1, MOD - 1)}[modifier]
  return Rule(deps, combine, modifier, const)


def _needed_rules(rng: random.Random, s: Structure, query: Param, op: int) -> dict[Param, Rule] | None:
  """Rules for the parameters `query` needs, with exactly `op` operations in all, or None on a dead end."""
  rules: dict[Param, Rule] = {}
  spent, pending, needed = _closure(s, rules, [query], set())
  while pending:
    p = pending.pop(rng.randrange(len(pending)))
    left = op - spent
    candidates = [_constant(rng)]
    allowed = _allowed(s, rules, p) if left else []
    if allowed:
      candidates += [_random_rule(rng, allowed) for _ in range(CANDIDATE_RULES)]
    options = []
    for rule in candidates:
      cost, instances, seen = _closure(s, rules, list(rule.deps), needed)
      rules[p] = rule
      cost += graph.operations(p, s, rules)
      # Within budget, and either exactly on it or with parameters left to spend the rest on.
      if cost == left or (cost < left and (pending or instances)):
        options.append((cost, rule, instances, seen))
    if not options:
      return None
    share = left if not pending else rng.uniform(0, 2 * left / (len(pending) + 1))
    cost, rule, instances, seen = min(options, key=lambda option: abs(option[0] - share))
    rules[p] = rule
    spent += cost
    needed |= seen
    pending += instances
  return rules
