"""Step-by-step checker of iGSM solutions, for full-solution accuracy (Physics of LMs 2.1 and 2.2 evaluations).

Retry steps (any sentence holding the BACK marker) are removed and counted first. Each remaining step must
then be well formed, define a parameter that exists in the problem (`unknown_parameter`), is not defined
twice (`redefined_parameter`), is needed for the question (`unnecessary_parameter`) and whose dependencies
all have steps before it (`dependency_not_ready`); it must bind fresh variables (`reused_symbol`), use only
bound ones (`undefined_symbol`), get every substituted value and every result mod 23 right
(`wrong_arithmetic`), and compute the parameter's own formula (`wrong_formula`: the step's expression,
unfolded through its intermediates, equals the formula of the problem as a polynomial in the parameters,
tested by evaluation at random points mod a large prime; sums may come in any order). Last, the question's
parameter must have a step (`incomplete`) and the stated answer must be right (`wrong_answer`).
"""

from __future__ import annotations

import dataclasses
import random
import re

from lwjax.data.igsm import compact, graph
from lwjax.data.igsm.graph import MOD, Param
from lwjax.data.igsm.problem import Problem
from lwjax.data.igsm.retry import BACK
from lwjax.data.igsm.solution import ANSWER_PREFIX, OPERATORS, Expr, Node, evaluate_expr, sentences
from lwjax.data.verdict import Verdict

ERROR_KINDS = ("parse_error", "unknown_parameter", "redefined_parameter", "unnecessary_parameter",
               "dependency_not_ready", "reused_symbol", "undefined_symbol", "wrong_arithmetic", "wrong_formula",
               "incomplete", "wrong_answer")
_PRIME = (1 << 61) - 1  # formulas are compared as polynomials mod this prime
_FORMULA_TRIALS = 2
_DEFINE = re.compile(r"Define (.+) as ([A-Za-z]+)")
_SYMBOL = re.compile(r"[A-Za-z]+")
_NUMBER = re.compile(r"\d+")
_BINARY = re.compile(r"(\S+) ([-+*]) (\S+)")
_ANSWER = re.compile(re.escape(ANSWER_PREFIX) + r"(\d+)")


class _StepError(Exception):
  def __init__(self, kind: str, message: str):
    super().__init__(message)
    self.kind = kind


def check(problem: Problem, solution_text: str) -> Verdict:
  """Checks `solution_text` (steps, then "Answer: N.") against `problem`, step by step. A solution to a
  problem in the compact form is translated to the English text and checked as that; its error position
  is the start of the compact sentence (or the text's end)."""
  if problem.fmt == "compact":
    english, starts = compact.to_english(problem, solution_text)
    verdict = _check_english(problem, english)
    position = compact.compact_position(verdict.error_position, english, starts, len(solution_text))
    return dataclasses.replace(verdict, error_position=position)
  return _check_english(problem, solution_text)


def _check_english(problem: Problem, solution_text: str) -> Verdict:
  steps, answer, answer_at, num_retries = [], None, len(solution_text), 0
  error = None
  for start, sentence in sentences(solution_text):
    if BACK in sentence:
      num_retries += 1
    elif answer is None and _ANSWER.fullmatch(sentence):
      answer, answer_at = int(_ANSWER.fullmatch(sentence).group(1)), start
    elif answer is None:
      steps.append((start, sentence))
    elif error is None:
      error = (len(steps), start, "parse_error", "text after the answer")
  answer_correct = answer == problem.answer
  state = _State(problem)
  for index, (start, sentence) in enumerate(steps):
    try:
      state.step(sentence)
    except _StepError as e:
      error = (index, start, e.kind, str(e))
      break
  if error is None and problem.query not in state.defined:
    error = (len(steps), answer_at, "incomplete", "no step defines the question's parameter")
  if error is None and not answer_correct:
    error = (len(steps), answer_at, "wrong_answer", f"answer {answer}, expected {problem.answer}")
  if error is None:
    return Verdict(True, answer_correct, num_retries, len(steps))
  return Verdict(False, answer_correct, num_retries, len(steps), *error)


class _State:
  """Variables bound so far: value mod 23 and expression in parameters and constants."""

  def __init__(self, problem: Problem):
    self.problem = problem
    s = problem.structure
    self.by_name = {s.name(p): p for p in s.params}
    self.defined: dict[Param, str] = {}
    self.value: dict[str, int] = {}
    self.expr: dict[str, Expr] = {}

  def step(self, sentence: str) -> None:
    problem, s = self.problem, self.problem.structure
    parts = sentence.split("; ")
    define = _DEFINE.fullmatch(parts[0])
    if define is None or len(parts) < 2 or not parts[-1].startswith("so "):
      raise _StepError("parse_error", f"not a step: {sentence!r}")
    name, symbol = define.groups()
    p = self.by_name.get(name)
    if p is None:
      raise _StepError("unknown_parameter", f"no parameter {name!r} in the problem")
    if p in self.defined:
      raise _StepError("redefined_parameter", f"{name!r} is already {self.defined[p]}")
    if p not in problem.necessary:
      raise _StepError("unnecessary_parameter", f"the question does not need {name!r}")
    missing = [d for d in graph.dependencies(p, s, problem.rules) if d not in self.defined]
    if missing:
      raise _StepError("dependency_not_ready", f"{name!r} needs {s.name(missing[0])!r} first")
    self._bind_check(symbol)
    for equation in parts[1:-1]:
      lhs, value, expr = self._equation(equation)
      self._bind_check(lhs)
      if lhs == symbol:
        raise _StepError("reused_symbol", f"variable {symbol} is the step's own")
      self.value[lhs], self.expr[lhs] = value, expr
    lhs, value, expr = self._equation(parts[-1][len("so "):])
    if lhs != symbol:
      raise _StepError("parse_error", f"the step defines {symbol}, but concludes {lhs}")
    if not self._same_formula(expr, p):
      raise _StepError("wrong_formula", f"{name!r} is not computed by its formula")
    self.defined[p] = symbol
    self.value[symbol], self.expr[symbol] = value, p

  def _bind_check(self, symbol: str) -> None:
    if symbol in self.value:
      raise _StepError("reused_symbol", f"variable {symbol} is already bound")

  def _term(self, term: str) -> tuple[int, Expr]:
    if _NUMBER.fullmatch(term):
      return int(term), int(term)
    if not _SYMBOL.fullmatch(term):
      raise _StepError("parse_error", f"not a number or variable: {term!r}")
    if term not in self.value:
      raise _StepError("undefined_symbol", f"variable {term} is not bound")
    return self.value[term], self.expr[term]

  def _equation(self, equation: str) -> tuple[str, int, Expr]:
    """"x = 5", "x = y = 5" or "x = y op z = 1 op 2 = 3" -> (x, value, expression)."""
    lhs, *rhs = equation.split(" = ")
    if not _SYMBOL.fullmatch(lhs) or not rhs or not _NUMBER.fullmatch(rhs[-1]):
      raise _StepError("parse_error", f"not an equation: {equation!r}")
    result = int(rhs[-1])
    if len(rhs) == 1:
      value, expr = result, result
    elif len(rhs) == 2:
      value, expr = self._term(rhs[0])
    elif len(rhs) == 3 and (names := _BINARY.fullmatch(rhs[0])) and (numbers := _BINARY.fullmatch(rhs[1])):
      (left, left_expr), (right, right_expr) = self._term(names.group(1)), self._term(names.group(3))
      if names.group(2) != numbers.group(2) or not (_NUMBER.fullmatch(numbers.group(1))
                                                   and _NUMBER.fullmatch(numbers.group(3))):
        raise _StepError("parse_error", f"the values do not mirror the names: {equation!r}")
      if (int(numbers.group(1)), int(numbers.group(3))) != (left, right):
        raise _StepError("wrong_arithmetic", f"wrong values substituted: {equation!r}")
      value, expr = OPERATORS[names.group(2)](left, right) % MOD, Node(names.group(2), left_expr, right_expr)
    else:
      raise _StepError("parse_error", f"not an equation: {equation!r}")
    if value != result:
      raise _StepError("wrong_arithmetic", f"{equation!r}: expected {value}")
    return lhs, value, expr

  def _same_formula(self, expr: Expr, p: Param) -> bool:
    problem = self.problem
    for trial in range(_FORMULA_TRIALS):
      rng, point = random.Random(trial), {}

      def leaf(q: Param, point=point, rng=rng) -> int:  # this trial's point, bound explicitly
        return point.setdefault(q, rng.randrange(_PRIME))

      step_value = evaluate_expr(expr, leaf, _PRIME)
      deps = {d: leaf(d) for d in graph.dependencies(p, problem.structure, problem.rules)}
      if step_value != graph.apply(p, problem.structure, problem.rules, deps, _PRIME):
        return False
    return True
