"""Reading UltraChat and binarized UltraFeedback from their published layouts (fixtures written here in each
published schema, with invented conversations), and the one-line errors a bad path or row gives."""

import json
import sys

import grain
import pyarrow
import pyarrow.parquet
import pytest

from lwjax.config import ConfigError
from lwjax.data import chat_sets


def ultrachat_row(i: int) -> dict:
  question = f"What is {i} plus {i}?"
  return {"prompt": question, "prompt_id": f"{i:064x}",
          "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": f"It is {2 * i}."},
                       {"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "Glad to help."}]}


def ultrafeedback_row(i: int) -> dict:
  question = f"Name a number above {i}."
  prompt = [{"role": "user", "content": question}]
  return {"prompt": question, "prompt_id": f"{i:064x}",
          "chosen": prompt + [{"role": "assistant", "content": f"{i + 1} is above {i}."}],
          "rejected": prompt + [{"role": "assistant", "content": "No."}],
          "score_chosen": 8.5, "score_rejected": 2.0}


def write_jsonl(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_parquet(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)


def test_ultrachat_from_hub_parquet_shards_and_from_jsonl(tmp_path):
  rows = [ultrachat_row(i) for i in range(5)]
  write_parquet(tmp_path / "hub" / "data" / "train_sft-00000-of-00002-abc.parquet", rows[:3])
  write_parquet(tmp_path / "hub" / "data" / "train_sft-00001-of-00002-def.parquet", rows[3:])
  write_parquet(tmp_path / "hub" / "data" / "test_sft-00000-of-00001-123.parquet", rows[:1])
  write_parquet(tmp_path / "hub" / "data" / "train_gen-00000-of-00001-456.parquet", rows[:2])
  train = chat_sets.ultrachat(tmp_path / "hub", "train_sft")
  assert isinstance(train, grain.MapDataset) and len(train) == 5
  assert [train[i] for i in range(5)] == rows  # both shards, in order
  assert len(chat_sets.ultrachat(tmp_path / "hub", "test_sft")) == 1
  write_jsonl(tmp_path / "json" / "test_sft.jsonl", rows[1:3])
  test = chat_sets.ultrachat(tmp_path / "json" / "test_sft.jsonl", "test_sft")
  assert list(test) == rows[1:3]


def test_ultrafeedback_pairs_and_their_checks(tmp_path):
  rows = [ultrafeedback_row(i) for i in range(3)]
  write_parquet(tmp_path / "data" / "train_prefs-00000-of-00001-x.parquet", rows)
  train = chat_sets.ultrafeedback(tmp_path, "train_prefs")
  assert [train[i] for i in range(3)] == rows
  assert isinstance(train[0]["score_chosen"], float)
  bad = dict(rows[1], rejected=[{"role": "user", "content": "Another question?"}, rows[1]["rejected"][-1]])
  write_jsonl(tmp_path / "pairs" / "test_prefs.jsonl", [rows[0], bad])
  test = chat_sets.ultrafeedback(tmp_path / "pairs", "test_prefs")
  assert test[0] == rows[0]
  with pytest.raises(ConfigError, match=r"^data.dpo_path: \S+test_prefs.jsonl row 1: fields 'chosen' and 'rejected' "
                                        r"differ before their answers"):
    test[1]


@pytest.mark.parametrize("edit,message", [
    (lambda r: r.pop("messages"), r"row 1: no field 'messages'"),
    (lambda r: r.update(prompt_id=7), r"row 1: field 'prompt_id' is of type int"),
    (lambda r: r.update(messages=[]), r"row 1: field 'messages' is an empty conversation"),
    (lambda r: r["messages"][2].pop("content"), r"row 1: field messages\[2\] has no 'content' string"),
])
def test_a_row_without_a_field_names_key_file_row_and_field(tmp_path, edit, message):
  rows = [ultrachat_row(0), ultrachat_row(1)]
  edit(rows[1])
  write_jsonl(tmp_path / "train_sft.jsonl", rows)
  train = chat_sets.ultrachat(tmp_path, "train_sft", key="data.sft_path")
  assert train[0] == ultrachat_row(0)
  with pytest.raises(ConfigError, match=rf"^data.sft_path: {tmp_path}/train_sft.jsonl {message} \(valid: UltraChat"):
    train[1]


def test_a_parquet_shard_without_a_column_names_the_field(tmp_path):
  row = ultrafeedback_row(0)
  del row["score_rejected"]
  write_parquet(tmp_path / "test_prefs-00000-of-00001.parquet", [row])
  with pytest.raises(ConfigError, match=r"^data.dpo_path: \S+ row 0: no field 'score_rejected'"):
    chat_sets.ultrafeedback(tmp_path, "test_prefs")[0]


def test_missing_paths_splits_and_empty_sets_are_one_line_errors(tmp_path):
  with pytest.raises(ConfigError, match=r"^data.sft_path: \S+/absent does not exist"):
    chat_sets.ultrachat(tmp_path / "absent", "train_sft")
  with pytest.raises(ConfigError, match=r"^data.sft_path: empty"):
    chat_sets.ultrachat("", "train_sft")
  with pytest.raises(ConfigError, match=r"^data.sft_path: no 'train_sft' files under"):
    chat_sets.ultrachat(tmp_path, "train_sft")
  with pytest.raises(ConfigError, match=r"^data.sft_path: 'train' is not a published split \(valid: train_sft,"):
    chat_sets.ultrachat(tmp_path, "train")
  write_jsonl(tmp_path / "test_sft.jsonl", [ultrachat_row(0)])
  with pytest.raises(ConfigError, match=r"^data.sft_path: \S+test_sft.jsonl is not a 'train_sft' file"):
    chat_sets.ultrachat(tmp_path / "test_sft.jsonl", "train_sft")
  (tmp_path / "train_sft.jsonl").write_text("\n\n")
  with pytest.raises(ConfigError, match=r"^data.sft_path: the 'train_sft' files hold no rows: \S+train_sft.jsonl"):
    chat_sets.ultrachat(tmp_path, "train_sft")
  (tmp_path / "train_sft.jsonl").write_text("{not json\n")
  with pytest.raises(ConfigError, match=r"^data.sft_path: \S+train_sft.jsonl row 0: not JSON"):
    chat_sets.ultrachat(tmp_path, "train_sft")[0]


def test_parquet_without_pyarrow_names_the_missing_package(tmp_path, monkeypatch):
  write_parquet(tmp_path / "train_prefs.parquet", [ultrafeedback_row(0)])
  monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now raises ImportError
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
  with pytest.raises(ConfigError, match=r"^data.dpo_path: \S+train_prefs.parquet: reading parquet needs the package "
                                        r"pyarrow, which is not installed"):
    chat_sets.ultrafeedback(tmp_path, "train_prefs")
