r"""Final answers of MATH solutions (Hendrycks et al. 2021, arXiv 2103.03874) and when two are the same.

`final_answer(text)`: the content of the last `\boxed{}`/`\fbox{}` (or `\boxed 5`), else of the last
"final answer is $X$" (the Minerva prompt's ending, Lewkowycz et al. 2022, used by the compute-matched
sampling paper, arXiv 2408.16737). `normalize` rewrites an answer as the MATH equivalence does (Hendrycks'
`is_equiv`: `\dfrac`, `\left`, `\!`, `^\circ`, `\%`, `\$`, units, `\sqrt2`, `\frac12`, `a/b`, a leading
`x =`), with Minerva's and PRM800K's handling of `\text{}`, unit words, "and" and thousands separators.
`equivalent` compares two answers: the same normal form, else tuples, intervals, unions, sets, lists and
matrices element by element, else by value (`latex_sympy`) under PRM800K's two rules: an integer answer
must be written as an integer, and two fractions must be the same fraction (unreduced ones do not match).
"""

from __future__ import annotations

import decimal
import re

from lwjax.data.math_sets import latex_sympy

_BOX_COMMANDS = (r"\boxed", r"\fbox")
_FINAL_ANSWER = re.compile(r"final answer is\s*", re.IGNORECASE)
_SPACES = re.compile(r"(?<!\\)\\(?:[,;: ]|q?quad(?![A-Za-z]))|~")  # not the `\\` of a matrix row
_TEXT_ALIASES = re.compile(r"\\(?:textbf|textit|textrm|textnormal|mathrm|mathbf|mathit|boldsymbol|mbox)(?![A-Za-z])")
_UNIT = r"[A-Za-z][A-Za-z ./]*"
_TRAILING_TEXT_UNIT = re.compile(rf"^(?P<value>.*\d.*?)\s*\\text\{{\s*{_UNIT}\}}\s*(?:\^\{{?[23]\}}?)?$")
# Unit words written without \text (PRM800K's and Minerva's lists, less ones that are also variables: m, in).
_TRAILING_UNIT_WORD = re.compile(
    r"^(?P<value>.*\d.*?)\s*(?<![A-Za-z\\])(?:(?:square|sq\.?|cubic)\s*)?(?:units?|cm|centimeters?|mm|km|meters?|kilometers?|"
    r"inch(?:es)?|feet|foot|ft|yards?|miles?|mph|degrees?|radians?|dollars?|cents?|seconds?|minutes?|hours?|"
    r"days?|weeks?|months?|years?|pounds?|ounces?|grams?|kg|liters?|gallons?|ways|points|people|students)\.?"
    r"\s*(?:\^\{?[23]\}?)?$")
_VARIABLE = re.compile(r"[A-Za-z](?:_\{?[A-Za-z0-9]+\}?)?(?:\([A-Za-z]\))?|\\[A-Za-z]+")
_MATRIX = re.compile(r"^\\begin\{([pbvB]?matrix)\}(.*)\\end\{\1\}$")
_INTEGER = re.compile(r"-?\d+")
_FRACTION = re.compile(r"-?\\frac\{\d+\}\{\d+\}")


def final_answer(text: str) -> str | None:
  """The stated final answer of a solution: the last box's content, or the last "final answer is $X$"."""
  box = max(text.rfind(command) for command in _BOX_COMMANDS)
  stated = list(_FINAL_ANSWER.finditer(text))
  if stated and stated[-1].start() > box:
    rest = text[stated[-1].end():]
    if rest.startswith("$"):
      closing = rest.find("$", 1)
      return rest[1:closing].strip() if closing > 0 else None
    return re.split(r"\.(?:\s|$)|\n", rest, maxsplit=1)[0].strip() or None
  if box < 0:
    return None
  start = box + len(next(c for c in _BOX_COMMANDS if text.startswith(c, box)))
  if text.startswith("{", start):
    end = _group_end(text, start)
    return text[start + 1:end - 1].strip() if end is not None else None
  # `\boxed 5`: the rest of the math, as Hendrycks reads it.
  return re.split(r"\$|\n", text[start:], maxsplit=1)[0].strip().rstrip(".") or None


def normalize(answer: str) -> str:
  """The normal form of an answer; two answers with the same one are the same."""
  s = answer.strip().replace("\n", " ").replace("{,}", ",")
  s = re.sub(r"(?<!\\)\\!", "", s)
  s = _SPACES.sub(" ", s)
  s = re.sub(r"\\[dt]frac(?![A-Za-z])", r"\\frac", s)
  s = re.sub(r"\\(?:left|right|displaystyle|bigl|bigr|big|Bigl|Bigr|Big)(?![A-Za-z])", "", s)
  s = re.sub(r"\\?\$|\\?%", "", s)
  s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree|°", "", s)
  s = _TEXT_ALIASES.sub(r"\\text", s)
  s = _TRAILING_TEXT_UNIT.sub(r"\g<value>", s)
  s = _unwrap(s, r"\text")
  while (unitless := _TRAILING_UNIT_WORD.sub(r"\g<value>", s)) != s:
    s = unitless
  s = re.sub(r"\s+(?:and|or)\s+", ",", s.strip())
  if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
    s = s.replace(",", "")
  s = s.replace(" ", "")
  s = _strip_assignment(s)
  s = _brace_short_arguments(s, r"\sqrt", 1)
  s = _brace_short_arguments(s, r"\frac", 2)
  s = re.sub(r"(^|[^\d}])\.(\d)", r"\g<1>0.\2", s)
  if re.fullmatch(r"-?\d+\.\d+", s):
    s = format(decimal.Decimal(s).normalize(), "f")
  s = re.sub(r"^(-?)(\d+)/(\d+)$", r"\1\\frac{\2}{\3}", s)
  s = re.sub(r"^\\frac\{-(\d+)\}", r"-\\frac{\1}", s)
  s = re.sub(r"^\(([A-Ea-e])\)$", r"\1", s)
  while s.startswith("{") and _group_end(s, 0) == len(s):
    s = s[1:-1]
  if re.fullmatch(r"[A-Za-z]{2,}", s):
    s = s.lower()
  return "0" if s == "-0" else s


def equivalent(answer: str | None, reference: str | None) -> bool:
  """Whether `answer` is the same as `reference` (see the module docstring); a missing answer is never."""
  if answer is None or reference is None:
    return False
  a, r = normalize(answer), normalize(reference)
  return bool(a) and (a == r or _same_parts(a, r))


def _same_parts(a: str, r: str) -> bool:
  kind_a, items_a = _parts(a)
  kind_r, items_r = _parts(r)
  if kind_a != kind_r or len(items_a) != len(items_r):
    return False
  if kind_a is None:
    return _same_scalar(a, r)
  if kind_a in ("set", "list"):
    # Unordered: "list all solutions" answers come in any order.
    unused = list(items_r)
    for item in items_a:
      match = next((i for i, other in enumerate(unused) if equivalent(item, other)), None)
      if match is None:
        return False
      unused.pop(match)
    return True
  return all(equivalent(x, y) for x, y in zip(items_a, items_r, strict=True))


def _parts(s: str) -> tuple[str | tuple | None, list[str]]:
  """How an answer is built: (kind, items), kind None for a single value."""
  union = _split_top_level(s, r"\cup")
  if len(union) > 1:
    return "union", union
  if matrix := _MATRIX.match(s):
    rows = [row.split("&") for row in matrix.group(2).split(r"\\") if row]
    return ("matrix", tuple(len(row) for row in rows)), [cell for row in rows for cell in row]
  if s.startswith(r"\{") and s.endswith(r"\}"):
    return "set", _split_top_level(s[2:-2], ",")
  if len(s) > 2 and s[0] in "([" and s[-1] in ")]" and _closes_at_end(s):
    items = _split_top_level(s[1:-1], ",")
    if len(items) > 1:
      return s[0] + s[-1], items
  items = _split_top_level(s, ",")
  return ("list", items) if len(items) > 1 else (None, [s])


def _same_scalar(a: str, r: str) -> bool:
  if bool(_INTEGER.fullmatch(a)) != bool(_INTEGER.fullmatch(r)):
    return False
  if _FRACTION.fullmatch(a) and _FRACTION.fullmatch(r):
    return False
  return latex_sympy.same_value(a, r)


def _strip_assignment(s: str) -> str:
  """`x=5`, `a_1=5`, `f(x)=5`, `\\theta=5` -> `5` (Hendrycks drops a short left side)."""
  sides = s.split("=")
  if len(sides) > 1 and all(_VARIABLE.fullmatch(side) for side in sides[:-1]):
    return sides[-1]
  return s


def _group_end(s: str, start: int) -> int | None:
  """The index after the brace that closes the group opening at `start`; escaped braces do not count."""
  depth, i = 0, start
  while i < len(s):
    if s[i] == "\\":
      i += 2
      continue
    depth += {"{": 1, "}": -1}.get(s[i], 0)
    i += 1
    if depth == 0:
      return i
  return None


def _unwrap(s: str, command: str) -> str:
  """`\\text{abc}` -> `abc`, for every occurrence."""
  while (start := s.find(command + "{")) >= 0:
    end = _group_end(s, start + len(command))
    if end is None:
      return s
    s = s[:start] + s[start + len(command) + 1:end - 1] + s[end:]
  return s


def _brace_short_arguments(s: str, command: str, num_arguments: int) -> str:
  r"""`\sqrt2` -> `\sqrt{2}`, `\frac12` -> `\frac{1}{2}`, `\frac1{72}` -> `\frac{1}{72}`."""
  out, i = [], 0
  while (start := s.find(command, i)) >= 0:
    out.append(s[i:start + len(command)])
    i = start + len(command)
    if i < len(s) and s[i].isalpha():
      continue  # another command, e.g. `\fracture`
    if s.startswith("[", i) and (close := s.find("]", i)) > 0:
      out.append(s[i:close + 1])  # the degree of `\sqrt[3]{x}`
      i = close + 1
    for _ in range(num_arguments):
      if i < len(s) and s[i] == "{":
        end = _group_end(s, i) or len(s)
        out.append(s[i:end])
        i = end
      elif i < len(s) and s[i] != "\\":
        out.append("{" + s[i] + "}")
        i += 1
  out.append(s[i:])
  return "".join(out)


def _split_top_level(s: str, separator: str) -> list[str]:
  """`s` split at `separator`s outside brackets of any kind (intervals mix them: `(1,2]`)."""
  items, depth, start, i = [], 0, 0, 0
  while i < len(s):
    if s.startswith(separator, i) and depth == 0:
      items.append(s[start:i])
      i = start = i + len(separator)
      continue
    if s[i] == "\\" and s.startswith(("\\{", "\\}"), i):
      depth += 1 if s[i + 1] == "{" else -1
      i += 2
      continue
    depth += 1 if s[i] in "([{" else -1 if s[i] in ")]}" else 0
    i += 1
  items.append(s[start:])
  return items


def _closes_at_end(s: str) -> bool:
  """Whether the bracket opening `s` is closed only by its last character."""
  depth = 0
  for i, char in enumerate(s):
    depth += 1 if char in "([{" else -1 if char in ")]}" else 0
    if depth == 0 and i < len(s) - 1:
      return False
  return True
