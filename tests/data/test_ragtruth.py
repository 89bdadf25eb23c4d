"""Reading RAGTruth's published files (fixtures written here in its schema, with invented rows): the selection by
split, task type and model, the response-level label from the spans, and one-line errors for bad files."""

import json

import pytest

from lwjax.config import ConfigError
from lwjax.data import ragtruth

SOURCES = [
    {"source_id": "101", "task_type": "QA", "source": "MARCO",
     "source_info": {"question": "what colour is a Tarrow finch", "passages": "passage 1: The Tarrow finch is blue."},
     "prompt": "Briefly answer the following question:\nwhat colour is a Tarrow finch\nBear in mind that your "
               "response should be strictly based on the following passage:\npassage 1: The Tarrow finch is blue.\n"
               "output:"},
    {"source_id": "102", "task_type": "Summary", "source": "CNN/DM", "source_info": "Ost opened a new bridge.",
     "prompt": "Summarize the following news within 20 words:\nOst opened a new bridge.\noutput:"},
    {"source_id": "103", "task_type": "Data2txt", "source": "Yelp",
     "source_info": {"name": "Kell Diner", "stars": 4}, "prompt": "Write an overview of Kell Diner: stars 4.\n"},
]
RESPONSES = [
    {"id": "1", "source_id": "101", "model": "llama-2-7b-chat", "temperature": 0.7, "split": "train",
     "quality": "good", "response": "The Tarrow finch is blue.", "labels": []},
    {"id": "2", "source_id": "101", "model": "llama-2-7b-chat", "temperature": 0.7, "split": "test",
     "quality": "good", "response": "It is red, and it sings at night.",
     "labels": [{"start": 6, "end": 9, "text": "red", "meta": "", "label_type": "Evident Conflict",
                 "implicit_true": False, "due_to_null": False}]},
    {"id": "3", "source_id": "101", "model": "gpt-4-0613", "temperature": 0.7, "split": "train",
     "quality": "good", "response": "Blue.", "labels": []},
    {"id": "4", "source_id": "102", "model": "llama-2-7b-chat", "temperature": 0.7, "split": "train",
     "quality": "good", "response": "Ost opened a bridge built by Kell.",
     "labels": [{"start": 19, "end": 33, "text": "built by Kell", "meta": "",
                 "label_type": "Evident Baseless Info", "implicit_true": False, "due_to_null": False}]},
    {"id": "5", "source_id": "103", "model": "mistral-7B-instruct", "temperature": 0.7, "split": "test",
     "quality": "good", "response": "Kell Diner has four stars.", "labels": []},
]


def write(root, sources=SOURCES, responses=RESPONSES):
  root.mkdir(parents=True, exist_ok=True)
  (root / "source_info.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sources))
  (root / "response.jsonl").write_text("".join(json.dumps(r) + "\n" for r in responses))
  return root


def _error(**kwargs) -> str:
  with pytest.raises(ConfigError) as info:
    ragtruth.load(**kwargs)
  return str(info.value)


def test_selection_and_labels(tmp_path):
  root = write(tmp_path / "RAGTruth" / "dataset")
  everything = ragtruth.load(str(tmp_path))
  assert [r.id for r in everything] == ["1", "2", "3", "4", "5"]
  assert [r.hallucinated for r in everything] == [False, True, False, True, False]
  assert everything[1].spans == (ragtruth.Span(6, 9, "Evident Conflict"),)
  assert everything[0].prompt == SOURCES[0]["prompt"] and everything[0].response == RESPONSES[0]["response"]
  assert [r.task_type for r in everything] == ["QA", "QA", "QA", "Summary", "Data2txt"]
  qa = ragtruth.load(str(root), task_types=("QA",), models=("llama-2-7b-chat",))
  assert [(r.id, r.split) for r in qa] == [("1", "train"), ("2", "test")]
  assert [r.id for r in ragtruth.load(str(root), splits=("test",))] == ["2", "5"]


def test_bad_files_are_one_line_errors_naming_the_file_and_field(tmp_path):
  assert _error(path="").startswith("data.path: empty")
  assert _error(path=str(tmp_path / "none")).startswith(f"data.path: {tmp_path}/none does not exist")
  (tmp_path / "half").mkdir()
  (tmp_path / "half" / "source_info.jsonl").write_text("")
  assert "no response.jsonl under" in _error(path=str(tmp_path / "half"))
  bad = [dict(r) for r in RESPONSES]
  del bad[2]["labels"]
  write(tmp_path / "a", responses=bad)
  assert f"{tmp_path}/a/response.jsonl row 2 lacks the field 'labels'" in _error(path=str(tmp_path / "a"))
  write(tmp_path / "b", sources=[{k: v for k, v in SOURCES[0].items() if k != "prompt"}])
  assert "source_info.jsonl row 0 lacks the field 'prompt'" in _error(path=str(tmp_path / "b"))
  write(tmp_path / "c", sources=SOURCES[:1])
  assert "response.jsonl row 3: source_id '102' is not in" in _error(path=str(tmp_path / "c"))
  spans = [dict(r) for r in RESPONSES]
  spans[1] = dict(spans[1], labels=[{"start": 6, "text": "red", "label_type": "Evident Conflict"}])
  write(tmp_path / "d", responses=spans)
  assert "response.jsonl row 1 labels[0] lacks the field 'end'" in _error(path=str(tmp_path / "d"))
  write(tmp_path / "e")
  message = _error(path=str(tmp_path / "e"), task_types=("QA",), models=("gpt-3.5-turbo-0613",))
  assert message.startswith(f"data.path: {tmp_path}/e/response.jsonl: no response of split train/test, task_type QA, "
                            "model gpt-3.5-turbo-0613")
