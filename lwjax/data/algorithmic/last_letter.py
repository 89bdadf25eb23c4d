"""Last-letter concatenation (Wei et al. 2022; one of GenRM's two algorithmic tasks, arXiv 2408.15240,
Sec. 4): the last letters of a list of words, in order. One step per word, spelled, then its last letter:

  last : k a v o | m i p e | t u r ?
  k a v o -> o ; m i p e -> e ; t u r -> r ; ans o e r .

A record's `answer` is the letters joined ("oer").
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from lwjax.data.algorithmic import text
from lwjax.data.algorithmic.text import steps
from lwjax.data.algorithmic.verdict import Verdict, check_steps
from lwjax.data.algorithmic.words import draw_lists

__all__ = ["ERROR_KINDS", "SYMBOLS", "TASK", "check", "generate", "reference_steps", "steps"]

TASK = "last_letter"
KEYWORD, ARROW = "last", "->"
SYMBOLS = (KEYWORD, ARROW)
ERROR_KINDS = ("parse_error", "wrong_word", "wrong_letter", "missing_step", "extra_step", "wrong_answer")


def _step(word: str) -> str:
  return f"{text.spell(word)} {ARROW} {word[-1]}"


def _answer_text(words: Sequence[str]) -> str:
  return " ".join(word[-1] for word in words)


def generate(num: int, *, seed: int, num_words: Sequence[int]) -> list[dict]:
  records = []
  for words in draw_lists(TASK, num, seed=seed, num_words=num_words):
    records.append({
        "task": TASK, "words": words, "question": text.question(KEYWORD, words),
        "solution": text.solution(list(map(_step, words)), _answer_text(words)),
        "answer": "".join(word[-1] for word in words), "num_words": len(words),
    })
  return records


def reference_steps(record: dict) -> list[str]:
  return list(map(_step, record["words"]))


def _judge(words: Sequence[str], index: int, tokens: list[str]) -> tuple[str, str]:
  word = text.word_of(tokens[:-2])
  if len(tokens) < 3 or tokens[-2] != ARROW or word is None or tokens[-1] not in text.LETTERS:
    return "parse_error", f"step {index} is not '<spelled word> {ARROW} <letter>': {' '.join(tokens)!r}"
  if word != words[index]:
    return "wrong_word", f"step {index} takes {word!r}, expected word {index}: {words[index]!r}"
  return "wrong_letter", f"step {index}: the last letter of {word!r} is {word[-1]!r}, not {tokens[-1]!r}"


def check(record: dict, solution_text: str) -> Verdict:
  words = record["words"]
  return check_steps(solution_text, reference_steps(record), _answer_text(words), functools.partial(_judge, words))
