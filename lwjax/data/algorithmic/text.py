"""The text format of the algorithmic tasks (GenRM, arXiv 2408.15240, Sec. 4: last-letter concatenation and
word sorting), shared by both: every token separated by one space, words spelled letter by letter (`kavo` is
`k a v o`) so that a model sees letters, lists joined by `|`, each solution step ended by `;`, and the
solution ended by `ans <answer> .`:

  <keyword> : k a v o | m i p e ?
  <step> ; <step> ; ans <answer> .

`parse` reads any text (a model's output) in this form, without judging the steps.
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Sequence

LETTERS = tuple(string.ascii_lowercase)
COLON, WORD_SEP, QUESTION_MARK, STEP_END, ANSWER, END = ":", "|", "?", ";", "ans", "."
SYMBOLS = (COLON, WORD_SEP, QUESTION_MARK, STEP_END, ANSWER, END)
_TOKEN = re.compile(r"\S+")


def spell(word: str) -> str:
  return " ".join(word)


def spell_list(words: Sequence[str]) -> str:
  return f" {WORD_SEP} ".join(map(spell, words))


def question(keyword: str, words: Sequence[str]) -> str:
  return f"{keyword} {COLON} {spell_list(words)} {QUESTION_MARK}"


def solution(steps: Sequence[str], answer: str) -> str:
  return " ".join(f"{step} {STEP_END}" for step in steps) + f" {ANSWER} {answer} {END}"


def word_of(tokens: Sequence[str]) -> str | None:
  """The word spelled by `tokens` (one letter each), or None if they are empty or not all letters."""
  if not tokens or any(token not in LETTERS for token in tokens):
    return None
  return "".join(tokens)


def words_of(tokens: Sequence[str]) -> list[str] | None:
  """The words of a `|`-separated spelled list, or None if any is not a spelled word."""
  words, word = [], []
  for token in [*tokens, WORD_SEP]:
    if token != WORD_SEP:
      word.append(token)
      continue
    words.append(word_of(word))
    word = []
  return None if None in words else words


@dataclasses.dataclass(frozen=True)
class ParsedSolution:
  """`steps`: (character offset, the step's tokens joined by one space, whether a `;` ends it), for each step
  before the first `ans` (a last step without `;` is kept, marked unended); `ending_at`: offset of that `ans`,
  or len(text) if none; `answer`: the final answer, the tokens between the last `ans` and the next `.` joined
  by one space (None without both); `malformed_at`: None if the text ends with exactly one `ans <answer> .`,
  else where that fails (len(text) without `ans`, `ending_at` without `.`, else the first token after `.` or
  a second `ans`)."""
  steps: list[tuple[int, str, bool]]
  ending_at: int
  answer: str | None
  malformed_at: int | None


def parse(text: str) -> ParsedSolution:
  tokens = [(m.start(), m.group()) for m in _TOKEN.finditer(text)]
  words = [token for _, token in tokens]
  ending = words.index(ANSWER) if ANSWER in words else len(tokens)
  steps, current, start = [], [], None
  for at, token in tokens[:ending]:
    start = at if start is None else start
    if token == STEP_END:
      steps.append((start, " ".join(current), True))
      current, start = [], None
    else:
      current.append(token)
  if current:
    steps.append((start, " ".join(current), False))
  if ending == len(tokens):
    return ParsedSolution(steps, len(text), None, len(text))
  last = len(words) - 1 - words[::-1].index(ANSWER)
  answer = " ".join(words[last + 1:words.index(END, last)]) if END in words[last:] else None
  malformed_at = tokens[ending][0]
  for i in range(ending + 1, len(tokens)):
    if words[i] in (ANSWER, END):
      malformed_at = tokens[i][0] if words[i] == ANSWER else (tokens[i + 1][0] if i + 1 < len(tokens) else None)
      break
  return ParsedSolution(steps, tokens[ending][0], answer, malformed_at)


def steps(solution_text: str) -> list[str]:
  """The step strings of a solution (answer excluded), tokens joined by one space."""
  return [step for _, step, _ in parse(solution_text).steps]
