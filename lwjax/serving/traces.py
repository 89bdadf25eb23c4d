"""Request traces for serving benchmarks: (prompt tokens, output tokens, arrival time) read from the published
traces NanoFlow (arXiv 2408.12757, §6) evaluates on, each in its published format.

  sharegpt   ShareGPT json (e.g. ShareGPT_V3_unfiltered_cleaned_split.json): a list of
             {"id", "conversations": [{"from": "human" | "gpt", "value"}]}; input = a conversation's first human
             turn, output = the turn right after it when that is a gpt turn. No arrival times.
  lmsys      LMSYS-Chat-1M parquet (columns conversation_id, model, conversation: [{"role", "content"}], turn,
             language, openai_moderation, redacted); input = the first user turn, output = the assistant turn
             right after it. No arrival times. Read with pyarrow.
  splitwise  Azure LLM inference trace csv (Splitwise, Patel et al. 2024: TIMESTAMP, ContextTokens,
             GeneratedTokens): the recorded token counts and arrival times.

Text traces are measured by a tokenizer's `encode` when one is given, else estimated as ceil(characters / 4) (the
common rule of thumb for English BPE vocabularies); `Trace.length_source` says which. A conversation without such a
pair, or with an empty side, is skipped and counted. A file that cannot be read, a missing field and a trace with no
request raise `TraceError`, one line naming the file and the field.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator

import numpy as np

FORMATS = ("sharegpt", "lmsys", "splitwise")
_BY_EXTENSION = {".json": "sharegpt", ".parquet": "lmsys", ".csv": "splitwise"}
SPLITWISE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
CHARS_PER_TOKEN = 4


class TraceError(ValueError):
  """A trace that cannot be replayed; `str(error)` is `<file>: <field>: <why>`."""

  def __init__(self, path: str, field: str, why: str):
    self.path, self.field = path, field
    super().__init__(f"{path}: {field}: {why}")


@dataclasses.dataclass(frozen=True)
class TraceRequest:
  prompt_tokens: int
  output_tokens: int
  arrival: float | None = None  # seconds after the trace's first request; None where the trace records no time


@dataclasses.dataclass(frozen=True)
class Trace:
  path: str
  format: str
  requests: list[TraceRequest]
  skipped: int  # conversations or rows without a usable (input, output) pair
  length_source: str  # "tokenizer", "chars/4 estimate" or "recorded token counts"

  @property
  def has_arrivals(self) -> bool:
    return all(r.arrival is not None for r in self.requests)


def read(path: str, trace_format: str | None = None, count_tokens: Callable[[str], int] | None = None,
         limit: int | None = None) -> Trace:
  """The first `limit` requests (all when None; in arrival order where the trace has times) of the trace at `path`,
  its format named or taken from the extension (.json sharegpt, .parquet lmsys, .csv splitwise). `count_tokens`
  measures a text trace's turns (default: ceil(characters / 4))."""
  if trace_format is None:
    trace_format = _BY_EXTENSION.get(os.path.splitext(path)[1].lower())
    if trace_format is None:
      raise TraceError(path, "format", f"not known from the extension (valid: {', '.join(FORMATS)}, or a file "
                       f"ending in {', '.join(_BY_EXTENSION)})")
  if trace_format not in FORMATS:
    raise TraceError(path, "format", f"{trace_format!r} (valid: {', '.join(FORMATS)})")
  if not os.path.isfile(path):
    raise TraceError(path, "file", "does not exist")
  if trace_format == "splitwise":
    requests, skipped = _read_splitwise(path, limit)
    source = "recorded token counts"
  else:
    pairs = _sharegpt_pairs(path) if trace_format == "sharegpt" else _lmsys_pairs(path)
    measure = count_tokens or estimate_tokens
    requests, skipped = _measure(pairs, measure, limit)
    source = "tokenizer" if count_tokens else f"chars/{CHARS_PER_TOKEN} estimate"
  if not requests:
    field = {"sharegpt": "conversations", "lmsys": "conversation", "splitwise": ",".join(SPLITWISE_COLUMNS)}
    raise TraceError(path, field[trace_format], f"no request in the trace ({skipped} rows skipped: no input and "
                     "output pair, or an empty one)")
  return Trace(path, trace_format, requests, skipped, source)


def estimate_tokens(text: str) -> int:
  return math.ceil(len(text) / CHARS_PER_TOKEN)


def clip(requests: Iterable[TraceRequest], max_len: int) -> tuple[list[TraceRequest], int]:
  """`requests` fitted to a context of `max_len` tokens, and how many were cut: a request longer than that keeps
  an output of at most max_len // 2 and the prompt's first tokens that fit beside it."""
  out, clipped = [], 0
  for r in requests:
    if r.prompt_tokens + r.output_tokens > max_len:
      output = min(r.output_tokens, max_len // 2)
      r = dataclasses.replace(r, prompt_tokens=min(r.prompt_tokens, max_len - output), output_tokens=output)
      clipped += 1
    out.append(r)
  return out, clipped


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
  """Arrival times of `n` requests of a Poisson process of `rate` requests/s, the first at 0."""
  gaps = np.random.default_rng(seed).exponential(1.0 / rate, n)
  gaps[0] = 0.0
  return np.cumsum(gaps).tolist()


def _measure(pairs: Iterator[tuple[str, str]], count: Callable[[str], int], limit: int | None):
  requests, skipped = [], 0
  for prompt, output in pairs:
    if limit is not None and len(requests) >= limit:
      break
    p, o = (count(prompt), count(output)) if prompt and output else (0, 0)
    if p and o:
      requests.append(TraceRequest(p, o))
    else:
      skipped += 1
  return requests, skipped


def _first_pair(turns, path: str, row: int, speaker: str, text: str, asks: str, answers: str) -> tuple[str, str]:
  """(first `asks` turn, the `answers` turn right after it), or ("", "") when there is none."""
  if not isinstance(turns, (list, tuple)):
    raise TraceError(path, f"[{row}]", f"is not a list of turns: {type(turns).__name__}")
  for i, turn in enumerate(turns):
    missing = [key for key in (speaker, text) if not isinstance(turn, dict) or key not in turn]
    if missing:
      raise TraceError(path, f"[{row}][{i}].{missing[0]}", f"missing in the turn {str(turn)[:80]}")
    if turn[speaker] == asks:
      follows = turns[i + 1] if i + 1 < len(turns) else None
      if isinstance(follows, dict) and follows.get(speaker) == answers:
        return str(turn[text] or ""), str(follows.get(text) or "")
      return "", ""
  return "", ""


def _sharegpt_pairs(path: str) -> Iterator[tuple[str, str]]:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise TraceError(path, "file", f"not a ShareGPT json file ({type(e).__name__}: {str(e)[:120]})") from None
  if not isinstance(data, list):
    raise TraceError(path, "(top level)", f"a {type(data).__name__}, not a list of conversations")
  for row, entry in enumerate(data):
    if not isinstance(entry, dict) or "conversations" not in entry:
      raise TraceError(path, f"[{row}].conversations", "missing")
    yield _first_pair(entry["conversations"], path, row, "from", "value", "human", "gpt")


def _lmsys_pairs(path: str) -> Iterator[tuple[str, str]]:
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise TraceError(path, "file", "reading LMSYS-Chat-1M parquet needs pyarrow (pip install pyarrow)") from None
  try:
    parquet = pq.ParquetFile(path)
  except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ... for a file that is not parquet
    raise TraceError(path, "file", f"not a parquet file ({type(e).__name__}: {str(e)[:120]})") from None
  if "conversation" not in parquet.schema_arrow.names:
    raise TraceError(path, "conversation", f"missing column (columns: {', '.join(parquet.schema_arrow.names)})")
  row = 0
  for batch in parquet.iter_batches(columns=["conversation"], batch_size=1024):
    for turns in batch.column(0).to_pylist():
      yield _first_pair(turns or [], path, row, "role", "content", "user", "assistant")
      row += 1


def _read_splitwise(path: str, limit: int | None) -> tuple[list[TraceRequest], int]:
  try:
    with open(path, newline="", encoding="utf-8") as f:
      reader = csv.DictReader(f)
      columns = reader.fieldnames or []
      for column in SPLITWISE_COLUMNS:
        if column not in columns:
          raise TraceError(path, column, f"missing column (columns: {', '.join(columns) or 'none'})")
      rows = [(i, row) for i, row in enumerate(reader)]
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise TraceError(path, "file", f"not a csv file ({type(e).__name__}: {str(e)[:120]})") from None
  parsed, skipped = [], 0
  for i, row in rows:
    context, generated = (_integer(path, i, row, column) for column in SPLITWISE_COLUMNS[1:])
    if context <= 0 or generated <= 0:
      skipped += 1
      continue
    parsed.append((_seconds(path, i, row["TIMESTAMP"]), context, generated))
  parsed.sort(key=lambda r: r[0])  # stable: rows of one instant keep the file's order
  parsed = parsed[:limit]
  start = parsed[0][0] if parsed else 0.0
  return [TraceRequest(context, generated, arrival=t - start) for t, context, generated in parsed], skipped


def _integer(path: str, row: int, values: dict, column: str) -> int:
  value = values.get(column)
  try:
    return int(value)
  except (TypeError, ValueError):
    raise TraceError(path, f"{column} (row {row + 1})", f"{value!r} is not an integer") from None


def _seconds(path: str, row: int, value: str | None) -> float:
  """A TIMESTAMP as seconds: a number, or a date and time ('2023-11-16 18:15:46.6805900', the Azure traces')."""
  try:
    return float(value)
  except (TypeError, ValueError):
    pass
  try:
    return datetime.datetime.fromisoformat(str(value).strip()).timestamp()
  except ValueError:
    raise TraceError(path, f"TIMESTAMP (row {row + 1})", f"{value!r} is neither seconds nor a date and time "
                     "(valid: e.g. 2023-11-16 18:15:46.6805900)") from None
