"""WiM training rows: packed several to a sequence, each row attending to itself only, and resumable."""

import json
import random

import numpy as np

from lwjax.projects.wim import data, tasks


def test_rows_are_packed_with_their_own_segment_ids_and_positions_and_resume_exactly():
  tok = tasks.WiMTokenizer()
  records = data.documents(10, seed=0, task_names=["retrieval", "multihop", "aggregation"], num_segments=[1, 2],
                           segment_words=24)
  it = iter(data.batches(records, tok, seq_len=256, batch_size=4, seed=0))
  batch = next(it)
  seg, pos = batch["segment_ids"], batch["positions"]
  assert seg.shape == (4, 256) and (seg.max(axis=1) >= 2).all()  # several rows in every sequence
  for row in range(4):
    for s in range(1, seg[row].max() + 1):
      where = np.flatnonzero(seg[row] == s)
      np.testing.assert_array_equal(pos[row, where], np.arange(len(where)))  # positions restart per row
      assert batch["inputs"][row, where[0]] == tok.bos_id or batch["loss_mask"][row, where].sum() > 0
  assert (batch["loss_mask"][seg == 0] == 0).all()
  state = json.loads(json.dumps(it.get_state()))
  expected = next(it)
  resumed = iter(data.batches(records, tok, seq_len=256, batch_size=4, seed=0))
  resumed.set_state(state)
  got = next(resumed)
  for key in expected:
    np.testing.assert_array_equal(got[key], expected[key])


def test_recall_rows_ask_every_assignment_with_the_loss_on_the_answers_only():
  tok = tasks.WiMTokenizer()
  record = tasks.generate("retrieval", 1, seed=3, num_segments=2, segment_words=48)[0]
  assert ("recall", 0) in data.row_specs(record)
  row = data.build_row(tok, record, "recall", 0, 512)
  n = int(row["segment_ids"].sum())
  facts = dict(tasks.assignments(record.context))  # value -> its key
  answered = row["targets"][:n][row["loss_mask"][:n] > 0]
  assert len(answered) == len(facts) == 4
  text = tok.decode(row["inputs"][:n]) + " " + tok.decode(row["targets"][n - 1:n])
  asked = text.split("?")[1:]
  assert [a.split()[1] for a in asked] == list(facts)[::-1]  # every value, last fact first
  assert [tok.decode([t]) for t in answered] == [facts[a.split()[1]] for a in asked]
  aggregation = tasks.generate("aggregation", 1, seed=3, num_segments=1, segment_words=48)[0]
  assert ("recall", 0) not in data.row_specs(aggregation)


def test_copy_rows_repeat_a_random_run_with_the_loss_on_the_repeat_and_resume_exactly():
  tok = tasks.WiMTokenizer()
  row = data.copy_row(tok, random.Random(0), 64)
  n = int(row["segment_ids"].sum())
  words = tok.decode(np.append(row["inputs"][:n], row["targets"][n - 1]))
  first, second = words.split(" ? ")
  assert first == second and 4 <= len(first.split()) <= 24
  assert all(w in data.COPY_WORDS for w in first.split())
  assert row["loss_mask"][:n].sum() == len(first.split())  # the repeat only (its first word follows the `?`)
  records = data.documents(6, seed=0, task_names=["retrieval"], num_segments=[1], segment_words=24)
  question = tok.encode("?")[0]
  it = iter(data.batches(records, tok, seq_len=256, batch_size=4, seed=0, copy_fraction=0.5))
  batches = [next(it) for _ in range(3)]
  copies = sum(int((b["inputs"] == question).sum()) for b in batches)
  assert copies > 0
  state = json.loads(json.dumps(it.get_state()))
  resumed = iter(data.batches(records, tok, seq_len=256, batch_size=4, seed=0, copy_fraction=0.5))
  resumed.set_state(state)
  expected, got = next(it), next(resumed)
  for key in expected:
    np.testing.assert_array_equal(got[key], expected[key])


def test_a_pretrained_readers_rows_hold_the_ids_the_engine_prefills():
  """Through a subword tokenizer (a pretrained reader's): a margin row's context is the segments encoded one by
  one, as the engine prefills them, and a recall row's loss covers every token of a multi-token answer."""
  import pathlib

  from lwjax.data import hf_tokenizer
  from lwjax.projects.wim import job, prompts
  tok = job.reader_tokenizer(hf_tokenizer.load(str(pathlib.Path(__file__).parents[2] / "fixtures" / "hf" /
                                                   "tokenizers" / "llama3_style")))
  record = tasks.generate("retrieval", 1, seed=3, num_segments=2, segment_words=24)[0]
  row = data.build_row(tok, record, "margin", 1, 1024)
  engine_ids = [tok.bos_id] + [i for s in record.segments for i in tok.encode(s)] + prompts.extraction(
      tok, record.query)
  n = len(engine_ids)
  np.testing.assert_array_equal(row["inputs"][:n], engine_ids)
  assert tok.encode(record.context) != [i for s in record.segments for i in tok.encode(s)]  # why it matters
  margin = tok.decode(row["targets"][n - 1:int(row["segment_ids"].sum())])
  assert margin == record.margins[1]  # exact text: no clean-up of the space before "."
  recall = data.build_row(tok, record, "recall", 0, 2048)
  m = int(recall["segment_ids"].sum())
  answered = recall["targets"][:m][recall["loss_mask"][:m] > 0]
  facts = dict(tasks.assignments(record.context))
  assert tok.decode(answered) == "".join(list(facts.values())[::-1])
  assert len(answered) > len(facts)  # the keys are several tokens each here
