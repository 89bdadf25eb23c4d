"""Tests of the generated story corpus: determinism, speed, and the structure a language model can learn."""

import collections
import itertools
import math
import re
import time

from lwjax.data import corpus


def _words(doc):
  return re.findall(r"\w+|[^\w\s]", doc)


def test_write_corpus_is_deterministic_and_splits_differ(tmp_path):
  a = corpus.write_corpus(str(tmp_path / "a"), num_train_docs=300, num_eval_docs=50, seed=7)
  b = corpus.write_corpus(str(tmp_path / "b"), num_train_docs=300, num_eval_docs=50, seed=7)
  c = corpus.write_corpus(str(tmp_path / "c"), num_train_docs=300, num_eval_docs=50, seed=8)
  def read(paths):
    return open(paths[0], encoding="utf-8").read()
  assert set(a) == {"train", "eval"}
  assert read(a["train"]) == read(b["train"]) and read(a["eval"]) == read(b["eval"])
  assert read(a["train"]) != read(c["train"])
  train, evals = read(a["train"]).splitlines(), read(a["eval"]).splitlines()
  assert len(train) == 300 and len(evals) == 50 and all(train) and all(evals)
  assert not set(train) & set(evals)
  assert train == corpus.generate_documents(300, seed=7)


def test_twenty_thousand_docs_are_fast(tmp_path):
  start = time.perf_counter()
  corpus.write_corpus(str(tmp_path), num_train_docs=20_000, num_eval_docs=0, seed=0)
  assert time.perf_counter() - start < 2.0


def test_stories_are_consistent():
  """The hero's name comes back at the end, and every arithmetic fact and count is right."""
  for doc in corpus.generate_documents(500, seed=1):
    hero = re.match(r"Once upon a time, there was an? \w+ \w+ named (\w+)\.", doc).group(1)
    for a, op, b, result in re.findall(r"(\d+) (plus|minus) (\d+),? (?:is|which is) (\d+)", doc):
      assert int(result) == (int(a) + int(b) if op == "plus" else int(a) - int(b))
    for start, stop, counted in re.findall(r"counted from (\d+) to (\d+): ([\d, ]+)\.", doc):
      assert [int(n) for n in counted.split(", ")] == list(range(int(start), int(stop) + 1))
    owned = re.search(r"lived in an? \w+ \w+ with (\w+) ", doc).group(1)
    owned = corpus.NUMBER_WORDS.index(owned)
    for added in re.findall(r"which is (\d+) ", doc):
      owned = int(added)
    assert re.search(rf"and {hero} still had {corpus.NUMBER_WORDS[owned]} \w+\. The end\.$", doc)


def test_context_predicts_far_better_than_unigram():
  """A word bigram model already beats the unigram baseline on held-out stories by a wide margin."""
  train = [_words(d) for d in corpus.generate_documents(2000, seed=0)]
  held_out = [_words(d) for d in corpus.generate_documents(200, seed=0, split="eval")]
  unigram = collections.Counter(w for d in train for w in d)
  bigram = collections.Counter(p for d in train for p in itertools.pairwise(d))
  vocab, total = len(unigram) + 1, sum(unigram.values())
  unigram_ce = [-math.log((unigram[w] + 1) / (total + vocab)) for d in held_out for w in d]
  bigram_ce = [-math.log((bigram[a, b] + 1) / (unigram[a] + vocab)) for d in held_out for a, b in itertools.pairwise(d)]
  assert sum(bigram_ce) / len(bigram_ce) < 0.6 * sum(unigram_ce) / len(unigram_ce)
