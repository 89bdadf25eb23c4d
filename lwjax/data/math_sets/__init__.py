"""GSM8K and MATH read from their published files, as reasoning-task records, and graded.

- `gsm8k` (Cobbe et al. 2021, arXiv 2110.14168): rows `question`, `answer` (the worked solution, calculator
  annotations `<<6*3=18>>` kept as published, ending `#### N`). A record's `solution` is that text and its
  `answer` the number N in canonical form (`final_number`).
- `math` (Hendrycks et al. 2021, arXiv 2103.03874): rows `problem`, `solution` (with a `\\boxed{}`
  answer), `level`, `type`; and the MATH-500 subset (Lightman et al. 2023, arXiv 2305.20050) with
  `problem`, `solution`, `answer`, `subject`, `level`, `unique_id`. A record keeps the row's fields, with
  `question` = `problem` and `answer` the normal form (`math_grading.normalize`) of the published
  answer, or of the solution's last box where the row has none.

The files are found under `data.path` as `layouts` describes (jsonl, Hub parquet, MATH's json per
problem); a GSM8K directory holding both Hub configs is read from `main`, as `socratic` is another version
of the same problems (point `data.path` at `socratic/` to read that one). Every record satisfies
`answer_of(name, record["solution"]) == record["answer"]` where the row has no answer of its own.

`load`, `answer_of` and `is_correct` are what a reasoning-task adapter wraps (`lwjax.reasoning_tasks`).
"""

from __future__ import annotations

import os
import pathlib

from lwjax.config import ConfigError
from lwjax.data.math_sets import gsm8k_grading, layouts, math_grading

NAMES = ("gsm8k", "math")
SPLITS = layouts.SPLITS
_REQUIRED = {"gsm8k": ("question", "answer"), "math": ("problem", "solution")}


def load(name: str, path: str | os.PathLike, split: str) -> list[dict]:
  """The records of the `split` of set `name` under `path`, in file order.

  Raises `ConfigError` naming `data.name`, `data.split` or `data.path` (with the file and row) when the
  name or split is unknown, the path is missing, or a file is unreadable or lacks a field or an answer.
  """
  _check_name(name)
  if split not in SPLITS:
    raise ConfigError("data.split", f"{split!r} is not a published split of {name}", ", ".join(SPLITS))
  files = layouts.split_files(path, split)
  if name == "gsm8k":
    root = pathlib.Path(path).expanduser()
    main_config = [f for f in files if "socratic" not in f.relative_to(root).parts] if root.is_dir() else files
    files = main_config or files
  return [_record(name, row, f"{file} row {number}")
          for file in files for number, row in enumerate(layouts.read_rows(file))]


def answer_of(name: str, text: str) -> str | None:
  """The final answer of a solution text in normal form (for majority voting: equal strings are the same
  answer, though the same answer written two ways, `0.5` and `\\frac{1}{2}`, gives two strings), or None."""
  _check_name(name)
  if name == "gsm8k":
    return gsm8k_grading.final_number(text)
  answer = math_grading.final_answer(text)
  return None if answer is None else math_grading.normalize(answer) or None


def is_correct(name: str, record: dict, text: str) -> bool:
  """Whether the final answer of solution `text` is the record's answer."""
  _check_name(name)
  if name == "gsm8k":
    return gsm8k_grading.same_number(answer_of(name, text), record["answer"])
  return math_grading.equivalent(math_grading.final_answer(text), record["answer"])


def _check_name(name: str) -> None:
  if name not in NAMES:
    raise ConfigError("data.name", f"{name!r} is not a known set", ", ".join(NAMES))


def _record(name: str, row: dict, where: str) -> dict:
  missing = [field for field in _REQUIRED[name] if not isinstance(row.get(field), str)]
  if missing:
    raise ConfigError(layouts.PATH_KEY, f"{where} lacks the text field(s) {', '.join(missing)}",
                      f"{name} rows with {', '.join(_REQUIRED[name])}")
  if name == "gsm8k":
    record = {"question": row["question"], "solution": row["answer"],
              "answer": gsm8k_grading.final_number(row["answer"]) if "####" in row["answer"] else None}
  else:
    published = row.get("answer")
    published = math_grading.final_answer(row["solution"]) if published is None else str(published)
    record = {**row, "question": row["problem"],
              "answer": math_grading.normalize(published) if published is not None else None}
  if not record["answer"]:
    raise ConfigError(layouts.PATH_KEY, f"{where} has no final answer in its solution",
                      "GSM8K solutions end `#### N`; MATH solutions box their answer, \\boxed{...}")
  return record
