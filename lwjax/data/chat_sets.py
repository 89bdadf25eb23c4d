"""UltraChat and UltraFeedback (binarized) read from their published files, as Grain MapDatasets of rows.

- `ultrachat` (Ding et al. 2023, arXiv 2305.14233; the Hub's `HuggingFaceH4/ultrachat_200k`): rows `prompt`,
  `prompt_id`, `messages` (the conversation, a list of {role, content}); splits train_sft, test_sft (and the
  Hub's train_gen, test_gen).
- `ultrafeedback` (Cui et al. 2023, arXiv 2310.01377; `HuggingFaceH4/ultrafeedback_binarized`): rows `prompt`,
  `prompt_id`, `chosen` and `rejected` (each the conversation ending in one answer; both share the messages
  before it), `score_chosen`, `score_rejected`; splits train_prefs, test_prefs (and train_sft, ... ).

A split is read from `<split>.jsonl` or `<split>-*.parquet` / `<split>.parquet` files anywhere under a
directory (the Hub snapshot's `data/train_sft-00000-of-00003-<hash>.parquet`), or from one such file. Parquet
needs pyarrow. Rows are read when asked for (a jsonl file keeps only its line offsets, a parquet file is
memory-mapped), so a 200k-row set costs no more memory than the rows a job takes. Every fault is a one-line
`ConfigError` naming the config key that holds the path, the file, the row (counted from 0) and the field.
"""

from __future__ import annotations

import bisect
import json
import os
import pathlib
import re
from collections.abc import Callable

import grain

from lwjax.config import ConfigError
from lwjax.data import pipeline

ULTRACHAT_SPLITS = ("train_sft", "test_sft", "train_gen", "test_gen")
ULTRAFEEDBACK_SPLITS = ("train_prefs", "test_prefs", "train_sft", "test_sft", "train_gen", "test_gen")
_LAYOUT = "a directory holding <split>.jsonl or <split>-*.parquet files, or one such file"


def ultrachat(path: str | os.PathLike, split: str, key: str = "data.sft_path") -> grain.MapDataset:
  """The `split` of UltraChat under `path`: rows {prompt, prompt_id, messages}. `key`: the config key errors
  name."""
  return _dataset(path, split, key, ULTRACHAT_SPLITS, _ultrachat_row,
                  "UltraChat rows with prompt, prompt_id, messages (HuggingFaceH4/ultrachat_200k)")


def ultrafeedback(path: str | os.PathLike, split: str, key: str = "data.dpo_path") -> grain.MapDataset:
  """The `split` of binarized UltraFeedback under `path`: rows {prompt, prompt_id, chosen, rejected, score_chosen,
  score_rejected}. `key`: the config key errors name."""
  return _dataset(path, split, key, ULTRAFEEDBACK_SPLITS, _ultrafeedback_row,
                  "UltraFeedback rows with prompt, prompt_id, chosen, rejected, score_chosen, score_rejected "
                  "(HuggingFaceH4/ultrafeedback_binarized)")


def split_files(path: str | os.PathLike, split: str, key: str) -> list[pathlib.Path]:
  """The files of `split` under directory `path`, in name order, or `path` itself when it is the split's file."""
  root = pathlib.Path(path).expanduser()
  if not str(path):
    raise ConfigError(key, "empty", _LAYOUT)
  if not root.exists():
    raise ConfigError(key, f"{root} does not exist", _LAYOUT)
  pattern = re.compile(rf"{re.escape(split)}(\.jsonl|(-.*)?\.parquet)")
  if root.is_file():
    if not pattern.fullmatch(root.name):
      raise ConfigError(key, f"{root} is not a {split!r} file", f"{split}.jsonl, {split}-*.parquet, or {_LAYOUT}")
    return [root]
  files = sorted((p for p in root.rglob("*") if p.is_file() and pattern.fullmatch(p.name)), key=str)
  if not files:
    raise ConfigError(key, f"no {split!r} files under {root}", _LAYOUT)
  return files


class _PublishedRows:
  """Random access to the rows of jsonl and parquet files, each checked by `check(row, where)` when read."""

  def __init__(self, files: list[pathlib.Path], key: str, check: Callable[[dict, str], dict]):
    self.key, self.check = key, check
    self.files = [(file, self._open(file)) for file in files]
    self.starts = [0]
    for _, rows in self.files:
      self.starts.append(self.starts[-1] + len(rows))

  def _open(self, file: pathlib.Path):
    if file.suffix == ".jsonl":
      return pipeline.TextLineSource(str(file))
    try:  # pyarrow is large (it comes with tensorflow-datasets), so only parquet reading asks for it
      import pyarrow
      import pyarrow.parquet
    except ImportError as error:
      raise ConfigError(self.key, f"{file}: reading parquet needs the package pyarrow, which is not installed",
                        "`pip install pyarrow`, or the set's rows as jsonl") from error
    try:
      return pyarrow.parquet.read_table(file, memory_map=True)
    except pyarrow.ArrowException as error:
      raise ConfigError(self.key, f"{file}: not a readable parquet file ({error})", _LAYOUT) from error

  def __len__(self) -> int:
    return self.starts[-1]

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(index)
    number = bisect.bisect_right(self.starts, index) - 1
    (file, rows), row = self.files[number], index - self.starts[number]
    where = f"{file} row {row}"
    if isinstance(rows, pipeline.TextLineSource):
      try:
        record = json.loads(rows[row])
      except json.JSONDecodeError as error:
        raise ConfigError(self.key, f"{where}: not JSON ({error.msg})", _LAYOUT) from None
    else:
      record = rows.slice(row, 1).to_pylist()[0]
    if not isinstance(record, dict):
      raise ConfigError(self.key, f"{where}: a {type(record).__name__}, not an object", _LAYOUT)
    return self.check(record, where)


def _dataset(path, split: str, key: str, splits: tuple[str, ...], row_fn, valid: str) -> grain.MapDataset:
  if split not in splits:
    raise ConfigError(key, f"{split!r} is not a published split", ", ".join(splits))
  files = split_files(path, split, key)
  rows = _PublishedRows(files, key, lambda row, where: row_fn(row, where, key, valid))
  if not len(rows):
    raise ConfigError(key, f"the {split!r} files hold no rows: {', '.join(map(str, files))}", valid)
  return grain.MapDataset.source(rows)


def _field(row: dict, name: str, types, where: str, key: str, valid: str):
  if name not in row or row[name] is None:
    raise ConfigError(key, f"{where}: no field {name!r}", valid)
  if not isinstance(row[name], types) or isinstance(row[name], bool):
    raise ConfigError(key, f"{where}: field {name!r} is of type {type(row[name]).__name__}", valid)
  return row[name]


def _messages(row: dict, name: str, where: str, key: str, valid: str) -> list[dict]:
  messages = _field(row, name, list, where, key, valid)
  if not messages:
    raise ConfigError(key, f"{where}: field {name!r} is an empty conversation", valid)
  out = []
  for i, message in enumerate(messages):
    if not isinstance(message, dict):
      raise ConfigError(key, f"{where}: field {name}[{i}] is a {type(message).__name__}, not a message", valid)
    for part in ("role", "content"):
      if not isinstance(message.get(part), str):
        raise ConfigError(key, f"{where}: field {name}[{i}] has no {part!r} string", valid)
    out.append({"role": message["role"], "content": message["content"]})
  return out


def _ultrachat_row(row: dict, where: str, key: str, valid: str) -> dict:
  return {"prompt": _field(row, "prompt", str, where, key, valid),
          "prompt_id": _field(row, "prompt_id", str, where, key, valid),
          "messages": _messages(row, "messages", where, key, valid)}


def _ultrafeedback_row(row: dict, where: str, key: str, valid: str) -> dict:
  record = {"prompt": _field(row, "prompt", str, where, key, valid),
            "prompt_id": _field(row, "prompt_id", str, where, key, valid)}
  for name in ("chosen", "rejected"):
    record[name] = _messages(row, name, where, key, valid)
    if record[name][-1]["role"] != "assistant":
      raise ConfigError(key, f"{where}: field {name!r} does not end with the assistant's answer", valid)
  if record["chosen"][:-1] != record["rejected"][:-1]:
    raise ConfigError(key, f"{where}: fields 'chosen' and 'rejected' differ before their answers (a pair answers "
                      "one prompt)", valid)
  for name in ("score_chosen", "score_rejected"):
    record[name] = float(_field(row, name, (int, float), where, key, valid))
  return record
