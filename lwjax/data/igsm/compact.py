"""The compact rendering of iGSM (ours, for models trained in minutes on a CPU; the problems are Physics of
LMs 2.1's, Sec. 2): the same problems, solutions and step checker, written with short symbolic tokens.

Items are named by their place in the structure graph: layer letter A-D (outermost first) and index 0-3,
and a parameter is one token: `A1B2` is the number of item B2 in each A1 (an instance parameter, A1 holds
B2), `A1C` the number of layer-C items in A1 (an abstract parameter). Every token is separated by one
space, so the tokenizer (`CompactTokenizer`) is a fixed word list. A problem in `fmt="compact"`:

  A0B1 = 9 . A1B0 = 13 + ( B1C0 + A0B1 ) . B1C0 = 13 . ? A1B0
  B1C0 a = 13 . A0B1 b = 9 . A1B0 c ; d = a + b = 13 + 9 = 22 ; c = 13 + d = 13 + 22 = 12 . ans 12 .

Statement sentences are `P = 9`, `P = Q`, `P = Q + R`, `P = Q - R`, `P = 5 + Q`, `P = 5 * ( Q + R )`;
the question is `? P` after the statement. A solution step is the English step word for word with the
phrasing dropped: "Define <name> as s; <equations>; so s = ..." is `P s ; <equations> ; s = ...`, and a
step of one equation ("Define <name> as s; so s = ...") is `P s = ...`; the variables, the equations
(names, then values, then the result) and their order are unchanged, but the variables are renamed to the
canonical letters a, b, c, ... in the order the solution binds them (the English form draws them at random
per problem, which a small model cannot predict and greedy decoding then repeats); a wrong step
of the retry data is `P [BACK]`; "Answer: 12" is `ans 12`. So the rendering is a bijection, sentence by
sentence, and `check` judges a compact solution by translating it to the English text (`to_english`) and
checking that: the same verdicts, error kinds and step indices on the same solutions.

Against the `small` preset's English (word-level `IGSMTokenizer`) at ops 1-5, questions take 2.7x fewer
tokens and solutions 1.5-1.8x (their equations are the same tokens in both forms), whole problems 1.8-2.3x
(~95 tokens at op 3 instead of ~185); `tests/data/test_igsm_compact.py` keeps the floor.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from lwjax.data import verifier_words
from lwjax.data.igsm import graph
from lwjax.data.igsm.graph import Param, Rule, Structure
from lwjax.data.igsm.names import SYMBOLS
from lwjax.data.igsm.solution import ANSWER_PREFIX, sentences
from lwjax.data.tokenizer import WordListTokenizer

if TYPE_CHECKING:
  from lwjax.data.igsm.problem import Problem

LAYERS = "ABCD"  # the generator draws 2-4 layers ...
MAX_WIDTH = 4  # ... of 2-4 items each
BACK = "[BACK]"  # as `lwjax.data.igsm.retry.BACK` (not imported: retry imports this module)
ANSWER = "ans"
QUESTION = "?"
PUNCTUATION = ("=", "+", "-", "*", "(", ")", ";", ".")
_COMBINE = {"sum": "+", "diff": "-"}
_MODIFIER = {"more": "+", "times": "*"}


def item_token(layer: int, index: int) -> str:
  return f"{LAYERS[layer]}{index}"


def param_token(p: Param) -> str:
  """`A1B2` (instance: item B2 in each A1) or `A1C` (abstract: layer-C items in A1)."""
  owner = item_token(p.layer, p.item)
  return owner + (item_token(p.layer + 1, p.target) if p.kind == "inst" else LAYERS[p.target])


@functools.cache
def param_tokens() -> tuple[str, ...]:
  """Every parameter token of any structure the generator can draw."""
  tokens = []
  for layer in range(len(LAYERS) - 1):
    for item in range(MAX_WIDTH):
      tokens += [param_token(Param("inst", layer, item, child)) for child in range(MAX_WIDTH)]
      tokens += [param_token(Param("abs", layer, item, target)) for target in range(layer + 1, len(LAYERS))]
  return tuple(tokens)


@functools.cache
def vocabulary() -> tuple[str, ...]:
  """The compact word list: numbers 0-22, parameters, variables, operators, markers, then the GenRM
  verification words not already in it (appended last, so the ids of the solvers' words stay put)."""
  words = (*map(str, range(graph.MOD)), *param_tokens(), *SYMBOLS, *PUNCTUATION, QUESTION, ANSWER, BACK)
  return words + tuple(w for w in verifier_words.WORDS if w not in words)


def statement_sentence(p: Param, rule: Rule) -> str:
  """`P = <formula>` for instance parameter `p` (no period)."""
  if not rule.deps:
    return f"{param_token(p)} = {rule.const}"
  body = f" {_COMBINE[rule.combine]} ".join(param_token(d) for d in rule.deps)
  if rule.modifier != "none":
    body = f"( {body} )" if len(rule.deps) > 1 else body
    body = f"{rule.const} {_MODIFIER[rule.modifier]} {body}"
  return f"{param_token(p)} = {body}"


def join(parts: Iterable[str]) -> str:
  """Sentences as text: each ends with " ."."""
  return " ".join(f"{part} ." for part in parts)


def statement(problem: Problem) -> str:
  return join(statement_sentence(p, problem.rules[p]) for p in problem.statement_order)


def query_text(problem: Problem) -> str:
  return f"{QUESTION} {param_token(problem.query)}"


class _Names:
  """English "X's Y" names <-> compact tokens of one problem: every pair of the problem's items or of an item
  and a category (parameter or not, so that a wrong step's name survives), other names with "_" for " "."""

  def __init__(self, s: Structure):
    items = {name: item_token(layer, i) for layer, names in enumerate(s.items) for i, name in enumerate(names)}
    wanted = {**items, **{category: LAYERS[layer] for layer, category in enumerate(s.categories)}}
    self.token_of = {f"{x}'s {y}": items[x] + token for x in items for y, token in wanted.items()}
    self.token_of.update({s.name(p): param_token(p) for p in s.params})
    self.name_of = {token: name for name, token in self.token_of.items()}

  def token(self, name: str) -> str:
    return self.token_of.get(name, name.replace(" ", "_"))

  def name(self, token: str) -> str:
    return self.name_of.get(token, token.replace("_", " "))


def _canonical_letters(problem: Problem) -> dict[str, str]:
  """The problem's variable letters (its shuffled `symbols`, taken in order by the solution writer) -> the
  canonical letters a, b, c, ...: the k-th variable a solution binds is always the k-th letter."""
  return dict(zip(problem.symbols, SYMBOLS, strict=False))


def _english_to_compact_sentence(sentence: str, names: _Names) -> str:
  if sentence.startswith(ANSWER_PREFIX):
    return f"{ANSWER} {sentence[len(ANSWER_PREFIX):]}"
  parts = sentence.split("; ")
  head, symbol = parts[0], None
  if head.startswith("Define ") and " as " in head:
    name, _, symbol = head[len("Define "):].rpartition(" as ")
    parts[0] = f"{names.token(name)} {symbol}"
  if len(parts) > 1 and parts[-1].startswith("so "):
    parts[-1] = parts[-1][len("so "):]
    if len(parts) == 2 and symbol is not None and parts[1].startswith(f"{symbol} = "):
      return f"{parts[0]} {parts[1][len(symbol) + 1:]}"  # "P s = ...": the step is its one equation
  return " ; ".join(parts)


def _compact_to_english_sentence(sentence: str, names: _Names) -> str:
  words = sentence.split()
  if len(words) == 2 and words[0] == ANSWER:
    return f"{ANSWER_PREFIX}{words[1]}"
  parts = [part.strip() for part in sentence.split(";")]
  head = parts[0].split()
  if len(parts) == 1 and len(head) > 3 and head[2] == "=":  # "P s = ...": header and its one equation
    parts, head = [" ".join(head[:2]), " ".join(head[1:])], head[:2]
  if len(head) == 2:
    parts[0] = f"Define {names.name(head[0])} as {head[1]}"
    if len(parts) > 1:
      parts[-1] = f"so {parts[-1]}"
  return "; ".join(parts)


def _rename(sentence: str, letters: Mapping[str, str]) -> str:
  return " ".join(letters.get(word, word) for word in sentence.split(" "))


def to_compact(problem: Problem, text: str) -> str:
  """An English solution text (steps, retries, answer; right or wrong) in the compact form."""
  names, letters = _Names(problem.structure), _canonical_letters(problem)
  return join(_rename(_english_to_compact_sentence(sentence, names), letters) for _, sentence in sentences(text))


def to_english(problem: Problem, text: str) -> tuple[str, list[tuple[int, int]]]:
  """A compact solution text in the English form, and (English offset, compact offset) of each sentence."""
  names = _Names(problem.structure)
  letters = {canonical: letter for letter, canonical in _canonical_letters(problem).items()}
  english, starts, at = [], [], 0
  for start, sentence in sentences(text):
    english.append(_compact_to_english_sentence(_rename(sentence, letters), names))
    starts.append((at, start))
    at += len(english[-1]) + 2  # ". " between sentences
  return ". ".join(english) + ("." if english else ""), starts


def compact_position(english_position: int | None, english: str, starts: list[tuple[int, int]],
                     compact_len: int) -> int | None:
  """The compact offset of the sentence that starts at (or holds) `english_position`; past the English text's
  last sentence, the compact text's end."""
  if english_position is None:
    return None
  if english_position >= len(english):
    return compact_len
  return max((c for e, c in starts if e <= english_position), default=compact_len)


class CompactTokenizer(WordListTokenizer):
  """One id per word of `vocabulary()`; an unknown word raises ValueError."""

  def __init__(self):
    super().__init__(vocabulary(), name="compact iGSM vocabulary")
