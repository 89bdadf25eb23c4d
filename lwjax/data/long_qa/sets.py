"""HotpotQA, SQuAD v2 and MultiHop-RAG read from their published files as question-answering examples, each with its
gold passages, and the pool of passages of the whole set that long documents draw distractors from.

Layouts read (rows through `lwjax.data.math_sets.layouts.read_rows`: a jsonl line, a json list item or object, a
parquet row each):
- `hotpotqa` (Yang et al. 2018, arXiv 1809.09600), distractor setting: rows `question`, `answer`, `context`,
  `supporting_facts`, `type`, `level`. The original json (`hotpot_dev_distractor_v1.json`) writes `context` as
  `[title, [sentences]]` pairs and `supporting_facts` as `[title, sentence index]` pairs; the Hub's parquet writes
  `context: {title: [...], sentences: [[...]]}` and `supporting_facts: {title: [...], sent_id: [...]}`. Gold
  passages: the paragraphs a supporting fact names; the other eight are the example's own distractors.
- `squad_v2` (Rajpurkar et al. 2018, arXiv 1806.03822): the original nested json (`dev-v2.0.json`:
  `data[].paragraphs[].qas[]` with `answers[{text, answer_start}]`, `is_impossible`), or the Hub's flat rows
  `id, title, context, question, answers{text, answer_start}`. An unanswerable question has no answers.
- `multihop_rag` (Tang and Yang 2024, arXiv 2401.15391): `corpus.json` (a list of articles `{title, body, ...}`) and
  `MultiHopRAG.json` (queries `{query, answer, question_type, evidence_list[{title, fact, ...}]}`), found under
  `data.path`. Gold passages: the corpus articles an evidence names by title (none for a null query).

`data.path` is a file, or a directory holding the split's files as the Hub names them (`<split>.jsonl`,
`<split>-*.parquet`, ...); a missing path, an empty set or a row without a field is a `ConfigError` naming
`data.path`, the file, the row and the field.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import re

from lwjax.config import ConfigError
from lwjax.data.math_sets import layouts

NAMES = ("hotpotqa", "squad_v2", "multihop_rag")
PATH_KEY = "data.path"
SUFFIXES = (".json", ".jsonl", ".parquet")
MULTIHOP_RAG_FILES = ("corpus", "MultiHopRAG")  # file stems, as the MultiHop-RAG repository names them


@dataclasses.dataclass(frozen=True)
class Passage:
  title: str
  text: str

  def render(self) -> str:
    return f"{self.title}\n{self.text}" if self.title else self.text


@dataclasses.dataclass(frozen=True)
class QAExample:
  id: str
  question: str
  answers: tuple[str, ...]  # any of them is right; none: unanswerable
  gold: tuple[Passage, ...]  # the passages holding the answer's evidence
  distractors: tuple[Passage, ...] = ()  # the example's own non-gold passages (HotpotQA's eight)
  kind: str = ""  # HotpotQA's type, SQuAD's answerable/unanswerable, MultiHop-RAG's question_type


@dataclasses.dataclass(frozen=True)
class QASet:
  name: str
  examples: tuple[QAExample, ...]
  pool: tuple[Passage, ...]  # every distinct passage of the set, where distractors are drawn from


def load(name: str, path: str, split: str = "validation") -> QASet:
  """The examples of `name` under `path` (the `split`'s files in a directory), in file order."""
  if name not in NAMES:
    raise ConfigError("data.set", f"{name!r} is not a published set read here", ", ".join(NAMES))
  if not path:
    raise ConfigError(PATH_KEY, f"empty: {name} is read from its published files",
                      "the file (or directory) holding them, e.g. /data/" + name)
  if name == "multihop_rag":
    qa = _multihop_rag(pathlib.Path(path).expanduser())
  else:
    read = _hotpotqa_rows if name == "hotpotqa" else _squad_rows
    examples = [e for file in split_files(path, split) for e in read(file, layouts.read_rows(file))]
    qa = QASet(name, tuple(examples), _distinct(p for e in examples for p in (*e.gold, *e.distractors)))
  if not qa.examples:
    raise ConfigError(PATH_KEY, f"{path}: no {name} examples in the {split!r} files", f"the files of a {name} split")
  return qa


def split_files(path: str | pathlib.Path, split: str) -> list[pathlib.Path]:
  """`path` itself when a file, else the files of `split` under it (`<split>.json[l]`, `<split>[-*].parquet`)."""
  root = pathlib.Path(path).expanduser()
  if not root.exists():
    raise ConfigError(PATH_KEY, f"{root} does not exist", "a published file of the set, or a directory of them")
  if root.is_file():
    return [root]
  pattern = re.compile(rf"{re.escape(split)}(-.*)?({'|'.join(map(re.escape, SUFFIXES))})")
  files = sorted(p for p in root.rglob("*") if p.is_file() and pattern.fullmatch(p.name))
  if not files:
    raise ConfigError(PATH_KEY, f"no {split!r} files under {root}",
                      f"{split}.jsonl, {split}-*.parquet ... under it (data.split), or the path of one file")
  return files


def _field(row: dict, field: str, types, where: str, what: str):
  value = row.get(field) if isinstance(row, dict) else None
  if not isinstance(value, types):
    raise ConfigError(PATH_KEY, f"{where} lacks the field {field!r}" if value is None else
                      f"{where}: {field!r} is a {type(value).__name__}", what)
  return value


def _distinct(passages) -> tuple[Passage, ...]:
  return tuple(dict.fromkeys(passages))


# ---- HotpotQA ----

_HOTPOT = "HotpotQA rows with question, answer, context, supporting_facts"


def _hotpotqa_rows(file: pathlib.Path, rows: list[dict]) -> list[QAExample]:
  out = []
  for number, row in enumerate(rows):
    where = f"{file} row {number}"
    question, answer = (_field(row, k, str, where, _HOTPOT) for k in ("question", "answer"))
    context = _field(row, "context", (list, dict), where, _HOTPOT)
    facts = _field(row, "supporting_facts", (list, dict), where, _HOTPOT)
    if isinstance(context, dict):  # the Hub's columns: {title: [...], sentences: [[...]]}
      pairs = list(zip(_field(context, "title", list, f"{where} context", _HOTPOT),
                       _field(context, "sentences", list, f"{where} context", _HOTPOT), strict=False))
    else:
      pairs = [tuple(pair) if isinstance(pair, list | tuple) else () for pair in context]
    bad = next((k for k, pair in enumerate(pairs) if len(pair) != 2 or not isinstance(pair[1], list)), None)
    if bad is not None:
      raise ConfigError(PATH_KEY, f"{where}: context[{bad}] is not a [title, sentences] pair", _HOTPOT)
    titles = set(_field(facts, "title", list, f"{where} supporting_facts", _HOTPOT) if isinstance(facts, dict)
                 else [fact[0] for fact in facts])
    paragraphs = [(title, Passage(title, "".join(sentences))) for title, sentences in pairs]
    gold = tuple(p for title, p in paragraphs if title in titles)
    if not gold:
      raise ConfigError(PATH_KEY, f"{where}: no paragraph of its context is named by its supporting_facts", _HOTPOT)
    out.append(QAExample(str(row.get("_id", row.get("id", number))), question, (answer,), gold,
                         tuple(p for title, p in paragraphs if title not in titles), str(row.get("type", ""))))
  return out


# ---- SQuAD v2 ----

_SQUAD = "SQuAD rows with id, title, context, question, answers; or the nested data[].paragraphs[].qas[]"


def _squad_rows(file: pathlib.Path, rows: list[dict]) -> list[QAExample]:
  if len(rows) == 1 and "data" in rows[0]:  # the original file: {"version": ..., "data": [...]}
    return _squad_nested(file, _field(rows[0], "data", list, str(file), _SQUAD))
  out = []
  for number, row in enumerate(rows):
    where = f"{file} row {number}"
    question, context = (_field(row, k, str, where, _SQUAD) for k in ("question", "context"))
    answers = _field(row, "answers", dict, where, _SQUAD)
    texts = tuple(_field(answers, "text", list, f"{where} answers", _SQUAD))
    out.append(QAExample(str(row.get("id", number)), question, texts,
                         (Passage(str(row.get("title", "")), context),),
                         kind="answerable" if texts else "unanswerable"))
  return out


def _squad_nested(file: pathlib.Path, articles: list) -> list[QAExample]:
  out = []
  for i, article in enumerate(articles):
    title = str(article.get("title", "")) if isinstance(article, dict) else ""
    for j, paragraph in enumerate(_field(article, "paragraphs", list, f"{file} data[{i}]", _SQUAD)):
      where = f"{file} data[{i}].paragraphs[{j}]"
      passage = Passage(title, _field(paragraph, "context", str, where, _SQUAD))
      for k, qa in enumerate(_field(paragraph, "qas", list, where, _SQUAD)):
        at = f"{where}.qas[{k}]"
        question = _field(qa, "question", str, at, _SQUAD)
        answers = _field(qa, "answers", list, at, _SQUAD)
        texts = tuple(_field(a, "text", str, f"{at}.answers", _SQUAD) for a in answers)
        if qa.get("is_impossible"):
          texts = ()
        out.append(QAExample(str(qa.get("id", f"{i}.{j}.{k}")), question, texts, (passage,),
                             kind="answerable" if texts else "unanswerable"))
  return out


# ---- MultiHop-RAG ----

_CORPUS = "MultiHop-RAG corpus articles with title, body"
_QUERIES = "MultiHop-RAG queries with query, answer, question_type, evidence_list"


def _multihop_rag(root: pathlib.Path) -> QASet:
  if not root.is_dir():
    raise ConfigError(PATH_KEY, f"{root} is not a directory" if root.exists() else f"{root} does not exist",
                      "the directory holding MultiHop-RAG's corpus.json and MultiHopRAG.json")
  files = {}
  for stem in MULTIHOP_RAG_FILES:
    found = sorted(p for p in root.rglob(f"{stem}.*") if p.suffix in SUFFIXES)
    if not found:
      raise ConfigError(PATH_KEY, f"no {stem}.json under {root}", "the MultiHop-RAG dataset directory")
    files[stem] = found[0]
  corpus_file, queries_file = files["corpus"], files["MultiHopRAG"]
  articles = []
  for number, row in enumerate(layouts.read_rows(corpus_file)):
    where = f"{corpus_file} row {number}"
    articles.append(Passage(_field(row, "title", str, where, _CORPUS), _field(row, "body", str, where, _CORPUS)))
  by_title = {a.title: a for a in articles}
  out, missing = [], 0
  for number, row in enumerate(layouts.read_rows(queries_file)):
    where = f"{queries_file} row {number}"
    query, answer = (_field(row, k, str, where, _QUERIES) for k in ("query", "answer"))
    titles = [_field(e, "title", str, f"{where} evidence_list", _QUERIES)
              for e in _field(row, "evidence_list", list, where, _QUERIES)]
    gold = _distinct(by_title[t] for t in titles if t in by_title)
    missing += sum(t not in by_title for t in titles)
    out.append(QAExample(str(number), query, (answer,), gold, kind=str(row.get("question_type", ""))))
  if missing:
    logging.warning("MultiHop-RAG: %d evidence titles of %s name no article of %s", missing, queries_file,
                    corpus_file)
  return QASet("multihop_rag", tuple(out), _distinct(articles))
