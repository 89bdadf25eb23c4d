"""iGSM structure and dependency graphs: parameters, rules, values mod 23, op counts (Physics of LMs 2.1, Sec. 2).

The structure graph has d layers of items, one category per layer; an edge (layer, item, child) says that
each item of `layer` holds some number of the child item of `layer + 1`. That number is an instance
parameter ("each Riverview High's Film Studio"); the problem states each one as a rule: a constant, or
`modifier(const, combine(deps))` with combine a sum of 1-4 parameters or the difference of two, and the
modifier none, "N more than" or "N times as much as". An abstract parameter ("Riverview High's Classroom",
the number of items of a lower category in an item) is never stated: it follows from the structure as a
sum over the item's children x, of x's count for the next layer and of count(x) * abstract(x, category)
below it. Every item above the last layer has children and every item below the first has parents, so
every item holds items of every category below it.

All arithmetic is mod 23. The op count of a parameter is the number of binary operations of its formula
(a sum of m terms: m - 1; a modifier: 1 more; an abstract sum of c products: 2c - 1), and the op count of
a problem the total over the parameters the question needs: the operations of the shortest solution.
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Iterable, Mapping
from typing import NamedTuple

MOD = 23


class Param(NamedTuple):
  """kind "inst": the number of item `target` of layer + 1 in each item (layer, item);
  kind "abs": the number of items of the category of layer `target` (> layer) in item (layer, item)."""
  kind: str
  layer: int
  item: int
  target: int


class Rule(NamedTuple):
  """The definition of an instance parameter in the problem: `const` alone when `deps` is empty, else
  modifier(const, combine(deps)), modifier in {"none", "more", "times"}, combine in {"sum", "diff"}."""
  deps: tuple[Param, ...]
  combine: str = "sum"
  modifier: str = "none"
  const: int = 0


@dataclasses.dataclass(frozen=True)
class Structure:
  """Layers of items: `categories[d]`, `items[d][width]`, `edges` sorted (layer, item, child) triples."""
  categories: tuple[str, ...]
  items: tuple[tuple[str, ...], ...]
  edges: tuple[tuple[int, int, int], ...]

  @functools.cached_property
  def _children(self) -> dict[tuple[int, int], tuple[int, ...]]:
    children: dict[tuple[int, int], list[int]] = {}
    for layer, item, child in self.edges:
      children.setdefault((layer, item), []).append(child)
    return {key: tuple(sorted(value)) for key, value in children.items()}

  def children(self, layer: int, item: int) -> tuple[int, ...]:
    return self._children.get((layer, item), ())

  @functools.cached_property
  def instance_params(self) -> tuple[Param, ...]:
    return tuple(Param("inst", *edge) for edge in self.edges)

  @functools.cached_property
  def abstract_params(self) -> tuple[Param, ...]:
    return tuple(Param("abs", layer, item, target) for layer in range(len(self.items))
                 for item in range(len(self.items[layer])) for target in range(layer + 1, len(self.items)))

  @functools.cached_property
  def params(self) -> tuple[Param, ...]:
    return self.instance_params + self.abstract_params

  @functools.cached_property
  def abstract_terms(self) -> dict[Param, tuple[tuple[Param, Param | None], ...]]:
    return {p: tuple((Param("inst", p.layer, p.item, c),
                      None if p.target == p.layer + 1 else Param("abs", p.layer + 1, c, p.target))
                     for c in self.children(p.layer, p.item)) for p in self.abstract_params}

  def name(self, p: Param) -> str:
    """"Riverview High's Film Studio" (instance) or "Riverview High's Classroom" (abstract)."""
    owner = self.items[p.layer][p.item]
    return f"{owner}'s {self.items[p.layer + 1][p.target] if p.kind == 'inst' else self.categories[p.target]}"

  def to_json(self) -> dict:
    return {"categories": list(self.categories), "items": [list(x) for x in self.items],
            "edges": [list(e) for e in self.edges]}

  @classmethod
  def from_json(cls, data: Mapping) -> Structure:
    return cls(tuple(data["categories"]), tuple(tuple(x) for x in data["items"]),
               tuple(tuple(e) for e in data["edges"]))


def abstract_terms(s: Structure, p: Param) -> tuple[tuple[Param, Param | None], ...]:
  """The terms of abstract `p`: (count of child x, abstract(x, category) or None when x is the category)."""
  return s.abstract_terms[p]


def dependencies(p: Param, s: Structure, rules: Mapping[Param, Rule]) -> tuple[Param, ...]:
  """The parameters `p` is computed from (none for a constant, or for an instance parameter without rule)."""
  if p.kind == "inst":
    return rules[p].deps if p in rules else ()
  return tuple(q for term in abstract_terms(s, p) for q in term if q is not None)


def operations(p: Param, s: Structure, rules: Mapping[Param, Rule]) -> int:
  """Binary operations of the formula of `p` (see the module docstring)."""
  if p.kind == "inst":
    rule = rules[p]
    if not rule.deps:
      return 0
    return len(rule.deps) - 1 + (rule.modifier != "none")
  terms = abstract_terms(s, p)
  return len(terms) - 1 + sum(abstract is not None for _, abstract in terms)


def apply(p: Param, s: Structure, rules: Mapping[Param, Rule], value: Mapping[Param, int], modulus: int) -> int:
  """The formula of `p` on the values of its dependencies, mod `modulus` (23, or a large prime to compare
  formulas by polynomial identity testing)."""
  if p.kind == "abs":
    return sum(value[count] * (1 if abstract is None else value[abstract])
               for count, abstract in abstract_terms(s, p)) % modulus
  rule = rules[p]
  if not rule.deps:
    return rule.const % modulus
  base = value[rule.deps[0]] - value[rule.deps[1]] if rule.combine == "diff" else sum(value[d] for d in rule.deps)
  if rule.modifier == "more":
    base = rule.const + base
  elif rule.modifier == "times":
    base = rule.const * base
  return base % modulus


def topological_order(params: Iterable[Param], s: Structure, rules: Mapping[Param, Rule],
                      rng: random.Random | None = None) -> list[Param]:
  """`params` (closed under dependencies) ordered so that dependencies come first; a uniformly chosen ready
  parameter at each position when `rng` is given, else the smallest."""
  pending = {p: set(dependencies(p, s, rules)) for p in params}
  users: dict[Param, list[Param]] = {p: [] for p in pending}
  for p, deps in pending.items():
    for d in deps:
      users[d].append(p)
  ready = sorted(p for p, deps in pending.items() if not deps)
  order = []
  while ready:
    p = ready.pop(rng.randrange(len(ready)) if rng else 0)
    order.append(p)
    for user in users[p]:
      pending[user].discard(p)
      if not pending[user]:
        ready.append(user)
    ready.sort()
  if len(order) != len(pending):
    raise ValueError("the dependency graph has a cycle")
  return order


def evaluate(s: Structure, rules: Mapping[Param, Rule]) -> dict[Param, int]:
  """The value mod 23 of every parameter of the problem."""
  value: dict[Param, int] = {}
  for p in topological_order(s.params, s, rules):
    value[p] = apply(p, s, rules, value, MOD)
  return value


def ancestors(query: Param, s: Structure, rules: Mapping[Param, Rule]) -> set[Param]:
  """The parameters needed to compute `query`, itself included."""
  needed, stack = set(), [query]
  while stack:
    p = stack.pop()
    if p not in needed:
      needed.add(p)
      stack.extend(dependencies(p, s, rules))
  return needed


def op_count(query: Param, s: Structure, rules: Mapping[Param, Rule]) -> int:
  """Operations of the shortest solution: the formulas of the parameters `query` needs."""
  return sum(operations(p, s, rules) for p in ancestors(query, s, rules))
