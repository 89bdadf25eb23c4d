"""iGSM examples as a Grain source and as ArrayRecord files of JSON records (Physics of LMs 2.1/2.2 data).

`IGSMSource` is a random-access source whose record i depends only on the source's arguments and i, so
Grain may read it in any order, from any worker, and resume anywhere. A record is a dict:

  question, solution (with retries when retry_rate > 0), answer, op, split, num_retries,
  masked_spans ([start, end) of the wrong steps in `solution`), problem (`Problem.to_json()`, which
  `problem_of` turns back into a `Problem` for `check`).

`write_array_record` stores records as UTF-8 JSON, one per ArrayRecord record (group size 1, so that
reads are random access); `read_array_record` opens such files as a `grain.MapDataset` of the same dicts.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping, Sequence

import grain
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from lwjax.data.igsm.generator import PRESETS, generate, sample_train_op
from lwjax.data.igsm.problem import Problem
from lwjax.data.igsm.retry import write_retry_solution


class IGSMSource:
  """`size` generated examples. `ops`: the op of each record is drawn uniformly from it; None draws from
  the preset's training law (min of two uniform draws from 1..max_train_op)."""

  def __init__(self, size: int, *, seed: int = 0, preset: str = "med", fmt: str = "pq", split: str | None = "train",
               ops: Sequence[int] | None = None, retry_rate: float = 0.0, retry_weak: bool = False):
    if preset not in PRESETS:
      raise ValueError(f"preset={preset!r}: expected one of {sorted(PRESETS)}")
    self.size, self.seed, self.preset, self.fmt, self.split = size, seed, preset, fmt, split
    self.ops = tuple(ops) if ops is not None else None
    self.retry_rate, self.retry_weak = retry_rate, retry_weak

  def __len__(self) -> int:
    return self.size

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < self.size:
      raise IndexError(f"record {index} of {self.size}")
    rng = random.Random(f"igsm-source/{self.seed}/{index}")
    op = rng.choice(self.ops) if self.ops else sample_train_op(rng, self.preset)
    problem = generate(op=op, seed=rng.getrandbits(63), preset=self.preset, fmt=self.fmt, split=self.split)
    solution = write_retry_solution(problem, rng, self.retry_rate, self.retry_weak)
    return {
        "question": problem.question, "solution": solution.text, "answer": problem.answer, "op": problem.op,
        "split": problem.split, "num_retries": solution.num_retries,
        "masked_spans": [list(span) for span in solution.masked_spans], "problem": problem.to_json(),
    }

  def __repr__(self) -> str:
    return (f"IGSMSource(size={self.size}, seed={self.seed}, preset={self.preset}, fmt={self.fmt}, "
            f"split={self.split}, ops={self.ops}, retry_rate={self.retry_rate}, retry_weak={self.retry_weak})")


def problem_of(record: Mapping) -> Problem:
  """The `Problem` a record was generated from (to `check` a model's solution against)."""
  return Problem.from_json(record["problem"])


def write_array_record(path: str, records: Iterable[Mapping], total: int | None = None) -> int:
  """Writes `records` as JSON to the ArrayRecord file `path` with a progress bar; returns the count."""
  writer = ArrayRecordWriter(str(path), "group_size:1")
  count = 0
  try:
    for record in tqdm(records, total=total, desc=f"iGSM -> {path}", unit="rec"):
      writer.write(json.dumps(record, separators=(",", ":")).encode("utf-8"))
      count += 1
  finally:
    writer.close()
  return count


def export_array_record(path: str, source: IGSMSource) -> int:
  """Generates every record of `source` into `path`."""
  return write_array_record(path, (source[i] for i in range(len(source))), total=len(source))


def read_array_record(paths: str | Sequence[str]) -> grain.MapDataset:
  """Random access to the records of ArrayRecord files written by `write_array_record`."""
  paths = [paths] if isinstance(paths, str) else list(paths)
  return grain.MapDataset.source(grain.sources.ArrayRecordDataSource(paths)).map(json.loads)
