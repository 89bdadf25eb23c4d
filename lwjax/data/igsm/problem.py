"""An iGSM problem: its graphs, statement and question text, answer, op count and template split
(Physics of LMs 2.1, Sec. 2, with its train/test split by a hash of the solution template).

The statement gives every instance parameter one sentence, in a random order ("The number of each
Riverview High's Film Studio equals 5 more than each Film Studio's Backpack."); the question asks for one
parameter ("How many Film Studio does Riverview High have?"). Format `pq` puts the statement first, `qp`
the question first. The solution template is the solution with names, numbers and variables abstracted
away (which parameter kind each step defines, which earlier steps it uses and how); its hash mod 23 puts
a problem in `train` (0-15) or `test` (16-22), the bins of the official generator, so that no test template
is ever trained on.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Mapping

from lwjax.data.igsm import compact, graph
from lwjax.data.igsm.graph import Param, Rule, Structure
from lwjax.data.igsm.solution import write_solution

FORMATS = ("pq", "qp", "compact")  # compact: `lwjax.data.igsm.compact`, statement then question
SPLITS = ("train", "test")
TRAIN_HASH_BINS = 16  # template hash mod 23 below this: train, else test


@dataclasses.dataclass(frozen=True)
class Problem:
  """One problem. `rules` defines every instance parameter; `solution_order` is the order of the solution
  steps (a topological order of the parameters the question needs); `symbols` the variable letters in the
  order the solution writer takes them."""
  structure: Structure
  rules: Mapping[Param, Rule]
  query: Param
  statement_order: tuple[Param, ...]
  solution_order: tuple[Param, ...]
  symbols: str
  fmt: str = "pq"
  preset: str = "med"
  seed: int = 0

  @functools.cached_property
  def values(self) -> dict[Param, int]:
    return graph.evaluate(self.structure, self.rules)

  @functools.cached_property
  def necessary(self) -> frozenset[Param]:
    """The parameters the question needs, itself included."""
    return frozenset(graph.ancestors(self.query, self.structure, self.rules))

  @property
  def answer(self) -> int:
    return self.values[self.query]

  @functools.cached_property
  def op(self) -> int:
    return graph.op_count(self.query, self.structure, self.rules)

  @property
  def ip(self) -> int:
    """Instance parameters: one per structure edge, each stated in the problem."""
    return len(self.structure.edges)

  @property
  def num_symbols(self) -> int:
    """Variables the solution needs: one per step and one per intermediate result."""
    s = self.structure
    return sum(1 + max(graph.operations(p, s, self.rules) - 1, 0) for p in self.solution_order)

  @functools.cached_property
  def statement(self) -> str:
    if self.fmt == "compact":
      return compact.statement(self)
    return " ".join(statement_sentence(self.structure, p, self.rules[p]) for p in self.statement_order)

  @property
  def query_text(self) -> str:
    if self.fmt == "compact":
      return compact.query_text(self)
    s, p = self.structure, self.query
    wanted = s.items[p.layer + 1][p.target] if p.kind == "inst" else s.categories[p.target]
    return f"How many {wanted} does {s.items[p.layer][p.item]} have?"

  @property
  def question(self) -> str:
    """The full problem text: statement and question in the order of `fmt`."""
    parts = (self.query_text, self.statement) if self.fmt == "qp" else (self.statement, self.query_text)
    return " ".join(parts)

  @functools.cached_property
  def solution(self) -> str:
    english = write_solution(self)
    return compact.to_compact(self, english) if self.fmt == "compact" else english

  @functools.cached_property
  def template(self) -> str:
    """The solution with names, numbers and variables abstracted away."""
    s, step = self.structure, {p: i for i, p in enumerate(self.solution_order)}
    item_ids: dict[tuple[int, int], int] = {}

    def item(layer: int, index: int) -> int:
      return item_ids.setdefault((layer, index), len(item_ids))

    lines = []
    for p in self.solution_order:
      target = item(p.layer + 1, p.target) if p.kind == "inst" else p.target - p.layer
      head = f"{p.kind} L{p.layer} i{item(p.layer, p.item)} t{target}"
      if p.kind == "abs":
        lines.append(f"{head} = terms {[step[d] for d in graph.dependencies(p, s, self.rules)]}")
        continue
      rule = self.rules[p]
      uses = [step[d] for d in rule.deps]
      lines.append(f"{head} = {rule.modifier} {rule.combine} {uses if rule.combine == 'diff' else sorted(uses)}"
                   if rule.deps else f"{head} = const")
    return "\n".join(lines)

  @property
  def template_hash(self) -> int:
    return int(hashlib.sha256(self.template.encode()).hexdigest(), 16) % graph.MOD

  @property
  def split(self) -> str:
    return "train" if self.template_hash < TRAIN_HASH_BINS else "test"

  def to_json(self) -> dict:
    return {
        "structure": self.structure.to_json(),
        "rules": [[list(p), [list(d) for d in r.deps], r.combine, r.modifier, r.const]
                  for p, r in sorted(self.rules.items())],
        "query": list(self.query),
        "statement_order": [list(p) for p in self.statement_order],
        "solution_order": [list(p) for p in self.solution_order],
        "symbols": self.symbols, "fmt": self.fmt, "preset": self.preset, "seed": self.seed,
    }

  @classmethod
  def from_json(cls, data: Mapping) -> Problem:
    rules = {Param(*p): Rule(tuple(Param(*d) for d in deps), combine, modifier, const)
             for p, deps, combine, modifier, const in data["rules"]}
    return cls(Structure.from_json(data["structure"]), rules, Param(*data["query"]),
               tuple(Param(*p) for p in data["statement_order"]), tuple(Param(*p) for p in data["solution_order"]),
               data["symbols"], data["fmt"], data["preset"], data["seed"])


def statement_sentence(s: Structure, p: Param, rule: Rule) -> str:
  """The problem sentence that defines instance parameter `p`."""
  head = f"The number of each {s.name(p)} equals"
  if not rule.deps:
    return f"{head} {rule.const}."
  refs = [f"each {s.name(d)}" for d in rule.deps]
  if len(refs) == 1:
    body = refs[0]
  elif rule.combine == "diff":
    body = f"the difference of {refs[0]} and {refs[1]}"
  else:
    body = f"the sum of {', '.join(refs[:-1])} and {refs[-1]}"
  if rule.modifier == "more":
    body = f"{rule.const} more than {body}"
  elif rule.modifier == "times":
    body = f"{rule.const} times as much as {body}"
  return f"{head} {body}."
