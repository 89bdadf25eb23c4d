"""Exact tokenizer of the algorithmic tasks' text (GenRM, arXiv 2408.15240, Sec. 4 tasks): one id per letter,
format symbol and keyword of both tasks, and the GenRM verification words (`lwjax.data.verifier_words`)."""

from __future__ import annotations

import functools

from lwjax.data import verifier_words
from lwjax.data.algorithmic import last_letter, text, word_sort
from lwjax.data.tokenizer import WordListTokenizer


@functools.cache
def vocabulary() -> tuple[str, ...]:
  """Letters, shared symbols, each task's symbols, then the verifier words (appended last, so that the ids
  before them stay put if a task adds none)."""
  return (*text.LETTERS, *text.SYMBOLS, *last_letter.SYMBOLS, *word_sort.SYMBOLS, *verifier_words.WORDS)


class AlgorithmicTokenizer(WordListTokenizer):
  """One id per word of `vocabulary()`; an unknown word raises ValueError."""

  def __init__(self):
    super().__init__(vocabulary(), name="algorithmic-task vocabulary")
