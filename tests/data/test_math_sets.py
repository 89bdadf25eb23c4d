"""Tests of reading GSM8K and MATH from their published layouts (fixtures written here in each published
schema, with invented problems), the errors a bad `data.path` gives, and `answer_of`/`is_correct`."""

import json
import sys

import pyarrow
import pyarrow.parquet
import pytest

from lwjax.config import ConfigError
from lwjax.data import math_sets

GSM8K_ROWS = {
    "train": [
        {"question": "Ann has 3 pens and buys 4 more. How many pens?",
         "answer": "She has 3+4=<<3+4=7>>7 pens.\n#### 7"},
        {"question": "A farm sells 1,200 eggs a day. How many in 2 days?",
         "answer": "It sells 1,200*2=<<1200*2=2400>>2,400 eggs.\n#### 2,400"},
    ],
    "test": [{"question": "Bo walks 2 km twice. How far?", "answer": "2*2=<<2*2=4>>4\n#### 4"}],
}
MATH_ROWS = {
    ("train", "algebra", 2): {"problem": "Solve $2x=1$.", "solution": r"So $x=\boxed{\dfrac{1}{2}}$.",
                              "level": "Level 1", "type": "Algebra"},
    ("train", "algebra", 10): {"problem": "Simplify $\\sqrt{8}$.", "solution": r"It is $\boxed{2\sqrt2}$.",
                               "level": "Level 2", "type": "Algebra"},
    ("train", "geometry", 1): {"problem": "An angle?", "solution": r"It is $\boxed{30^\circ}$.",
                               "level": "Level 3", "type": "Geometry"},
    ("test", "algebra", 5): {"problem": "Pair?", "solution": r"$\boxed{\left(1, \frac{1}{2}\right)}$",
                             "level": "Level 4", "type": "Algebra"},
}


def _write_jsonl(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def _write_parquet(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)


def _write_math_tree(root):
  for (split, subject, number), row in MATH_ROWS.items():
    (root / split / subject).mkdir(parents=True, exist_ok=True)
    (root / split / subject / f"{number}.json").write_text(json.dumps(row))


def test_gsm8k_jsonl_as_in_the_openai_repository(tmp_path):
  for split, rows in GSM8K_ROWS.items():
    _write_jsonl(tmp_path / "grade_school_math" / "data" / f"{split}.jsonl", rows)
  _write_jsonl(tmp_path / "grade_school_math" / "data" / "train_socratic.jsonl", GSM8K_ROWS["test"])
  train = math_sets.load("gsm8k", tmp_path, "train")
  assert [r["answer"] for r in train] == ["7", "2400"]
  assert train[0] == {"question": GSM8K_ROWS["train"][0]["question"], "solution": GSM8K_ROWS["train"][0]["answer"],
                      "answer": "7"}
  assert all(math_sets.answer_of("gsm8k", r["solution"]) == r["answer"] for r in train)
  assert [r["answer"] for r in math_sets.load("gsm8k", tmp_path, "test")] == ["4"]


def test_gsm8k_hub_parquet_reads_the_main_config(tmp_path):
  for split, rows in GSM8K_ROWS.items():
    _write_parquet(tmp_path / "main" / f"{split}-00000-of-00001.parquet", rows)
    _write_parquet(tmp_path / "socratic" / f"{split}-00000-of-00001.parquet", rows[:1])
  assert [r["answer"] for r in math_sets.load("gsm8k", tmp_path, "train")] == ["7", "2400"]
  assert len(math_sets.load("gsm8k", tmp_path / "socratic", "train")) == 1


def test_math_tree_of_one_json_per_problem(tmp_path):
  _write_math_tree(tmp_path / "MATH")
  train = math_sets.load("math", tmp_path / "MATH", "train")
  assert [(r["type"], r["answer"]) for r in train] == [
      ("Algebra", r"\frac{1}{2}"), ("Algebra", r"2\sqrt{2}"), ("Geometry", "30")]  # 2.json before 10.json
  assert train[0]["question"] == train[0]["problem"] == "Solve $2x=1$." and train[0]["level"] == "Level 1"
  assert all(math_sets.answer_of("math", r["solution"]) == r["answer"] for r in train)
  test = math_sets.load("math", tmp_path / "MATH", "test")
  assert [r["answer"] for r in test] == [r"(1,\frac{1}{2})"]
  assert len(math_sets.load("math", tmp_path / "MATH" / "train", "train")) == 3


def test_math_hub_parquet_one_folder_per_subject(tmp_path):
  for (split, subject, _), row in MATH_ROWS.items():
    path = tmp_path / subject / f"{split}-00000-of-00001.parquet"
    rows = pyarrow.parquet.read_table(path).to_pylist() if path.exists() else []
    _write_parquet(path, [*rows, row])
  assert [r["answer"] for r in math_sets.load("math", tmp_path, "train")] == [r"\frac{1}{2}", r"2\sqrt{2}", "30"]


def test_math500_keeps_its_published_answer_and_fields(tmp_path):
  row = {"problem": "What is $6/4$?", "solution": r"It is $\boxed{1.5}$.", "answer": r"\frac{3}{2}",
         "subject": "Prealgebra", "level": 2, "unique_id": "test/prealgebra/1.json"}
  _write_jsonl(tmp_path / "test.jsonl", [row])
  [record] = math_sets.load("math", tmp_path, "test")
  assert record == {**row, "question": row["problem"]}
  assert math_sets.load("math", tmp_path / "test.jsonl", "test") == [record]
  assert math_sets.is_correct("math", record, r"so it is $\boxed{1.5}$")
  assert not math_sets.is_correct("math", record, r"$\boxed{\frac{6}{4}}$")


def test_is_correct_and_answer_of():
  gsm8k = {"question": "?", "solution": "#### 2400", "answer": "2400"}
  assert math_sets.is_correct("gsm8k", gsm8k, "So they sell $2,400.00 in total. The answer is 2,400.")
  assert not math_sets.is_correct("gsm8k", gsm8k, "The answer is 2,401")
  assert math_sets.answer_of("gsm8k", "I do not know") is None
  math = {"question": "?", "solution": "", "answer": r"\frac{1}{2}"}
  assert math_sets.is_correct("math", math, r"Thus $x = \boxed{0.5}$.")
  assert not math_sets.is_correct("math", math, r"Thus $x = \frac{1}{2}$.")  # no stated final answer
  assert math_sets.answer_of("math", r"$\boxed{\dfrac12}$") == r"\frac{1}{2}"
  assert math_sets.answer_of("math", r"$\boxed{}$") is None


def _config_error(call, *args) -> ConfigError:
  with pytest.raises(ConfigError) as caught:
    call(*args)
  return caught.value


def test_a_missing_path_names_it(tmp_path):
  error = _config_error(math_sets.load, "gsm8k", tmp_path / "nowhere", "train")
  assert error.key == "data.path" and str(tmp_path / "nowhere") in str(error)


@pytest.mark.parametrize(("files", "why"), [
    ({"train.jsonl": '{"question": "q", "answer": "#### 1"}\n{"question": \n'}, "train.jsonl:2: not JSON"),
    ({"train.jsonl": '{"question": "q"}\n'}, "train.jsonl row 0 lacks the text field(s) answer"),
    ({"train.jsonl": '{"question": "q", "answer": "no final line"}\n'}, "row 0 has no final answer"),
    ({"train.jsonl": '[1, 2]\n'}, "row 0 is a list"),
    ({"train-00000-of-00001.parquet": "not parquet"}, "not a readable parquet file"),
    ({"test.jsonl": "{}\n"}, "no 'train' files under"),
    ({"train.jsonl": "{}\n", "main/train-00000-of-00001.parquet": ""}, "several layouts (jsonl, parquet)"),
])
def test_bad_files_name_the_file(tmp_path, files, why):
  for name, text in files.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text)
  error = _config_error(math_sets.load, "gsm8k", tmp_path, "train")
  assert error.key == "data.path" and why in str(error) and str(tmp_path) in str(error)


def test_a_file_of_the_other_split_is_refused(tmp_path):
  _write_jsonl(tmp_path / "test.jsonl", GSM8K_ROWS["test"])
  error = _config_error(math_sets.load, "gsm8k", tmp_path / "test.jsonl", "train")
  assert error.key == "data.path" and "holds the 'test' split, not 'train'" in str(error)


def test_a_math_solution_without_a_box_is_refused(tmp_path):
  _write_jsonl(tmp_path / "train.jsonl", [{"problem": "?", "solution": "It is 5."}])
  assert "has no final answer" in str(_config_error(math_sets.load, "math", tmp_path, "train"))


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
  _write_parquet(tmp_path / "train-00000-of-00001.parquet", GSM8K_ROWS["train"])
  monkeypatch.setitem(sys.modules, "pyarrow", None)
  error = _config_error(math_sets.load, "gsm8k", tmp_path, "train")
  assert "needs pyarrow" in str(error) and "pip install pyarrow" in str(error)


def test_unknown_name_and_split(tmp_path):
  assert _config_error(math_sets.load, "aime", tmp_path, "train").key == "data.name"
  assert _config_error(math_sets.load, "gsm8k", tmp_path, "hard").key == "data.split"
  assert _config_error(math_sets.answer_of, "aime", "text").key == "data.name"
