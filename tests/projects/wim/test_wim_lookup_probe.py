"""The WiM lookup probe: its rows ask facts that are in them, its elimination floor is the expected accuracy of
guessing among the facts not yet asked, and a tiny run reports a curve."""

import argparse
import random

import numpy as np
import pytest

from lwjax.projects.wim import lookup_probe, tasks


def _args(**kw):
  base = {"filler": False, "adjacent": False, "key_first": False, "no_ans": False, "copy": False, "mix_copy": 0.0,
          "aggregation": None, "batch": 2, "seq_len": 128}
  return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("kw", [{}, {"adjacent": True, "key_first": True, "no_ans": True}, {"filler": True}])
def test_every_answer_is_the_other_half_of_a_fact_in_the_row(kw):
  tok, rng = tasks.WiMTokenizer(), random.Random(1)
  for _ in range(20):
    tokens, is_answer = lookup_probe.probe_row(rng, tok, _args(**kw), 100)
    words = tok.decode(tokens).split()  # bos is dropped by decode: word i is tokens[i + 1]
    first_question = words.index("?")
    gap = 1 if kw.get("adjacent") else 2
    facts = {(words[i - gap], w) for i, w in enumerate(words[:first_question]) if w in tasks.VALUES}
    if kw.get("filler"):  # the retrieval task's layout: value, then the key holding it
      facts = {(key, value) for value, key in tasks.assignments(" ".join(words[:first_question]))}
    answers = [tok.decode([t]) for t, a in zip(tokens, is_answer, strict=True) if a]
    asked = [words[i - 1 if kw.get("no_ans") else i - 2] for i, w in enumerate(words) if i > first_question and
             w in answers and (kw.get("no_ans") or words[i - 1] == "ans")]
    assert len(answers) == len(facts) == len(asked)
    for question, answer in zip(asked, answers, strict=True):
      pair = (question, answer) if kw.get("key_first") else (answer, question)
      assert pair in facts


@pytest.mark.parametrize("order", ["sorted", "first"])
def test_aggregation_rows_answer_the_repeated_words_in_the_asked_order(order):
  tok, rng = tasks.WiMTokenizer(), random.Random(2)
  for _ in range(10):
    tokens, is_answer = lookup_probe.probe_row(rng, tok, _args(aggregation=order), 100)
    words = tok.decode(tokens).split()
    question = words.index("?")
    assert words[question:question + 3] == ["?", "common", "ans"]
    segment = words[:question]
    answers = [tok.decode([t]) for t, a in zip(tokens, is_answer, strict=True) if a]
    assert answers == words[question + 3:]
    assert set(answers) == {w for w in set(segment) if segment.count(w) >= 2 and w in tasks.FILLER}
    assert answers == (sorted(answers) if order == "sorted" else sorted(answers, key=segment.index))


def test_elimination_floor():
  rows = {"loss_mask": np.array([[0, 1, 1, 0, 1, 1, 1]], np.float32), "segment_ids": np.array([[1, 1, 1, 2, 2, 2, 2]])}
  # Row 1: 2 answers (1/2 + 1) ; row 2: 3 answers (1/3 + 1/2 + 1); over 5 answers.
  assert lookup_probe.elimination_accuracy(rows) == pytest.approx((1.5 + 11 / 6) / 5)


@pytest.mark.slow
def test_a_tiny_run_reports_a_curve():
  curve = lookup_probe.main(["--steps", "2", "--width", "32", "--layers", "1", "--batch", "2", "--seq_len", "128",
                             "--every", "1"])
  assert [p["step"] for p in curve] == [1, 2] and 0.0 <= curve[-1]["accuracy"] <= 1.0
  assert 0.2 < curve[-1]["elimination"] < 0.8
