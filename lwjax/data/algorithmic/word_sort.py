"""Word sorting (BIG-Bench Hard; one of GenRM's two algorithmic tasks, arXiv 2408.15240, Sec. 4): a list of
distinct words in alphabetical order. The solution is a selection sort that writes the remaining words at
every step, so each step is a local decision: pick the smallest remaining word, then copy the others in their
order (`none` when no word remains):

  sort : m i p e | k a v o | t u r ?
  pick k a v o rest m i p e | t u r ; pick m i p e rest t u r ; pick t u r rest none ;
  ans k a v o | m i p e | t u r .

(one line in the data). A record's `answer` is the sorted words joined by spaces ("kavo mipe tur").
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from lwjax.data.algorithmic import text
from lwjax.data.algorithmic.text import steps
from lwjax.data.algorithmic.verdict import Verdict, check_steps
from lwjax.data.algorithmic.words import draw_lists

__all__ = ["ERROR_KINDS", "SYMBOLS", "TASK", "check", "generate", "reference_steps", "steps"]

TASK = "word_sort"
KEYWORD, PICK, REST, NONE = "sort", "pick", "rest", "none"
SYMBOLS = (KEYWORD, PICK, REST, NONE)
ERROR_KINDS = ("parse_error", "wrong_word", "not_smallest", "wrong_rest", "missing_step", "extra_step",
               "wrong_answer")


def _remaining(words: Sequence[str], index: int) -> list[str]:
  """The words not yet picked before step `index` of a correct solution, in the question's order."""
  done = set(sorted(words)[:index])
  return [word for word in words if word not in done]


def _step(picked: str, rest: Sequence[str]) -> str:
  return f"{PICK} {text.spell(picked)} {REST} {text.spell_list(rest) if rest else NONE}"


def _steps(words: Sequence[str]) -> list[str]:
  return [_step(picked, [word for word in _remaining(words, index) if word != picked])
          for index, picked in enumerate(sorted(words))]


def reference_steps(record: dict) -> list[str]:
  return _steps(record["words"])


def generate(num: int, *, seed: int, num_words: Sequence[int]) -> list[dict]:
  records = []
  for words in draw_lists(TASK, num, seed=seed, num_words=num_words):
    records.append({
        "task": TASK, "words": words, "question": text.question(KEYWORD, words),
        "solution": text.solution(_steps(words), text.spell_list(sorted(words))),
        "answer": " ".join(sorted(words)), "num_words": len(words),
    })
  return records


def _judge(words: Sequence[str], index: int, tokens: list[str]) -> tuple[str, str]:
  rest_at = tokens.index(REST) if REST in tokens else 0
  picked = text.word_of(tokens[1:rest_at])
  rest = [] if tokens[rest_at + 1:] == [NONE] else text.words_of(tokens[rest_at + 1:])
  if tokens[:1] != [PICK] or picked is None or rest is None:
    return "parse_error", f"step {index} is not '{PICK} <word> {REST} <words>': {' '.join(tokens)!r}"
  remaining = _remaining(words, index)
  if picked not in remaining:
    return "wrong_word", f"step {index} picks {picked!r}, which is not a remaining word"
  if picked != min(remaining):
    return "not_smallest", f"step {index} picks {picked!r}, but {min(remaining)!r} is smaller"
  return "wrong_rest", f"step {index}: the rest is {rest}, expected {[w for w in remaining if w != picked]}"


def check(record: dict, solution_text: str) -> Verdict:
  words = record["words"]
  answer = text.spell_list(sorted(words))
  return check_steps(solution_text, reference_steps(record), answer, functools.partial(_judge, words))
