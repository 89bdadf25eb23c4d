"""Seeded generator of English-like short stories, the pretraining corpus the project ships as code.

A small probabilistic grammar with structure a language model can learn beyond word frequencies:
the hero's name and animal from the first sentence come back later, the number of things the hero owns
is counted out word by word and updated by arithmetic within the story ("3 plus 4 is 7"), and counting
sequences run between two numbers. A small LM therefore gets its per-token loss far below the unigram
entropy of held-out stories. One document per line, no downloads, deterministic for a seed.
"""

from __future__ import annotations

import os
import random

NAMES = (
    "Anna", "Ben", "Clara", "Dan", "Ella", "Finn", "Grace", "Hugo", "Iris", "Jack", "Kira", "Leo", "Mia",
    "Nora", "Omar", "Pia", "Quinn", "Rosa", "Sam", "Tara", "Uma", "Vic", "Wren", "Yara", "Zoe", "Lily",
    "Max", "Ruby", "Tom", "Lucy",
)
ANIMALS = (
    "cat", "dog", "fox", "rabbit", "bear", "owl", "mouse", "frog", "duck", "horse", "lion", "tiger",
    "turtle", "bird", "pig", "goat", "sheep", "wolf", "deer", "squirrel",
)
ADJECTIVES = (
    "little", "big", "happy", "sleepy", "brave", "kind", "clever", "shy", "funny", "quiet", "curious",
    "gentle", "tiny", "old", "young", "busy", "proud", "silly",
)
PLACES = ("house", "forest", "village", "garden", "cave", "farm", "town", "meadow", "castle", "boat")
# (singular, plural)
OBJECTS = (
    ("apple", "apples"), ("ball", "balls"), ("book", "books"), ("stone", "stones"), ("hat", "hats"),
    ("flower", "flowers"), ("cookie", "cookies"), ("shell", "shells"), ("kite", "kites"),
    ("cup", "cups"), ("star", "stars"), ("leaf", "leaves"), ("box", "boxes"), ("toy", "toys"),
)
# (present, past)
VERBS = (
    ("find", "found"), ("paint", "painted"), ("carry", "carried"), ("hide", "hid"), ("clean", "cleaned"),
    ("build", "built"), ("draw", "drew"), ("throw", "threw"), ("share", "shared"), ("fix", "fixed"),
)
TIMES = ("morning", "evening", "night", "afternoon", "day")
FEELINGS = ("happy", "proud", "tired", "glad", "calm", "excited")
NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
    "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
)
MAX_OWNED = 20  # what the hero owns stays countable in words


def _a(word: str) -> str:
  return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _things(count: int, obj: tuple[str, str]) -> str:
  return f"{NUMBER_WORDS[count]} {obj[0] if count == 1 else obj[1]}"


def _story(rng: random.Random) -> str:
  """One story: introduction, two to five middle sentences drawn from the grammar, an ending."""
  hero, friend = rng.sample(NAMES, 2)
  animal, friend_animal = rng.sample(ANIMALS, 2)
  adjective = rng.choice(ADJECTIVES)
  obj = rng.choice(OBJECTS)
  owned = rng.randint(1, 9)
  sentences = [
      f"Once upon a time, there was {_a(adjective)} {animal} named {hero}.",
      f"{hero} lived in {_a(rng.choice(ADJECTIVES))} {rng.choice(PLACES)} with {_things(owned, obj)}.",
  ]
  for _ in range(rng.randint(2, 5)):
    kind = rng.random()
    if kind < 0.2:
      verb = rng.choice(VERBS)
      sentences.append(f"Every {rng.choice(TIMES)}, {hero} liked to {verb[0]} the {rng.choice(OBJECTS)[1]}.")
    elif kind < 0.4:
      verb, thing = rng.choice(VERBS), rng.choice(OBJECTS)[0]
      sentences.append(f"One day, {hero} met {_a(rng.choice(ADJECTIVES))} {friend_animal} named {friend}. "
                       f"{friend} said, \"Let us {verb[0]} the {thing} together!\" "
                       f"So {hero} and {friend} {verb[1]} the {thing}.")
    elif kind < 0.55:
      counted = ", ".join(NUMBER_WORDS[1:owned + 1])
      sentences.append(f"{hero} counted the {obj[1]}: {counted}.")
    elif kind < 0.75 and owned < MAX_OWNED:
      more = rng.randint(1, MAX_OWNED - owned)
      sentences.append(f"{friend} gave {hero} {_things(more, obj)}. "
                       f"Now {hero} had {owned} plus {more}, which is {owned + more} {obj[1]}.")
      owned += more
    elif kind < 0.85:
      start = rng.randint(0, 30)
      stop = start + rng.randint(3, 8)
      counted = ", ".join(str(n) for n in range(start, stop + 1))
      sentences.append(f"Then {hero} counted from {start} to {stop}: {counted}.")
    else:
      a, b = rng.randint(0, 20), rng.randint(0, 20)
      if rng.random() < 0.5:
        sentences.append(f"The {animal} learned that {a} plus {b} is {a + b}.")
      else:
        a, b = max(a, b), min(a, b)
        sentences.append(f"The {animal} learned that {a} minus {b} is {a - b}.")
  sentences.append(f"In the end, the {adjective} {animal} was {rng.choice(FEELINGS)}, "
                   f"and {hero} still had {_things(owned, obj)}. The end.")
  return " ".join(sentences)


def generate_documents(num_docs: int, *, seed: int, split: str = "train") -> list[str]:
  """`num_docs` stories; `split` names an independent random stream, so train and eval differ."""
  rng = random.Random(f"lwjax-corpus/{split}/{seed}")
  return [_story(rng) for _ in range(num_docs)]


def write_corpus(directory: str, *, num_train_docs: int, num_eval_docs: int, seed: int) -> dict[str, list[str]]:
  """Writes `<directory>/{train,eval}.txt` (one story a line); returns {"train": [path], "eval": [path]}."""
  os.makedirs(directory, exist_ok=True)
  paths = {}
  for split, num_docs in (("train", num_train_docs), ("eval", num_eval_docs)):
    path = os.path.join(directory, f"{split}.txt")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(doc + "\n" for doc in generate_documents(num_docs, seed=seed, split=split))
    os.replace(tmp, path)  # atomic: processes sharing `directory` never read a half-written file
    paths[split] = [path]
  return paths
