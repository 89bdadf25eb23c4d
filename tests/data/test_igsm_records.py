"""iGSM Grain source and ArrayRecord files: deterministic random access, exact round trip, checkable records."""

import grain
import pytest

from lwjax.data import igsm


def test_source_is_deterministic_random_access():
  source = igsm.IGSMSource(6, seed=1, preset="hard", fmt="qp", retry_rate=0.5)
  again = igsm.IGSMSource(6, seed=1, preset="hard", fmt="qp", retry_rate=0.5)
  records = [source[i] for i in (5, 0, 3)]
  assert records == [again[i] for i in (5, 0, 3)] == [grain.MapDataset.source(again)[i] for i in (5, 0, 3)]
  assert len(source) == 6 and source[0] != source[1]
  assert source[0] != igsm.IGSMSource(6, seed=2, preset="hard", fmt="qp", retry_rate=0.5)[0]
  with pytest.raises(IndexError):
    source[6]
  for record in (source[i] for i in range(6)):
    problem = igsm.problem_of(record)
    assert record["question"] == problem.question and record["question"].startswith("How many ")
    assert record["split"] == problem.split == "train" and 1 <= record["op"] == problem.op <= 21
    verdict = igsm.check(problem, record["solution"])
    assert verdict.correct and verdict.num_retries == record["num_retries"]
    assert [tuple(span) for span in record["masked_spans"]] == igsm.wrong_step_spans(record["solution"])
  assert sum(source[i]["num_retries"] for i in range(6)) > 0


def test_source_ops_and_split():
  source = igsm.IGSMSource(8, seed=0, split="test", ops=(20, 22))
  assert all(source[i]["op"] in (20, 22) and source[i]["split"] == "test" for i in range(8))
  assert all(source[i]["num_retries"] == 0 for i in range(8))


def test_array_record_round_trip(tmp_path):
  source = igsm.IGSMSource(5, seed=3, retry_rate=0.2, retry_weak=True)
  path = str(tmp_path / "igsm.array_record")
  assert igsm.export_array_record(path, source) == 5
  dataset = igsm.read_array_record(path)
  assert len(dataset) == 5
  assert [dataset[i] for i in range(5)] == [source[i] for i in range(5)]
  record = dataset[4]
  assert igsm.check(igsm.problem_of(record), record["solution"]).correct
