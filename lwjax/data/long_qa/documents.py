"""Long documents for Writing in the Margins (arXiv 2408.14906, §4): an example's gold passages among distractor
passages up to a target token length, shuffled by a seed, then cut into segments of about `segment_tokens` tokens
at passage boundaries (the paper cuts its contexts into segments of at least 4k tokens at sentence boundaries).

Distractors are the example's own first (HotpotQA's eight paragraphs retrieved for its question), then passages
drawn from the whole set's pool; a passage already in the document, or equal to a gold one, is not drawn again.
Lengths are counted by the reader's tokenizer (`count_tokens`), passage by passage with their separators.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence

from lwjax.data.long_qa import cwe
from lwjax.data.long_qa.sets import QAExample, QASet

CountTokens = Callable[[str], int]


@dataclasses.dataclass(frozen=True)
class LongDocument:
  id: str
  question: str
  answers: tuple[str, ...]
  passages: tuple[str, ...]  # in reading order
  gold: tuple[int, ...]  # indices of the passages holding the evidence
  separator: str = "\n\n"
  kind: str = ""

  @property
  def text(self) -> str:
    return self.separator.join(self.passages)


def assemble(example: QAExample, pool: Sequence, *, target_tokens: int, count_tokens: CountTokens,
             rng: random.Random) -> LongDocument:
  """`example`'s gold passages and distractors up to `target_tokens` (the gold ones always, even past it), in a
  shuffled order. `pool`: the set's passages (`sets.Passage`)."""
  separator = "\n\n"
  gold = [p.render() for p in example.gold]
  chosen, seen = [], set(gold)
  total = sum(count_tokens(g + separator) for g in gold)

  def candidates():
    yield from example.distractors
    for i in rng.sample(range(len(pool)), len(pool)):
      yield pool[i]

  for passage in candidates():
    text = passage.render()
    if text in seen:
      continue
    size = count_tokens(text + separator)
    if total + size > target_tokens:
      break
    chosen.append(text)
    seen.add(text)
    total += size
  passages = [(g, True) for g in gold] + [(c, False) for c in chosen]
  rng.shuffle(passages)
  return LongDocument(example.id, example.question, example.answers, tuple(p for p, _ in passages),
                      tuple(i for i, (_, is_gold) in enumerate(passages) if is_gold), separator, example.kind)


def qa_documents(qa: QASet, num: int, *, target_tokens: int, count_tokens: CountTokens, seed: int,
                 answerable_only: bool = True) -> list[LongDocument]:
  """`num` examples of the set drawn by `seed` (the same seed, the same examples at every length), each assembled
  to `target_tokens`. SQuAD v2's unanswerable questions are left out unless `answerable_only` is False: the paper
  asks questions whose answer the document holds."""
  examples = [e for e in qa.examples if e.answers or not answerable_only]
  if not examples:
    raise ValueError(f"{qa.name}: no answerable example")
  picked = random.Random(f"{qa.name}/{seed}").sample(examples, min(num, len(examples)))
  return [assemble(e, qa.pool, target_tokens=target_tokens, count_tokens=count_tokens,
                   rng=random.Random(f"{qa.name}/{seed}/{target_tokens}/{e.id}")) for e in picked]


def cwe_documents(num: int, *, target_tokens: int, count_tokens: CountTokens, seed: int,
                  items_per_passage: int = 10) -> list[LongDocument]:
  """`num` common-words lists (`cwe.generate`) of at most `target_tokens`; a passage holds `items_per_passage`
  numbered words, and every passage counts as gold (the answer is counted over the whole list)."""
  docs = []
  for i in range(num):
    items, common = cwe.generate(random.Random(f"cwe/{seed}/{target_tokens}/{i}"), target_tokens, count_tokens)
    passages = tuple(" ".join(items[j:j + items_per_passage]) for j in range(0, len(items), items_per_passage))
    docs.append(LongDocument(f"cwe-{i}", cwe.question(len(common)), tuple(common), passages,
                             tuple(range(len(passages))), " ", "cwe"))
  return docs


def segments(doc: LongDocument, *, segment_tokens: int, count_tokens: CountTokens) -> tuple[list[str], list[bool]]:
  """(the segment texts, whether each holds a gold passage): passages packed in order into segments of at most
  `segment_tokens` tokens (a longer passage is a segment alone). Each segment but the last ends with the
  separator, so the segments joined are the document's text."""
  groups: list[list[int]] = []
  size = segment_tokens + 1
  for i, passage in enumerate(doc.passages):
    n = count_tokens(passage + doc.separator)
    if size + n > segment_tokens:
      groups.append([])
      size = 0
    groups[-1].append(i)
    size += n
  texts = [doc.separator.join(doc.passages[i] for i in group) for group in groups]
  texts = [t + doc.separator for t in texts[:-1]] + texts[-1:]
  gold = set(doc.gold)
  return texts, [any(i in gold for i in group) for group in groups]
