"""Reading HotpotQA, SQuAD v2 and MultiHop-RAG from their published layouts (fixtures written here in each schema,
with invented rows), the errors a bad `data.path` gives, RULER's CWE lists, long documents and their segments, and
the official scores."""

import json
import random
import sys

import pyarrow
import pyarrow.parquet
import pytest

from lwjax.config import ConfigError
from lwjax.data.long_qa import cwe, documents, scoring, sets

HOTPOT = [
    {"_id": "h1", "question": "Which river runs past the town where Ada Vell was born?", "answer": "the Sorn",
     "type": "bridge", "level": "hard",
     "context": [["Ada Vell", ["Ada Vell is a painter.", " She was born in Tarrow."]],
                 ["Tarrow", ["Tarrow is a town.", " The Sorn runs past it."]],
                 ["Mile Oak", ["Mile Oak is a village."]]],
     "supporting_facts": [["Ada Vell", 1], ["Tarrow", 1]]},
    {"_id": "h2", "question": "Is Kell older than Brin?", "answer": "yes", "type": "comparison", "level": "easy",
     "context": [["Kell", ["Kell was founded in 1801."]], ["Brin", ["Brin was founded in 1900."]],
                 ["Osk", ["Osk is a lake."]]],
     "supporting_facts": [["Kell", 0], ["Brin", 0]]},
]


def _hub_hotpot(row):
  return {"id": row["_id"], "question": row["question"], "answer": row["answer"], "type": row["type"],
          "level": row["level"],
          "context": {"title": [t for t, _ in row["context"]], "sentences": [s for _, s in row["context"]]},
          "supporting_facts": {"title": [t for t, _ in row["supporting_facts"]],
                               "sent_id": [i for _, i in row["supporting_facts"]]}}


SQUAD = {"version": "v2.0", "data": [
    {"title": "Quill", "paragraphs": [
        {"context": "The quill was cut from a goose feather in 1702.",
         "qas": [{"id": "s1", "question": "What was the quill cut from?", "is_impossible": False,
                  "answers": [{"text": "a goose feather", "answer_start": 17},
                              {"text": "goose feather", "answer_start": 19}]},
                 {"id": "s2", "question": "Who sold the quill?", "is_impossible": True, "answers": [],
                  "plausible_answers": [{"text": "goose", "answer_start": 19}]}]}]},
    {"title": "Lantern", "paragraphs": [
        {"context": "Lanterns in Ost burn whale oil.",
         "qas": [{"id": "s3", "question": "What do lanterns in Ost burn?", "is_impossible": False,
                  "answers": [{"text": "whale oil", "answer_start": 21}]}]}]}]}


def _hub_squad(doc):
  return [{"id": qa["id"], "title": article["title"], "context": p["context"], "question": qa["question"],
           "answers": {"text": [a["text"] for a in qa["answers"]],
                       "answer_start": [a["answer_start"] for a in qa["answers"]]}}
          for article in doc["data"] for p in article["paragraphs"] for qa in p["qas"]]


CORPUS = [{"title": "Rover lands on Pell", "body": "The rover landed on Pell in May.", "author": "A. Writer",
           "source": "Space Daily", "category": "science", "published_at": "2023-10-01T00:00:00+00:00",
           "url": "https://example.invalid/1"},
          {"title": "Pell mission extended", "body": "The Pell mission was extended by a year.", "author": "B. Writer",
           "source": "Orbit News", "category": "science", "published_at": "2023-11-01T00:00:00+00:00",
           "url": "https://example.invalid/2"},
          {"title": "Grain prices fall", "body": "Grain prices fell in Ost.", "author": "C. Writer",
           "source": "Market Wire", "category": "business", "published_at": "2023-12-01T00:00:00+00:00",
           "url": "https://example.invalid/3"}]
QUERIES = [{"query": "Did the rover that landed on Pell have its mission extended?", "answer": "Yes",
            "question_type": "inference_query",
            "evidence_list": [{"title": "Rover lands on Pell", "fact": "The rover landed on Pell.", "author": "",
                               "source": "Space Daily", "category": "science", "published_at": "", "url": ""},
                              {"title": "Pell mission extended", "fact": "It was extended.", "author": "",
                               "source": "Orbit News", "category": "science", "published_at": "", "url": ""}]},
           {"query": "What did the Ost mayor say?", "answer": "Insufficient information.",
            "question_type": "null_query", "evidence_list": []}]


def _parquet(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)


def _error(fn, *args, **kwargs) -> str:
  with pytest.raises(ConfigError) as info:
    fn(*args, **kwargs)
  return str(info.value)


def test_hotpotqa_original_json_and_hub_parquet_read_alike(tmp_path):
  (tmp_path / "hotpot_dev_distractor_v1.json").write_text(json.dumps(HOTPOT))
  _parquet(tmp_path / "distractor" / "validation-00000-of-00001.parquet", [_hub_hotpot(r) for r in HOTPOT])
  original = sets.load("hotpotqa", str(tmp_path / "hotpot_dev_distractor_v1.json"))
  hub = sets.load("hotpotqa", str(tmp_path / "distractor"), "validation")
  assert [(e.question, e.answers, e.gold, e.distractors, e.kind) for e in original.examples] == \
         [(e.question, e.answers, e.gold, e.distractors, e.kind) for e in hub.examples]
  first = original.examples[0]
  assert first.id == "h1" and first.answers == ("the Sorn",) and first.kind == "bridge"
  assert first.gold == (sets.Passage("Ada Vell", "Ada Vell is a painter. She was born in Tarrow."),
                        sets.Passage("Tarrow", "Tarrow is a town. The Sorn runs past it."))
  assert first.distractors == (sets.Passage("Mile Oak", "Mile Oak is a village."),)
  assert len(original.pool) == 6 and original.pool == hub.pool


def test_squad_v2_nested_json_and_hub_rows_read_alike(tmp_path):
  (tmp_path / "dev-v2.0.json").write_text(json.dumps(SQUAD))
  _parquet(tmp_path / "squad_v2" / "validation-00000-of-00001.parquet", _hub_squad(SQUAD))
  (tmp_path / "flat").mkdir()
  (tmp_path / "flat" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _hub_squad(SQUAD)))
  nested = sets.load("squad_v2", str(tmp_path / "dev-v2.0.json"))
  for other in (sets.load("squad_v2", str(tmp_path / "squad_v2")), sets.load("squad_v2", str(tmp_path / "flat"))):
    assert other.examples == nested.examples and other.pool == nested.pool
  assert [(e.id, e.answers, e.kind) for e in nested.examples] == [
      ("s1", ("a goose feather", "goose feather"), "answerable"), ("s2", (), "unanswerable"),
      ("s3", ("whale oil",), "answerable")]
  assert nested.examples[0].gold == (sets.Passage("Quill", SQUAD["data"][0]["paragraphs"][0]["context"]),)
  assert len(nested.pool) == 2  # one passage per distinct paragraph


def test_multihop_rag_gold_passages_are_the_articles_the_evidence_names(tmp_path):
  (tmp_path / "dataset").mkdir()
  (tmp_path / "dataset" / "corpus.json").write_text(json.dumps(CORPUS))
  (tmp_path / "dataset" / "MultiHopRAG.json").write_text(json.dumps(QUERIES))
  qa = sets.load("multihop_rag", str(tmp_path))
  assert [e.kind for e in qa.examples] == ["inference_query", "null_query"]
  assert [p.title for p in qa.examples[0].gold] == ["Rover lands on Pell", "Pell mission extended"]
  assert qa.examples[0].gold[0].text == CORPUS[0]["body"] and qa.examples[1].gold == ()
  assert [p.title for p in qa.pool] == [a["title"] for a in CORPUS]


def test_bad_files_are_one_line_errors_naming_the_file_and_field(tmp_path, monkeypatch):
  assert _error(sets.load, "squad_v2", "").startswith("data.path: empty")
  assert _error(sets.load, "squad_v2", str(tmp_path / "nope.json")).startswith(f"data.path: {tmp_path}/nope.json "
                                                                                "does not exist")
  bad = [dict(HOTPOT[0])]
  del bad[0]["supporting_facts"]
  (tmp_path / "h.json").write_text(json.dumps(bad))
  message = _error(sets.load, "hotpotqa", str(tmp_path / "h.json"))
  assert message.startswith(f"data.path: {tmp_path}/h.json row 0 lacks the field 'supporting_facts'")
  rows = _hub_squad(SQUAD)
  del rows[2]["question"]
  (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert "s.jsonl row 2 lacks the field 'question'" in _error(sets.load, "squad_v2", str(tmp_path / "s.jsonl"))
  nested = json.loads(json.dumps(SQUAD))
  del nested["data"][1]["paragraphs"][0]["qas"][0]["answers"]
  (tmp_path / "n.json").write_text(json.dumps(nested))
  assert "n.json data[1].paragraphs[0].qas[0] lacks the field 'answers'" in _error(sets.load, "squad_v2",
                                                                                    str(tmp_path / "n.json"))
  (tmp_path / "empty.jsonl").write_text("")
  assert "no squad_v2 examples" in _error(sets.load, "squad_v2", str(tmp_path / "empty.jsonl"))
  (tmp_path / "mh").mkdir()
  (tmp_path / "mh" / "corpus.json").write_text(json.dumps(CORPUS))
  assert "no MultiHopRAG.json under" in _error(sets.load, "multihop_rag", str(tmp_path / "mh"))
  (tmp_path / "mh" / "MultiHopRAG.json").write_text(json.dumps([{k: v for k, v in QUERIES[0].items()
                                                                 if k != "evidence_list"}]))
  assert "MultiHopRAG.json row 0 lacks the field 'evidence_list'" in _error(sets.load, "multihop_rag",
                                                                            str(tmp_path / "mh"))
  assert "no 'test' files under" in _error(sets.load, "squad_v2", str(tmp_path / "mh"), "test")
  _parquet(tmp_path / "p" / "validation-00000-of-00001.parquet", _hub_squad(SQUAD))
  monkeypatch.setitem(sys.modules, "pyarrow", None)
  assert "reading parquet needs pyarrow, which is not installed" in _error(sets.load, "squad_v2", str(tmp_path / "p"))


def test_squad_scores_follow_the_official_script():
  assert scoring.normalize_answer("The  Goose-Feather, an A!") == "goosefeather"
  assert scoring.squad("A goose feather.", ["a goose feather", "goose feather"]) == {"exact_match": 1.0, "f1": 1.0}
  s = scoring.squad("it was cut from a goose feather", ["goose feather"])
  # prediction tokens: it was cut from goose feather (6); 2 shared with the 2 gold tokens
  assert s["exact_match"] == 0.0 and s["f1"] == pytest.approx(2 * (2 / 6) * 1.0 / (2 / 6 + 1.0))
  assert scoring.squad("feather feather", ["goose feather"])["f1"] == pytest.approx(0.5)  # counted once
  assert scoring.squad("", []) == {"exact_match": 1.0, "f1": 1.0}  # unanswerable: empty is right
  assert scoring.squad("whale oil", []) == {"exact_match": 0.0, "f1": 0.0}
  assert scoring.squad("the", ["an"]) == {"exact_match": 1.0, "f1": 1.0}  # golds normalising to nothing: ""
  assert scoring.string_match_all("Answer: 1. Baku 2. MIRO", ["baku", "miro", "tesa", "rolo"]) == 0.5


def test_cwe_lists_repeat_the_common_words_as_ruler_does():
  count = lambda text: len(text.split())  # noqa: E731
  for target, (common_repeats, uncommon_repeats) in ((600, (6, 1)), (4096, (30, 3))):
    items, common = cwe.generate(random.Random(3), target, count)
    words = [item.split(". ", 1)[1] for item in items]
    assert [item.split(". ", 1)[0] for item in items] == [str(i + 1) for i in range(len(items))]
    assert len(common) == cwe.NUM_COMMON and count(" ".join(items)) <= target
    counts = {w: words.count(w) for w in set(words)}
    assert all(counts[w] == common_repeats for w in common)
    assert all(n == uncommon_repeats for w, n in counts.items() if w not in common)
    assert count(" ".join(items)) > 0.8 * target  # filled, not just under the target
  assert cwe.generate(random.Random(3), 600, count) == cwe.generate(random.Random(3), 600, count)
  docs = documents.cwe_documents(2, target_tokens=600, count_tokens=count, seed=0)
  assert docs[0].answers != docs[1].answers and docs[0].gold == tuple(range(len(docs[0].passages)))
  assert docs[0].question == "What are the 10 most common words in the above list?"


def test_long_documents_hold_the_gold_among_distractors_up_to_the_target(tmp_path):
  (tmp_path / "h.json").write_text(json.dumps(HOTPOT))
  qa = sets.load("hotpotqa", str(tmp_path / "h.json"))
  pool = [sets.Passage(f"P{i}", " ".join(f"w{i}" for _ in range(i % 7 + 3))) for i in range(200)]
  count = lambda text: len(text.split())  # noqa: E731
  example = qa.examples[0]
  doc = documents.assemble(example, pool, target_tokens=150, count_tokens=count, rng=random.Random(0))
  gold = [p.render() for p in example.gold]
  assert sorted(doc.passages[i] for i in doc.gold) == sorted(gold)
  assert example.distractors[0].render() in doc.passages  # its own distractor first
  assert len(set(doc.passages)) == len(doc.passages) and 100 < count(doc.text) <= 150
  again = documents.assemble(example, pool, target_tokens=150, count_tokens=count, rng=random.Random(0))
  other = documents.assemble(example, pool, target_tokens=150, count_tokens=count, rng=random.Random(1))
  assert again == doc and other.passages != doc.passages
  assert sorted({doc.gold for doc in (documents.assemble(example, pool, target_tokens=150, count_tokens=count,
                                                         rng=random.Random(s)) for s in range(20))}) != [doc.gold]
  texts, has_gold = documents.segments(doc, segment_tokens=40, count_tokens=count)
  assert "".join(texts) == doc.text and len(texts) >= 4
  assert all(count(t) <= 40 for t in texts)
  assert [any(g in t for g in gold) for t in texts] == has_gold
  tiny = documents.assemble(example, pool, target_tokens=5, count_tokens=count, rng=random.Random(0))
  assert sorted(tiny.passages) == sorted(gold)  # the gold passages whatever the target
  docs = documents.qa_documents(qa, 5, target_tokens=60, count_tokens=count, seed=0)
  assert len(docs) == 2 and docs == documents.qa_documents(qa, 5, target_tokens=60, count_tokens=count, seed=0)
