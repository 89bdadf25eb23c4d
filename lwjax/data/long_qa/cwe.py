"""Common-words extraction generated as RULER does it (Hsieh et al. 2024, arXiv 2404.06654, its
`common_words_extraction.py`), seeded, with nothing downloaded.

A list of words numbered `1. w 2. w ...`: `num_common` words repeated `common_repeats` times among words repeated
`uncommon_repeats` times, shuffled; the question asks for the `num_common` most common words. RULER's repeats: 30
and 3 for a context of 4,096 tokens or more, 6 and 1 below. The number of words is the largest that keeps the
list within the target token length. RULER draws its words from the `wonderwords` lists; here they are
pronounceable made-up words (consonant-vowel syllables) drawn from the seed, so no word list is fetched. RULER's
one worked example before the list is left out: the WiM reader asks the question through its own prompts.
"""

from __future__ import annotations

import random
from collections.abc import Callable

ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "pl", "st", "tr")
VOWELS = ("a", "e", "i", "o", "u")
NUM_COMMON = 10


def vocabulary(num: int, seed: int) -> list[str]:
  """`num` distinct made-up words of two or three syllables, in a seeded order."""
  rng = random.Random(f"cwe-words/{seed}")
  words: dict[str, None] = {}
  while len(words) < num:
    words["".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(rng.choice((2, 3))))] = None
  return list(words)


def repeats(target_tokens: int) -> tuple[int, int]:
  """(common, uncommon) repeats RULER uses at this context length."""
  return (30, 3) if target_tokens >= 4096 else (6, 1)


def word_list(rng: random.Random, words: list[str], num_words: int, num_common: int, common_repeats: int,
              uncommon_repeats: int) -> tuple[list[str], list[str]]:
  """(the shuffled list, the common words): RULER's `get_example`."""
  chosen = rng.sample(words, num_words)
  common, uncommon = chosen[:num_common], chosen[num_common:]
  items = common * common_repeats + uncommon * uncommon_repeats
  rng.shuffle(items)
  return items, common


def numbered(items: list[str]) -> list[str]:
  return [f"{i + 1}. {w}" for i, w in enumerate(items)]


def question(num_common: int = NUM_COMMON) -> str:
  return f"What are the {num_common} most common words in the above list?"


def generate(rng: random.Random, target_tokens: int, count_tokens: Callable[[str], int], *,
             num_common: int = NUM_COMMON) -> tuple[list[str], list[str]]:
  """(the numbered items `1. w`, the common words) of one list of at most `target_tokens` tokens (at least
  `num_common` + 1 words, whatever their length)."""
  common_repeats, uncommon_repeats = repeats(target_tokens)
  probe = numbered(vocabulary(64, 0) * 4)
  per_item = max(1e-3, count_tokens(" ".join(probe)) / len(probe))
  items_fit = target_tokens / per_item
  num_words = max(num_common + 1, int((items_fit - num_common * common_repeats) / uncommon_repeats) + num_common)
  words = vocabulary(2 * num_words + 1000, 0)
  while True:
    items, common = word_list(rng, words, num_words, num_common, common_repeats,
                              uncommon_repeats)
    text = numbered(items)
    if count_tokens(" ".join(text)) <= target_tokens or num_words <= num_common + 1:
      return text, common
    num_words = max(num_common + 1, int(num_words * 0.95))
