"""Candidates: every sample labelled by the task's checker, the set written atomically and reused, a set with
other settings refused; the reasoning tasks' splits and answers."""

import numpy as np
import pytest
from flax import nnx

from lwjax import candidates, reasoning_tasks
from lwjax.models.gpt import GPT, GPTConfig


@pytest.mark.parametrize("name", reasoning_tasks.GENERATED_NAMES)
def test_tasks_give_checkable_records_per_split(name):
  task = reasoning_tasks.get(name)
  for split in reasoning_tasks.SPLITS:
    records = task.records(4, seed=1, split=split)
    assert len(records) == 4
    for r in records:
      assert task.check(r, r["solution"]).correct
      assert candidates.label(task, r, r["solution"]) == {
          "answer": task.answer(r["solution"]), "answer_correct": True, "correct": True, "first_error": None,
          "error_kind": None}
      task.tokenizer.encode(task.prompt(r) + " " + r["solution"])
  train = {r["question"] for r in task.records(20, seed=1, split="train")}
  assert not train & {r["question"] for r in task.records(20, seed=1, split="test")}
  with pytest.raises(ValueError, match="split"):
    task.records(1, seed=0, split="dev")


def test_hard_split_is_harder():
  words = reasoning_tasks.get("word_sort")
  assert min(r["num_words"] for r in words.records(10, seed=0, split="hard")) > max(
      r["num_words"] for r in words.records(10, seed=0, split="test"))
  igsm = reasoning_tasks.get("igsm")
  assert {r["op"] for r in igsm.records(10, seed=0, split="hard")} <= {4, 5}


def test_answer_reads_the_last_ans():
  assert reasoning_tasks.answer_word("a ; ans 3 . ans 7 .") == "7"
  assert reasoning_tasks.answer_word("k a -> a ; ans o e r .") == "o e r"
  assert reasoning_tasks.answer_word("k a -> a ;") is None


def test_sample_label_write_read_and_build_reuse(tmp_path, monkeypatch):
  task = reasoning_tasks.get("last_letter")
  cfg = GPTConfig(vocab_size=task.tokenizer.vocab_size, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2,
                  head_dim=8, d_ff=32, max_seq_len=96)
  model = GPT(cfg, rngs=nnx.Rngs(0))
  records = task.records(3, seed=0, split="test")
  problems, stats = candidates.sample(model, task, records, n=2, temperature=1.0, max_new_tokens=12, batch_prompts=2)
  assert [p["index"] for p in problems] == [0, 1, 2] and all(len(p["candidates"]) == 2 for p in problems)
  for p in problems:
    for c in p["candidates"]:
      assert {k: c[k] for k in candidates.LABEL_FIELDS} == candidates.label(task, p["record"], c["text"])
      assert c["num_tokens"] <= 12
  assert stats["generated_tokens"] == sum(c["num_tokens"] for p in problems for c in p["candidates"])
  assert stats["forward_flops_per_token"] > 2 * 16 * 16

  monkeypatch.setattr(candidates, "load_solver", lambda workdir, step=None: (model, None, 5))  # the task's tokenizer
  path = str(tmp_path / "sets" / "c.arrayrecord")
  built, metadata = candidates.build(path, workdir="w", task="last_letter", split="test", num=3, n=2,
                                     max_new_tokens=12)
  assert metadata["checkpoint_step"] == 5 and not list((tmp_path / "sets").glob("*.tmp"))
  monkeypatch.setattr(candidates, "load_solver", lambda workdir, step=None: pytest.fail("sampled again"))
  again, _ = candidates.build(path, workdir="w", task="last_letter", split="test", num=3, n=2, max_new_tokens=12)
  assert again == built
  with pytest.raises(ValueError, match="other settings"):
    candidates.build(path, workdir="w", task="last_letter", split="test", num=3, n=4, max_new_tokens=12)
  with pytest.raises(ValueError, match="max_new_tokens"):
    candidates.sample(model, task, records, n=1, temperature=0.0, max_new_tokens=90)
  assert np.isfinite(stats["tokens_per_second"])


def test_a_large_set_is_sampled_in_shards_that_a_rerun_reads_back(tmp_path, monkeypatch):
  """Shards give the problems of one call (the same seeds, prompt length and batches); a build stopped after
  two shards samples only the rest when run again, and its parts are removed once the set is written."""
  task = reasoning_tasks.get("last_letter")
  cfg = GPTConfig(vocab_size=task.tokenizer.vocab_size, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2,
                  head_dim=8, d_ff=32, max_seq_len=96)
  model = GPT(cfg, rngs=nnx.Rngs(0))
  records = task.records(10, seed=0, split="train")
  whole, stats = candidates.sample(model, task, records, n=2, temperature=1.0, max_new_tokens=10, batch_prompts=2,
                                   seed=3)
  monkeypatch.setattr(candidates, "SHARD_PROBLEMS", 4)
  monkeypatch.setattr(candidates, "load_solver", lambda workdir, step=None: (model, None, 0))
  real_sample, calls = candidates.sample, []

  def stopped_after_two(*args, **kwargs):
    calls.append(kwargs["first_index"])
    if len(calls) > 2:
      raise KeyboardInterrupt
    return real_sample(*args, **kwargs)

  monkeypatch.setattr(candidates, "sample", stopped_after_two)
  path = str(tmp_path / "c.arrayrecord")
  options = dict(workdir="w", task="last_letter", split="train", num=10, n=2, max_new_tokens=10, seed=3,
                 temperature=1.0, batch_prompts=2)
  with pytest.raises(KeyboardInterrupt):
    candidates.build(path, **options)
  assert calls == [0, 4, 8] and sorted(p.name for p in (tmp_path / "c.arrayrecord.parts").iterdir()) == [
      "00000000.json", "00000004.json"]
  calls.clear()
  monkeypatch.setattr(candidates, "sample", lambda *args, **kwargs: calls.append(kwargs["first_index"]) or
                      real_sample(*args, **kwargs))
  built, metadata = candidates.build(path, **options)
  assert calls == [8] and built == whole and not (tmp_path / "c.arrayrecord.parts").exists()
  assert {k: metadata["stats"][k] for k in ("generated_tokens", "answer_accuracy", "forward_flops_per_token")} == {
      k: stats[k] for k in ("generated_tokens", "answer_accuracy", "forward_flops_per_token")}
