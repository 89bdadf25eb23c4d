"""The iGSM solution writer in the paper's step format (Physics of LMs 2.1, Sec. 2).

One step per needed parameter, in the problem's `solution_order`; the step names the parameter, binds it
to a fresh variable, writes each binary operation of its formula as its own equation (names, then values,
then the result mod 23) and ends with "so <variable> = ...":

  Define Film Studio's School Daypack as g; R = W + B = 13 + 7 = 20; so g = 12 + R = 12 + 20 = 9.

A constant is "so p = 5", a copy "so p = W = 13". Sums of three or more terms fold from the left, each
partial sum an intermediate variable; an abstract parameter sums the products count * abstract over the
item's children. Steps are joined by ". " and the solution ends with "Answer: <answer>.".
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

from lwjax.data.igsm import graph
from lwjax.data.igsm.graph import MOD, Param, Rule, Structure

if TYPE_CHECKING:
  from lwjax.data.igsm.problem import Problem

ANSWER_PREFIX = "Answer: "
OPERATORS: dict[str, Callable[[int, int], int]] = {"+": operator.add, "-": operator.sub, "*": operator.mul}
_SENTENCE = re.compile(r"[^.]+")  # names, numbers and markers hold no period


class Node(NamedTuple):
  """A binary operation; leaves are parameters or integer constants."""
  op: str
  left: Expr
  right: Expr


Expr = Param | int | Node


def _fold(op: str, terms: Sequence[Expr]) -> Expr:
  expr = terms[0]
  for term in terms[1:]:
    expr = Node(op, expr, term)
  return expr


def formula(p: Param, s: Structure, rules: Mapping[Param, Rule]) -> Expr:
  """The formula of `p` as a binary tree, one node per operation (so `graph.operations` counts its nodes)."""
  if p.kind == "abs":
    return _fold("+", [count if abstract is None else Node("*", count, abstract)
                       for count, abstract in graph.abstract_terms(s, p)])
  rule = rules[p]
  if not rule.deps:
    return rule.const
  base = _fold("-" if rule.combine == "diff" else "+", rule.deps)
  if rule.modifier == "more":
    return Node("+", rule.const, base)
  if rule.modifier == "times":
    return Node("*", rule.const, base)
  return base


def evaluate_expr(expr: Expr, leaf: Callable[[Param], int], modulus: int) -> int:
  """The value of `expr` mod `modulus`, parameters valued by `leaf`."""
  if isinstance(expr, Node):
    return OPERATORS[expr.op](evaluate_expr(expr.left, leaf, modulus),
                              evaluate_expr(expr.right, leaf, modulus)) % modulus
  if isinstance(expr, Param):
    return leaf(expr) % modulus
  return expr % modulus


def write_step(name: str, expr: Expr, symbol_of: Mapping[Param, str], value_of: Mapping[Param, int],
               symbol: str, next_symbol: Callable[[], str]) -> str:
  """"Define <name> as <symbol>; <intermediate equations>; so <symbol> = ..." (no final period)."""
  equations = []

  def operand(e: Expr) -> tuple[str, int]:
    if isinstance(e, Param):
      return symbol_of[e], value_of[e]
    if not isinstance(e, Node):
      return str(e), e
    (left, lv), (right, rv) = operand(e.left), operand(e.right)
    result = OPERATORS[e.op](lv, rv) % MOD
    equation = f"{left} {e.op} {right} = {lv} {e.op} {rv} = {result}"
    if e is expr:
      return equation, result
    var = next_symbol()
    equations.append(f"{var} = {equation}")
    return var, result

  text, value = operand(expr)
  final = f"{text} = {value}" if isinstance(expr, Param) else text
  return "; ".join([f"Define {name} as {symbol}", *equations, f"so {symbol} = {final}"])


def solution_steps(problem: Problem) -> list[tuple[Param, str]]:
  """(parameter, step text) for each step of the shortest solution."""
  s, rules, values = problem.structure, problem.rules, problem.values
  symbols = iter(problem.symbols)
  symbol_of: dict[Param, str] = {}
  steps = []
  for p in problem.solution_order:
    symbol = next(symbols)
    steps.append((p, write_step(s.name(p), formula(p, s, rules), symbol_of, values, symbol,
                                lambda: next(symbols))))
    symbol_of[p] = symbol
  return steps


def sentences(text: str) -> list[tuple[int, str]]:
  """(start offset, sentence without its period and surrounding spaces) for each sentence of `text`."""
  found = []
  for match in _SENTENCE.finditer(text):
    sentence = match.group()
    if sentence.strip():
      found.append((match.start() + len(sentence) - len(sentence.lstrip()), sentence.strip()))
  return found


def join_sentences(steps: Sequence[str], answer: int) -> str:
  """Step texts (wrong ones included) and the answer, as a solution text."""
  return ". ".join([*steps, f"{ANSWER_PREFIX}{answer}"]) + "."


def write_solution(problem: Problem) -> str:
  """The shortest solution of `problem` in the step format, ending with the answer."""
  return join_sentences([text for _, text in solution_steps(problem)], problem.answer)
