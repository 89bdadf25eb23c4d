"""Long-context tasks with exact answers for Writing in the Margins (arXiv 2408.14906, §4: multi-hop QA,
aggregation as RULER's common-words extraction, single-hop retrieval), generated here in a symbolic vocabulary
so a small model trained on 2 cores can read them.

A document is a list of segments, each a `section` marker and `segment_words` words of filler sentences
(`w012 w201 w033 .`) among which the task's facts sit. The marker lets a reader find where the segment it is
asked about begins: a margin notes the last segment's facts, with every earlier segment still in the cache.
Every record carries what WiM needs to be trained and scored exactly: the query, the answer, and per segment
the margin a perfect reader writes (the segment's relevant facts, or `none`) and whether that margin is
relevant.

Facts are written source first, `v42 k17 .` ("k17 holds v42"; `fact`), with nothing between the two words:
a reader finds a fact by the word it is asked about and copies the word after it, the pattern a small causal
LM's induction heads read. (With `k17 = v42 .` asked value-first no 4 x 128 reader here learned the lookup in
6,000 steps; in this layout, with copy rows in training, one did in 250: docs/RESULTS.md.)
- `retrieval` (single hop): one fact `v42 k17 .` somewhere, distractor facts about other keys and values;
  query `get v42`, answer `k17` (which key holds the value). A segment's margin: the fact holding the queried
  value, if it holds it.
- `multihop` (variable tracking, as RULER's VT): a chain `v42 k17 .`, `k17 k05 .`, `k05 k09 .` (k17 = v42,
  k05 = k17, k09 = k05) spread over the document in order, and a distractor chain with another value; query
  `find v42`, answer every key of the chain in order. A segment's margin: every assignment it holds (a reader
  of one segment cannot tell the chains apart; the answer joins the links); relevant when it holds one.
- `aggregation` (common words, as RULER's CWE): filler only, `num_common` words repeated `common_repeats`
  times in every segment, the others at most once per segment (about `segment_words` words with the full
  stops); query `common`, answer the common words (alphabetical), scored by F1. A segment's margin: the words
  it repeats (alphabetical); relevant when any.

Text is whitespace-separated words of a fixed vocabulary (`WiMTokenizer`, one id per word, exact round trip); a
reader finetuned from a pretrained model reads the same text through its own tokenizer.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Sequence

from lwjax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID

TASKS = ("retrieval", "multihop", "aggregation")
NUM_KEYS, NUM_VALUES, NUM_FILLER = 64, 100, 256
KEYS = tuple(f"k{i:02d}" for i in range(NUM_KEYS))
VALUES = tuple(f"v{i:02d}" for i in range(NUM_VALUES))
FILLER = tuple(f"w{i:03d}" for i in range(NUM_FILLER))
NONE, YES, NO = "none", "yes", "no"
SECTION = "section"  # the first word of every segment
# Prompt words: after a segment `? <query> note` asks for its margin; `query <q> | <margin> rel` asks whether a
# margin is relevant; `margins <m1> | <m2> ... ? <q> ans` asks for the answer (after the context, or alone).
STRUCTURE = (".", "=", "?", "|", "ans", "note", "rel", "query", "margins", "get", "find", "common", NONE, YES, NO)


class WiMTokenizer:
  """One id per vocabulary word (specials first); text is words separated by single spaces."""
  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

  def __init__(self):
    self.words = (*STRUCTURE, *KEYS, *VALUES, *FILLER, SECTION)
    self._ids = {w: 4 + i for i, w in enumerate(self.words)}
    self.vocab_size = 4 + len(self.words)

  def encode(self, text: str) -> list[int]:
    try:
      return [self._ids[w] for w in text.split()]
    except KeyError as e:
      raise ValueError(f"text: word {e.args[0]!r} is not in the WiM vocabulary") from None

  def decode(self, ids: Sequence[int]) -> str:
    return " ".join(self.words[i - 4] for i in ids if 4 <= int(i) < self.vocab_size)


def encode_segments(tok, segments: Sequence[str]) -> list[int]:
  """The ids of consecutive segments, each encoded on its own, as the WiM engine prefills them: with a subword
  tokenizer (a pretrained reader's) training rows and inference then see the same ids (encoding the joined text
  would merge the space before each segment into its first token). Exact concatenation for `WiMTokenizer`."""
  return [i for segment in segments for i in tok.encode(segment)]


@dataclasses.dataclass(frozen=True)
class Record:
  task: str
  segments: tuple[str, ...]
  query: str
  answer: tuple[str, ...]
  margins: tuple[str, ...]  # per segment: what a perfect reader notes (NONE when nothing)
  relevant: tuple[bool, ...]

  @property
  def context(self) -> str:
    return " ".join(self.segments)


def _filler_sentence(rng: random.Random, words: Sequence[str], length: int) -> list[str]:
  return [rng.choice(words) for _ in range(length)] + ["."]


def _fill(rng: random.Random, segment_words: int, facts: list[list[str]], words: Sequence[str] = FILLER) -> list[str]:
  """A segment of exactly `segment_words` words: the facts (sentences) in order at random places, filler around."""
  fact_words = sum(len(f) for f in facts)
  if fact_words > segment_words:
    raise ValueError(f"segment_words: {segment_words} cannot hold facts of {fact_words} words")
  # Filler sentences of 3-7 words (+ '.') fill the rest; the last one absorbs the remainder.
  sentences, left = [], segment_words - fact_words
  while left > 0:
    n = min(left, rng.randint(4, 8))
    if left - n in (1, 2, 3):  # no room for a sentence of its own: merge the rest into this one
      n = left
    sentences.append(_filler_sentence(rng, words, n - 1))
    left -= n
  slots = sorted(rng.sample(range(len(sentences) + len(facts)), len(facts)))
  out, fi, si = [], 0, 0
  for position in range(len(sentences) + len(facts)):
    if fi < len(facts) and position == slots[fi]:
      out += facts[fi]
      fi += 1
    else:
      out += sentences[si]
      si += 1
  return out


_SOURCES, _TARGETS = frozenset(KEYS + VALUES), frozenset(KEYS)


def fact(source: str, target: str) -> list[str]:
  """The words of one assignment, `target` holds `source`: `v42 k17 .`."""
  return [source, target, "."]


def assignments(text: str) -> list[tuple[str, str]]:
  """(source, target) of every fact of `text` (`fact`'s layout), in order. Filler holds no key or value."""
  words = text.split()
  return [(words[i], words[i + 1]) for i in range(len(words) - 2)
          if words[i] in _SOURCES and words[i + 1] in _TARGETS and words[i + 2] == "."]


def retrieval(rng: random.Random, num_segments: int, segment_words: int, num_distractors: int = 3) -> Record:
  keys = rng.sample(KEYS, 1 + num_distractors)
  facts = list(zip(keys, rng.sample(VALUES, len(keys)), strict=True))
  where = [rng.randrange(num_segments) for _ in facts]
  segments, margins = [], []
  for s in range(num_segments):
    mine = [fact(v, k) for (k, v), w in zip(facts, where, strict=True) if w == s]
    rng.shuffle(mine)
    segments.append(" ".join(_fill(rng, segment_words, mine)))
    margins.append(" ".join(fact(facts[0][1], keys[0])) if where[0] == s else NONE)
  return Record("retrieval", tuple(segments), f"get {facts[0][1]}", (keys[0],), tuple(margins),
                tuple(m != NONE for m in margins))


def _interleave(rng: random.Random, lists: list[list]) -> list:
  """The lists merged in a random order that keeps each list's own order (which chain comes first is random:
  a reader cannot answer by position)."""
  order = [i for i, items in enumerate(lists) for _ in items]
  rng.shuffle(order)
  iters = [iter(items) for items in lists]
  return [next(iters[i]) for i in order]


def multihop(rng: random.Random, num_segments: int, segment_words: int, hops: int = 3) -> Record:
  keys = rng.sample(KEYS, 2 * hops)
  values = rng.sample(VALUES, 2)
  chains = []
  for c in range(2):
    chain = keys[c * hops:(c + 1) * hops]
    chains.append([fact(values[c], chain[0])] + [fact(chain[i - 1], chain[i]) for i in range(1, hops)])
  # Each chain's links in document order: non-decreasing segments.
  placed = [(sorted(rng.randrange(num_segments) for _ in range(hops)), chain) for chain in chains]
  segments, margins = [], []
  for s in range(num_segments):
    mine = _interleave(rng, [[link for spot, link in zip(spots, chain, strict=True) if spot == s]
                             for spots, chain in placed])
    segments.append(" ".join(_fill(rng, segment_words, mine)))
    margins.append(" ".join(w for link in mine for w in link) if mine else NONE)
  return Record("multihop", tuple(segments), f"find {values[0]}", tuple(keys[:hops]), tuple(margins),
                tuple(m != NONE for m in margins))


def aggregation(rng: random.Random, num_segments: int, segment_words: int, num_common: int = 3,
                common_repeats: int = 3) -> Record:
  common = sorted(rng.sample(FILLER, num_common))
  others = [w for w in FILLER if w not in common]
  content = segment_words - segment_words // 6  # words other than the sentences' full stops
  if content - num_common * common_repeats < 1:
    raise ValueError(f"segment_words: {segment_words} cannot hold {num_common} x {common_repeats} common words")
  segments, margins = [], []
  for _ in range(num_segments):
    words = rng.sample(others, content - num_common * common_repeats) + common * common_repeats
    rng.shuffle(words)
    body = [w for start in range(0, len(words), 5) for w in words[start:start + 5] + ["."]]
    segments.append(" ".join(body))
    repeated = sorted(w for w, n in Counter(words).items() if n >= 2)
    margins.append(" ".join(repeated) if repeated else NONE)
  return Record("aggregation", tuple(segments), "common", tuple(common), tuple(margins),
                tuple(m != NONE for m in margins))


GENERATORS = {"retrieval": retrieval, "multihop": multihop, "aggregation": aggregation}


def generate(task: str, num: int, *, seed: int, num_segments: int | Sequence[int], segment_words: int) -> list[Record]:
  """`num` records of `task`, each of a number of segments drawn from `num_segments` (a length listed twice is
  drawn twice as often), every segment led by the `section` marker."""
  if task not in GENERATORS:
    raise ValueError(f"task={task!r}: expected one of {TASKS}")
  rng = random.Random(f"{task}/{seed}")
  choices = [num_segments] if isinstance(num_segments, int) else list(num_segments)
  return [_sectioned(GENERATORS[task](rng, rng.choice(choices), segment_words)) for _ in range(num)]


def _sectioned(record: Record) -> Record:
  return dataclasses.replace(record, segments=tuple(f"{SECTION} {s}" for s in record.segments))


def score(task: str, predicted: str, answer: Sequence[str]) -> float:
  """Exact match (retrieval, multihop: the keys in order) or F1 of the word sets (aggregation)."""
  words = predicted.split()
  if task != "aggregation":
    return float(tuple(words) == tuple(answer))
  got, want = set(words), set(answer)
  if not got or not want:
    return float(got == want)
  hit = len(got & want)
  precision, recall = hit / len(got), hit / len(want)
  return 0.0 if not hit else 2 * precision * recall / (precision + recall)
