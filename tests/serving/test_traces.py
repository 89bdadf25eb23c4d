"""Trace parsing: ShareGPT json, LMSYS-Chat-1M parquet and the Azure (Splitwise) csv, each written here in its
published schema with invented rows; lengths, arrivals, clipping, and one-line errors naming the file and field."""

import csv
import json
import sys

import numpy as np
import pytest

from lwjax.serving import traces


def write_sharegpt(path, conversations):
  path.write_text(json.dumps([{"id": f"conv{i}", "conversations": turns} for i, turns in enumerate(conversations)]))
  return str(path)


def write_lmsys(path, conversations, model="vicuna-13b"):
  """LMSYS-Chat-1M's columns and types (conversation: list<struct<content, role>>; openai_moderation per turn)."""
  pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
  moderation = pa.list_(pa.struct([("categories", pa.struct([("harassment", pa.bool_()), ("violence", pa.bool_())])),
                                   ("category_scores", pa.struct([("harassment", pa.float64()),
                                                                  ("violence", pa.float64())])),
                                   ("flagged", pa.bool_())]))
  schema = pa.schema([("conversation_id", pa.string()), ("model", pa.string()),
                      ("conversation", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))),
                      ("turn", pa.int64()), ("language", pa.string()), ("openai_moderation", moderation),
                      ("redacted", pa.bool_())])
  clean = {"categories": {"harassment": False, "violence": False},
           "category_scores": {"harassment": 0.001, "violence": 0.0002}, "flagged": False}
  table = pa.Table.from_pylist([
      {"conversation_id": f"{i:032x}", "model": model, "conversation": turns, "turn": len(turns) // 2,
       "language": "English", "openai_moderation": [clean] * len(turns), "redacted": False}
      for i, turns in enumerate(conversations)], schema=schema)
  pq.write_table(table, path)
  return str(path)


def write_splitwise(path, rows, header=("TIMESTAMP", "ContextTokens", "GeneratedTokens")):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return str(path)


def test_sharegpt_pairs_the_first_human_turn_with_the_gpt_turn_after_it(tmp_path):
  path = write_sharegpt(tmp_path / "sharegpt.json", [
      [{"from": "human", "value": "a" * 40}, {"from": "gpt", "value": "b" * 9}, {"from": "human", "value": "c"},
       {"from": "gpt", "value": "d" * 400}],
      [{"from": "gpt", "value": "hello"}, {"from": "human", "value": "x" * 8}, {"from": "gpt", "value": "y" * 12}],
      [{"from": "human", "value": "no answer"}],  # skipped
      [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}],  # empty answer: skipped
  ])
  trace = traces.read(path)
  assert trace.format == "sharegpt" and trace.length_source == "chars/4 estimate"
  assert [(r.prompt_tokens, r.output_tokens) for r in trace.requests] == [(10, 3), (2, 3)]
  assert trace.skipped == 2 and not trace.has_arrivals
  words = traces.read(path, count_tokens=len)
  assert words.length_source == "tokenizer" and words.requests[0].prompt_tokens == 40
  assert len(traces.read(path, limit=1).requests) == 1


def test_lmsys_reads_the_conversation_column(tmp_path):
  path = write_lmsys(tmp_path / "train-00000-of-00006.parquet", [
      [{"role": "user", "content": "u" * 17}, {"role": "assistant", "content": "v" * 80}],
      [{"role": "user", "content": "w" * 4}, {"role": "assistant", "content": "z" * 4},
       {"role": "user", "content": "again"}, {"role": "assistant", "content": "more"}],
      [{"role": "assistant", "content": "orphan"}],
  ])
  trace = traces.read(path)
  assert trace.format == "lmsys"
  assert [(r.prompt_tokens, r.output_tokens) for r in trace.requests] == [(5, 20), (1, 1)]
  assert trace.skipped == 1


def test_splitwise_arrivals_are_the_timestamps_from_the_first(tmp_path):
  path = write_splitwise(tmp_path / "AzureLLMInferenceTrace_conv.csv", [
      ("2023-11-16 18:15:46.6805900", 374, 44),
      ("2023-11-16 18:15:50.9951690", 396, 109),
      ("2023-11-16 18:15:47.0000000", 879, 0),  # nothing generated: skipped
      ("2023-11-16 18:15:48.1805900", 1020, 14),
  ])
  trace = traces.read(path)
  assert trace.length_source == "recorded token counts" and trace.skipped == 1 and trace.has_arrivals
  assert [(r.prompt_tokens, r.output_tokens) for r in trace.requests] == [(374, 44), (1020, 14), (396, 109)]
  np.testing.assert_allclose([r.arrival for r in trace.requests], [0.0, 1.5, 4.314579], atol=1e-5)
  seconds = write_splitwise(tmp_path / "seconds.csv", [(10.5, 3, 4), (12.0, 5, 6)])
  assert [r.arrival for r in traces.read(seconds).requests] == [0.0, 1.5]


def test_clip_fits_the_context_and_counts():
  requests = [traces.TraceRequest(100, 10), traces.TraceRequest(30, 200), traces.TraceRequest(40, 20)]
  clipped, count = traces.clip(requests, 64)
  assert count == 2
  assert [(r.prompt_tokens, r.output_tokens) for r in clipped] == [(54, 10), (30, 32), (40, 20)]


def test_poisson_arrivals_have_the_rate():
  arrivals = traces.poisson_arrivals(4000, rate=5.0, seed=1)
  assert arrivals[0] == 0.0 and all(b >= a for a, b in zip(arrivals, arrivals[1:], strict=False))
  assert 4.7 < (len(arrivals) - 1) / arrivals[-1] < 5.3


@pytest.mark.parametrize("name,content,message", [
    ("bad.json", "{not json", r"bad.json: file: not a ShareGPT json file \(JSONDecodeError"),
    ("top.json", json.dumps({"conversations": []}), r"top.json: \(top level\): a dict, not a list"),
    ("noconv.json", json.dumps([{"id": "a", "turns": []}]), r"noconv.json: \[0\].conversations: missing"),
    ("nofrom.json", json.dumps([{"id": "a", "conversations": [{"value": "hi"}]}]), r"nofrom.json: \[0\]\[0\].from: "),
    ("empty.json", "[]", r"empty.json: conversations: no request in the trace"),
    ("cols.csv", "TIMESTAMP,ContextTokens\n1,2\n", r"cols.csv: GeneratedTokens: missing column \(columns: "
                                                   r"TIMESTAMP, ContextTokens\)"),
    ("value.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n1,many,2\n", r"value.csv: ContextTokens \(row 1\): "
                                                                        r"'many' is not an integer"),
    ("time.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,2\n", r"time.csv: TIMESTAMP \(row 1\): "),
    ("rows.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n", r"rows.csv: TIMESTAMP,ContextTokens,GeneratedTokens: "
                                                              r"no request"),
    ("trace.txt", "", r"trace.txt: format: not known from the extension"),
])
def test_bad_traces_are_one_line_errors_naming_file_and_field(tmp_path, name, content, message):
  (tmp_path / name).write_text(content)
  with pytest.raises(traces.TraceError, match=message) as error:
    traces.read(str(tmp_path / name))
  assert "\n" not in str(error.value)


def test_lmsys_without_its_conversation_column_or_pyarrow(tmp_path, monkeypatch):
  pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
  path = tmp_path / "other.parquet"
  pq.write_table(pa.table({"model": ["m"], "turn": [1]}), path)
  with pytest.raises(traces.TraceError, match=r"other.parquet: conversation: missing column \(columns: model, turn\)"):
    traces.read(str(path))
  (tmp_path / "junk.parquet").write_text("not parquet")
  with pytest.raises(traces.TraceError, match=r"junk.parquet: file: not a parquet file"):
    traces.read(str(tmp_path / "junk.parquet"))
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
  with pytest.raises(traces.TraceError, match=r"other.parquet: file: reading LMSYS-Chat-1M parquet needs pyarrow"):
    traces.read(str(path))
  with pytest.raises(traces.TraceError, match=r"missing.csv: file: does not exist"):
    traces.read(str(tmp_path / "missing.csv"))
