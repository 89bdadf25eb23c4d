"""RAGTruth (Niu et al. 2024, arXiv 2401.00396) read from its published files: responses of six LLMs to RAG prompts,
with the hallucinated spans annotated word by word.

- `source_info.jsonl`: one source per line, `source_id`, `task_type` (QA, Data2txt or Summary), `source`,
  `source_info` (the retrieved content), `prompt` (the whole prompt the models answered: instruction, passages and
  question, as RAGTruth gives it);
- `response.jsonl`: one response per line, `id`, `source_id`, `model`, `response`, `split` (train or test) and
  `labels`, a list of spans `{start, end, text, label_type, ...}` (character offsets into the response).

A response is hallucinated when any span is labelled (LRP4RAG's response-level label, arXiv 2408.15533, §4).
Both files are found under `data.path`; a missing file, a row without a field, a response of an unknown source or
an empty selection is a `ConfigError` naming `data.path`, the file, the row and the field.
"""

from __future__ import annotations

import dataclasses
import pathlib

from lwjax.config import ConfigError
from lwjax.data.math_sets import layouts

PATH_KEY = "data.path"
TASK_TYPES = ("QA", "Data2txt", "Summary")
SPLITS = ("train", "test")
FILES = ("source_info.jsonl", "response.jsonl")
_SOURCE_FIELDS = {"source_id": (str, int), "task_type": str, "prompt": str}
_RESPONSE_FIELDS = {"id": (str, int), "source_id": (str, int), "model": str, "response": str, "labels": list,
                    "split": str}


@dataclasses.dataclass(frozen=True)
class Span:
  start: int
  end: int
  label_type: str


@dataclasses.dataclass(frozen=True)
class Response:
  id: str
  task_type: str
  model: str
  split: str
  prompt: str
  response: str
  spans: tuple[Span, ...]

  @property
  def hallucinated(self) -> bool:
    return bool(self.spans)


def load(path: str, *, splits=SPLITS, task_types=TASK_TYPES, models=()) -> list[Response]:
  """The responses of the given splits, task types and models (`models` empty: every model), in file order."""
  if not path:
    raise ConfigError(PATH_KEY, "empty: RAGTruth is read from its published files",
                      f"the directory holding {' and '.join(FILES)}, e.g. /data/RAGTruth/dataset")
  root = pathlib.Path(path).expanduser()
  if not root.exists():
    raise ConfigError(PATH_KEY, f"{root} does not exist", f"the directory holding {' and '.join(FILES)}")
  files = []
  for name in FILES:
    found = sorted(root.rglob(name)) if root.is_dir() else []
    if not found:
      raise ConfigError(PATH_KEY, f"no {name} under {root}", "RAGTruth's dataset directory")
    files.append(found[0])
  source_file, response_file = files
  sources = {}
  for number, row in enumerate(layouts.read_rows(source_file)):
    _check(row, _SOURCE_FIELDS, f"{source_file} row {number}")
    sources[str(row["source_id"])] = row
  out = []
  for number, row in enumerate(layouts.read_rows(response_file)):
    where = f"{response_file} row {number}"
    _check(row, _RESPONSE_FIELDS, where)
    source = sources.get(str(row["source_id"]))
    if source is None:
      raise ConfigError(PATH_KEY, f"{where}: source_id {row['source_id']!r} is not in {source_file}",
                        "response.jsonl and source_info.jsonl of the same release")
    if row["split"] not in splits or source["task_type"] not in task_types or (models and row["model"] not in models):
      continue
    out.append(Response(str(row["id"]), source["task_type"], row["model"], row["split"], source["prompt"],
                        row["response"], tuple(_span(label, f"{where} labels[{k}]")
                                               for k, label in enumerate(row["labels"]))))
  if not out:
    raise ConfigError(PATH_KEY, f"{response_file}: no response of split {'/'.join(splits)}, task_type "
                      f"{'/'.join(task_types)}" + (f", model {'/'.join(models)}" if models else ""),
                      "a selection the files hold (data.splits, data.task_types, data.models)")
  return out


def _check(row: dict, fields: dict, where: str) -> None:
  for field, types in fields.items():
    if not isinstance(row.get(field), types):
      why = f"lacks the field {field!r}" if field not in row else f"{field!r} is a {type(row[field]).__name__}"
      raise ConfigError(PATH_KEY, f"{where} {why}", f"RAGTruth rows with {', '.join(fields)}")


def _span(label, where: str) -> Span:
  if not isinstance(label, dict):
    raise ConfigError(PATH_KEY, f"{where} is a {type(label).__name__}, not a span", "{start, end, text, label_type}")
  for field, types in (("start", int), ("end", int), ("label_type", str)):
    if not isinstance(label.get(field), types):
      raise ConfigError(PATH_KEY, f"{where} lacks the field {field!r}", "spans {start, end, text, label_type}")
  return Span(label["start"], label["end"], label["label_type"])
