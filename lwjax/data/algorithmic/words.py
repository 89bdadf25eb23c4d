"""The word list of the algorithmic tasks: pronounceable lowercase pseudo-words, generated, not downloaded.

GenRM's tasks (arXiv 2408.15240, Sec. 4) use real names and English words; ours are consonant-vowel syllables
(CVC, CVCV, CVCVC, CVCVCV: 3-6 letters), so that nothing is downloaded and the letters, not a memorised
dictionary, carry the task. The words of each shape are picked by SHA-256 of a fixed string, so the list is
the same on every machine, Python version and process. Word lists are drawn from it by `random.Random` seeded
with a string: the same on every machine and process for one Python version.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
from collections.abc import Sequence

CONSONANTS = "bcdfghjklmnprstvwz"
VOWELS = "aeiou"
SHAPES = ("CVC", "CVCV", "CVCVC", "CVCVCV")
WORDS_PER_SHAPE = 1000


def _alphabet(kind: str) -> str:
  return CONSONANTS if kind == "C" else VOWELS


def _word(shape: str, index: int) -> str:
  """The `index`-th word of `shape`, read as a mixed-radix number (last letter fastest)."""
  letters = []
  for kind in reversed(shape):
    index, digit = divmod(index, len(_alphabet(kind)))
    letters.append(_alphabet(kind)[digit])
  return "".join(reversed(letters))


def _pick(shape: str) -> list[str]:
  size = math.prod(len(_alphabet(kind)) for kind in shape)
  chosen: dict[int, None] = {}  # an ordered set
  draw = 0
  while len(chosen) < WORDS_PER_SHAPE:
    digest = hashlib.sha256(f"lwjax-algorithmic-words/{shape}/{draw}".encode()).digest()
    chosen.setdefault(int.from_bytes(digest[:8], "big") % size, None)
    draw += 1
  return [_word(shape, index) for index in chosen]


@functools.cache
def vocabulary() -> tuple[str, ...]:
  """The 4,000 distinct words, sorted."""
  return tuple(sorted(word for shape in SHAPES for word in _pick(shape)))


def draw_lists(task: str, num: int, *, seed: int, num_words: Sequence[int]) -> list[list[str]]:
  """`num` word lists: list i has a length drawn uniformly from `num_words` and distinct words of
  `vocabulary()`, and depends only on (task, seed, i)."""
  vocab = vocabulary()
  if not num_words or any(not 1 <= n <= len(vocab) for n in num_words):
    raise ValueError(f"num_words={num_words!r}: expected a non-empty list of lengths in 1..{len(vocab)}")
  lists = []
  for index in range(num):
    rng = random.Random(f"{task}/{seed}/{index}")
    lists.append(rng.sample(vocab, rng.choice(list(num_words))))
  return lists
