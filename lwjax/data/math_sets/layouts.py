"""Finding and reading the published files of GSM8K and MATH, as rows (dicts of the file's own fields).

Layouts read, each split by its published train/test files:
- jsonl: `<split>.jsonl` anywhere under the directory (openai/grade-school-math's `grade_school_math/data/`,
  HuggingFaceH4/MATH-500's `test.jsonl`);
- parquet shards as on the Hugging Face Hub: `<split>-*.parquet` or `<split>.parquet` anywhere under it
  (openai/gsm8k's `main/train-00000-of-00001.parquet`, a MATH mirror's one folder per subject);
- the original MATH tree of one json per problem: `<split>/<subject>/<id>.json`.
A path to a file is read as it is, unless its name says it holds the other split (`test.jsonl` for train).
"""

from __future__ import annotations

import json
import os
import pathlib
import re

from lwjax.config import ConfigError

PATH_KEY = "data.path"
SPLITS = ("train", "test")
LAYOUTS = ("<split>.jsonl", "<split>-*.parquet", "<split>/<subject>/<id>.json")
_VALID_PATH = f"a directory holding one of {', '.join(LAYOUTS)}, or one .jsonl/.json/.parquet file"


def split_files(path: str | os.PathLike, split: str) -> list[pathlib.Path]:
  """The files holding `split` under `path` (a file stands for itself), in a fixed order."""
  root = pathlib.Path(path).expanduser()
  if not root.exists():
    raise ConfigError(PATH_KEY, f"{root} does not exist", _VALID_PATH)
  if root.is_file():
    named = re.match(r"(train|test)(?![a-z])", root.name)
    if named and named.group(1) != split:
      raise ConfigError(PATH_KEY, f"{root} holds the {named.group(1)!r} split, not {split!r}",
                        f"the {split} file, or the directory holding both")
    return [root]
  split_dirs = [root] if root.name == split else []
  split_dirs += [d for d in root.rglob(split) if d.is_dir()]
  found = {
      "jsonl": sorted(root.rglob(f"{split}.jsonl")),
      "parquet": sorted(p for p in root.rglob("*.parquet") if re.fullmatch(rf"{split}(-.*)?\.parquet", p.name)),
      "json per problem": sorted((p for d in split_dirs for p in d.glob("*/*.json")), key=_natural_order),
  }
  found = {kind: files for kind, files in found.items() if files}
  if not found:
    raise ConfigError(PATH_KEY, f"no {split!r} files under {root}", _VALID_PATH)
  if len(found) > 1:
    # Two copies of the same split in different formats would be read twice.
    raise ConfigError(PATH_KEY, f"{root} holds {split!r} files in several layouts ({', '.join(found)})",
                      "a directory holding one layout; point data.path at one of them")
  return next(iter(found.values()))


def read_rows(file: pathlib.Path) -> list[dict]:
  """The rows of one published file: a jsonl line, a parquet row or a json object each."""
  try:
    if file.suffix == ".jsonl":
      rows = [_json(file, line, number) for number, line in enumerate(file.read_text("utf-8").splitlines(), 1)
              if line.strip()]
    elif file.suffix == ".json":
      rows = _json(file, file.read_text("utf-8"), None)
      rows = rows if isinstance(rows, list) else [rows]
    elif file.suffix == ".parquet":
      rows = _parquet_rows(file)
    else:
      raise ConfigError(PATH_KEY, f"{file}: cannot read files of type {file.suffix!r}", ".jsonl, .json, .parquet")
  except (OSError, UnicodeDecodeError) as error:
    raise ConfigError(PATH_KEY, f"{file}: cannot be read ({error})", _VALID_PATH) from error
  for number, row in enumerate(rows):
    if not isinstance(row, dict):
      raise ConfigError(PATH_KEY, f"{file}: row {number} is a {type(row).__name__}, not an object", _VALID_PATH)
  return rows


def _json(file: pathlib.Path, text: str, line: int | None):
  try:
    return json.loads(text)
  except json.JSONDecodeError as error:
    where = f"{file}:{line}" if line is not None else str(file)
    raise ConfigError(PATH_KEY, f"{where}: not JSON ({error.msg})", _VALID_PATH) from error


def _parquet_rows(file: pathlib.Path) -> list[dict]:
  # pyarrow is large (it comes with tensorflow-datasets), so only parquet reading asks for it.
  try:
    import pyarrow
    import pyarrow.parquet
  except ImportError as error:
    raise ConfigError(PATH_KEY, f"{file}: reading parquet needs pyarrow, which is not installed",
                      "`pip install pyarrow`, or the jsonl files of the set") from error
  try:
    return pyarrow.parquet.read_table(file).to_pylist()
  except pyarrow.ArrowException as error:
    raise ConfigError(PATH_KEY, f"{file}: not a readable parquet file ({error})", _VALID_PATH) from error


def _natural_order(file: pathlib.Path) -> tuple:
  """`algebra/2.json` before `algebra/10.json`, as the problems are numbered."""
  return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
               for part in re.split(r"(\d+)", str(file)))
