"""Final answers of GSM8K solutions (Cobbe et al. 2021, arXiv 2110.14168) and when two are the same.

A solution's answer is the first number after its last `####` (the dataset's own ending), else after its
last "the answer is" (the few-shot prompts' ending), else in its last `\\boxed{}`, else its last number.
Numbers are read with thousands commas, a `$` sign, a minus and decimals, and compared as exact decimals,
so `18.0`, `18`, `$18.00` and `18 dollars.` are the same answer.
"""

from __future__ import annotations

import decimal
import re

from lwjax.data.math_sets import math_grading

_MARKERS = (re.compile(r"####"), re.compile(r"answer is", re.IGNORECASE))
_NUMBER = re.compile(r"""
    (?P<sign>(?<![\w)\]])[-−])?              # a minus that is no subtraction (5-3 is 3)
    (?<![\d.,])
    (?P<whole>\d{1,3}(?:,\d{3})+(?!\d)|\d+|(?=\.\d))
    (?P<fraction>\.\d+)?
""", re.VERBOSE)


def final_number(text: str) -> str | None:
  """The final answer of a solution in canonical form (`1,234.50` -> `1234.5`), or None if it has none."""
  text = text.replace("$", "")
  for marker in _MARKERS:
    found = list(marker.finditer(text))
    if found and (number := _first_number(text[found[-1].end():])) is not None:
      return number
  boxed = math_grading.final_answer(text) if r"\boxed" in text or r"\fbox" in text else None
  if boxed is not None and (number := _first_number(boxed)) is not None:
    return number
  numbers = list(_NUMBER.finditer(text))
  return _canonical(numbers[-1]) if numbers else None


def same_number(answer: str | None, reference: str | None) -> bool:
  """Whether two answers (as `final_number` gives them, or a dataset's `#### N`) are the same number."""
  if answer is None or reference is None:
    return False
  a, r = final_number(answer), final_number(reference)
  return a is not None and a == r


def _first_number(text: str) -> str | None:
  match = _NUMBER.search(text)
  return _canonical(match) if match else None


def _canonical(match: re.Match) -> str:
  sign = "-" if match["sign"] else ""
  value = decimal.Decimal(sign + (match["whole"] or "0").replace(",", "") + (match["fraction"] or ""))
  value = value.normalize()
  return "0" if value.is_zero() else format(value, "f")
