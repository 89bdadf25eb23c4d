r"""A small reader of LaTeX final answers into sympy values, and a comparison of two answers by value.

It reads the forms MATH answers take: integers, decimals (as exact rationals), `\frac`, `\sqrt{}` and
`\sqrt[n]{}`, powers, `\pi`, `\infty`, `\sin`/`\cos`/`\tan`/`\log`/`\ln`/`\exp`, `\cdot`/`\times`/`\div`,
implicit products (`2\sqrt{3}x`), mixed numbers (`2\frac{1}{2}` is 5/2) and small factorials; anything
else gives None, and the caller compares strings instead. It is a parser of its own rather than
`sympy.parse_expr`, which `eval`s its input (here, model text), or `sympy.parsing.latex`, which needs
antlr4. Values that would take long to build (a huge exponent or factorial) are refused, and comparisons
evaluate numbers instead of calling `simplify`, so nothing needs a timeout.
"""

from __future__ import annotations

import re

import sympy

MAX_LENGTH = 300  # characters; longer answers are not math a grader should evaluate
MAX_EXPONENT = 1000
MAX_BITS = 100_000  # of a number built as a power: 2^{100000} is quick to build, (2^{1000})^{1000} is not
MAX_FACTORIAL = 100
RELATIVE_TOLERANCE = 1e-12  # for irrational values evaluated to 30 digits

_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?|\.\d+)|(\\[A-Za-z]+)|([A-Za-z]+)|([-+*/^(){}\[\]!]))")
_CONSTANTS = {r"\pi": sympy.pi, "pi": sympy.pi, r"\infty": sympy.oo, r"\infin": sympy.oo}
_FUNCTIONS = {
    r"\sin": sympy.sin, r"\cos": sympy.cos, r"\tan": sympy.tan, r"\cot": sympy.cot, r"\sec": sympy.sec,
    r"\csc": sympy.csc, r"\log": sympy.log, r"\ln": sympy.log, r"\exp": sympy.exp,
    "sqrt": sympy.sqrt, "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "log": sympy.log, "ln": sympy.log,
}
_TIMES = {"*", r"\cdot", r"\times"}
_DIVIDE = {"/", r"\div"}
_IGNORED = {r"\left", r"\right", r"\displaystyle"}
_CLOSING = {"(": ")", "{": "}"}
# Points at which expressions in variables are compared; rationals, so evaluation is exact where it can be.
_POINTS = tuple(tuple(sympy.Rational(n, d) for n, d in row)
                for row in (((13, 10), (7, 3), (-5, 4)), ((-17, 6), (11, 5), (9, 7)), ((29, 9), (-3, 8), (19, 4))))


class _Unsupported(Exception):
  """The text is not one of the forms this reader covers."""


def parse(latex: str) -> sympy.Expr | None:
  """The value of a LaTeX answer, or None when it is not a form this reader covers."""
  if len(latex) > MAX_LENGTH:
    return None
  try:
    parser = _Parser(_tokens(latex))
    value = parser.expression()
    return value if parser.at_end() else None
  except _Unsupported:
    return None
  except (ArithmeticError, TypeError, ValueError, RecursionError):  # sympy on odd input
    return None


def same_value(a: str, b: str) -> bool:
  """Whether two LaTeX answers both parse and have the same value: rational numbers exactly, other numbers
  to a relative 1e-12, expressions in variables at three fixed points."""
  x, y = parse(a), parse(b)
  if x is None or y is None:
    return False
  if x == y:
    return True
  try:
    symbols = sorted(x.free_symbols | y.free_symbols, key=str)
    if not symbols:
      return _close(x, y)
    if len(symbols) > len(_POINTS[0]):
      return False
    at_points = [dict(zip(symbols, point, strict=False)) for point in _POINTS]  # the first len(symbols) values
    defined = [(x.subs(at), y.subs(at)) for at in at_points]
    defined = [(u, v) for u, v in defined if u.is_finite and v.is_finite]
    return len(defined) >= 2 and all(_close(u, v) for u, v in defined)
  except (ArithmeticError, TypeError, ValueError, RecursionError):
    return False


def _close(x: sympy.Expr, y: sympy.Expr) -> bool:
  if x.is_Rational and y.is_Rational:
    return x == y
  if not (x.is_finite and y.is_finite):
    return False
  # sympy Floats, not Python floats: a value past 1e308 must not become inf and compare equal to anything.
  u, v = sympy.N(x, 30), sympy.N(y, 30)
  if not (u.is_number and v.is_number and u.is_finite and v.is_finite):
    return False
  return bool(abs(u - v) <= RELATIVE_TOLERANCE * sympy.Max(1, abs(u), abs(v)))


def _bits(number: sympy.Expr) -> float:
  """About how many bits the magnitude of a number takes."""
  if number.is_Rational:
    return max(number.p.bit_length(), number.q.bit_length())
  magnitude = abs(sympy.N(number))
  return 1.0 if magnitude.is_zero else max(1.0, abs(float(sympy.log(magnitude, 2))))


def _tokens(latex: str) -> list[str]:
  tokens, position = [], 0
  latex = latex.rstrip()
  while position < len(latex):
    match = _TOKEN.match(latex, position)
    if match is None:
      raise _Unsupported(latex[position:])
    position = match.end()
    number, command, word, symbol = match.groups()
    if command is not None:
      if command in _IGNORED:
        continue
      if command not in _CONSTANTS and command not in _FUNCTIONS and command not in _TIMES | _DIVIDE | {
          r"\frac", r"\sqrt"}:
        raise _Unsupported(command)
      tokens.append(command)
    elif word is not None and word not in _CONSTANTS and word not in _FUNCTIONS:
      # A product of one-letter variables (`xy`), never text: MATH answers that are words are compared as text.
      if len(word) > 2:
        raise _Unsupported(word)
      tokens.extend(word)
    else:
      tokens.append(number or word or symbol)
  return tokens


def _is_number(token: str | None) -> bool:
  return token is not None and (token[0].isdigit() or token[0] == ".")


def _starts_operand(token: str | None) -> bool:
  return token is not None and (_is_number(token) or token.isalpha() or token in ("(", "{", r"\frac", r"\sqrt")
                                or token in _CONSTANTS or token in _FUNCTIONS)


class _Parser:
  """Recursive descent: expression = term (+|- term)*; term = signed (*|/|implicit signed)*; signed =
  (-|+)* power; power = postfix (^ -? postfix)?; postfix = operand !*."""

  def __init__(self, tokens: list[str]):
    self.tokens, self.position = tokens, 0

  def at_end(self) -> bool:
    return self.position == len(self.tokens)

  def peek(self) -> str | None:
    return None if self.at_end() else self.tokens[self.position]

  def fraction_of_whole_numbers_follows(self) -> bool:
    ahead = self.tokens[self.position:self.position + 7]
    return (len(ahead) == 7 and ahead[0] == r"\frac" and ahead[1::3] == ["{", "{"] and ahead[3::3] == ["}", "}"]
            and ahead[2].isdigit() and ahead[5].isdigit())

  def take(self) -> str:
    if self.at_end():
      raise _Unsupported("ends early")
    self.position += 1
    return self.tokens[self.position - 1]

  def expect(self, token: str) -> None:
    if self.take() != token:
      raise _Unsupported(f"expected {token}")

  def expression(self) -> sympy.Expr:
    value = self.term()
    while self.peek() in ("+", "-"):
      value = value + self.term() if self.take() == "+" else value - self.term()
    return value

  def term(self) -> sympy.Expr:
    value = self.signed()
    while True:
      if self.peek() in _TIMES:
        self.take()
        value = value * self.signed()
      elif self.peek() in _DIVIDE:
        self.take()
        value = value / self.signed()
      elif _starts_operand(self.peek()):
        value = value * self.power()
      else:
        return value

  def signed(self) -> sympy.Expr:
    if self.peek() == "-":
      self.take()
      return -self.signed()
    if self.peek() == "+":
      self.take()
      return self.signed()
    return self.power()

  def power(self) -> sympy.Expr:
    base = self.postfix()
    if self.peek() != "^":
      return base
    self.take()
    negative = self.peek() == "-"
    if negative:
      self.take()
    exponent = -self.postfix() if negative else self.postfix()
    if exponent.is_number and (abs(complex(exponent)) > MAX_EXPONENT
                               or base.is_number and abs(complex(exponent)) * _bits(base) > MAX_BITS):
      raise _Unsupported("power too large")
    return base**exponent

  def postfix(self) -> sympy.Expr:
    value = self.operand()
    while self.peek() == "!":
      self.take()
      if not (value.is_Integer and 0 <= value <= MAX_FACTORIAL):
        raise _Unsupported("factorial")
      value = sympy.factorial(value)
    return value

  def operand(self) -> sympy.Expr:
    token = self.take()
    if token in _CLOSING:
      value = self.expression()
      self.expect(_CLOSING[token])
      return value
    if _is_number(token):
      value = sympy.Rational(token)
      # A whole number before a fraction of whole numbers is a mixed number, as MATH writes 2\frac{1}{2}.
      if value.is_Integer and self.fraction_of_whole_numbers_follows():
        self.take()
        return value + self.argument() / self.argument()
      return value
    if token in _CONSTANTS:
      return _CONSTANTS[token]
    if token == r"\frac":
      return self.argument() / self.argument()
    if token == r"\sqrt":
      if self.peek() == "[":
        self.take()
        degree = self.expression()
        self.expect("]")
        return sympy.root(self.argument(), degree)
      return sympy.sqrt(self.argument())
    if token in _FUNCTIONS:
      return _FUNCTIONS[token](self.power())
    if token.isalpha():
      return sympy.Symbol(token)
    raise _Unsupported(token)

  def argument(self) -> sympy.Expr:
    """A brace group or one token, as `\\frac12` reads."""
    if self.peek() == "{":
      self.take()
      value = self.expression()
      self.expect("}")
      return value
    token = self.take()
    if _is_number(token) and len(token) > 1:
      self.tokens[self.position - 1:self.position] = [token[0], token[1:]]
      token = token[0]
    if _is_number(token):
      return sympy.Rational(token)
    self.position -= 1
    return self.operand()
