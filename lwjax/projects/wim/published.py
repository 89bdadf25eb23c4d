"""WiM on a published set (Writing in the Margins, arXiv 2408.14906, §4): a pretrained reader, read as it is (the
paper uses off-the-shelf instruct models, nothing finetuned), answers HotpotQA, SQuAD v2 or MultiHop-RAG questions
over long documents (gold passages among distractors, `lwjax.data.long_qa.documents`), or RULER's common-words
extraction, three ways on the serving engine with the paper's prompts (`paper_prompts`): WiM, full context,
retrieval-only (`reading`).

Document lengths: `eval.segments` x `data.segment_tokens` tokens of the reader's tokenizer (the paper's segments
are about 4k tokens). Scores: SQuAD's F1 (`score`) and exact match for the QA sets, RULER's string match for CWE,
± standard error over documents; compute per document; WiM's relevance calls against the segments holding a gold
passage. `<workdir>/metrics.json`, `accuracy_<set>.png`.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib

import jax
import numpy as np

from lwjax import plots
from lwjax.config import ConfigError, parse_ints
from lwjax.data.long_qa import documents, scoring, sets
from lwjax.models import pretrained
from lwjax.projects.wim import paper_prompts, reading
from lwjax.serving import tensor_parallel
from lwjax.serving.engine import Engine
from lwjax.serving.sampling import SamplingParams
from lwjax.training import sharding

SETS = (*sets.NAMES, "cwe")
CLASSIFY_TOKENS = 10  # the paper's max_new_tokens_classification


def validate(config, checkpoint_max_len: int) -> None:
  """What a published set needs beyond the schema: a pretrained reader, the files, room for the longest document."""
  name = config.data.set
  if not config.model.pretrained:
    raise ConfigError("model.pretrained", f"empty: {name} is read by a pretrained instruct model, as it is",
                      "a Hugging Face checkpoint directory with its tokenizer, e.g. /models/Meta-Llama-3-8B-Instruct")
  if config.base:
    raise ConfigError("base", f"a trained reader of the generated tasks; {name} is read by model.pretrained", "''")
  if name != "cwe":
    if not config.data.path:
      raise ConfigError("data.path", f"empty: {name} is read from its published files",
                        f"the file (or directory) holding them, e.g. /data/{name}")
    if not pathlib.Path(config.data.path).expanduser().exists():
      raise ConfigError("data.path", f"{config.data.path} does not exist", f"the published files of {name}")
  e = config.eval
  longest = max(parse_ints(e.segments)) * config.data.segment_tokens + e.margin_tokens + e.answer_tokens + 512
  if max(config.model.max_seq_len, checkpoint_max_len) < longest:
    raise ConfigError("model.max_seq_len", f"documents of up to {max(parse_ints(e.segments))} x "
                      f"{config.data.segment_tokens} tokens need about {longest} positions",
                      f">= {longest}, or shorter eval.segments / data.segment_tokens")


def long_documents(config, name: str, count_tokens, target_tokens: int, qa: sets.QASet | None):
  e = config.eval
  if name == "cwe":
    return documents.cwe_documents(e.num_docs, target_tokens=target_tokens, count_tokens=count_tokens, seed=e.seed)
  return documents.qa_documents(qa, e.num_docs, target_tokens=target_tokens, count_tokens=count_tokens, seed=e.seed)


def score(name: str, predicted: str, answers) -> dict[str, float]:
  """{"score", and for the QA sets "exact_match"}: F1 (QA) or RULER's string match (CWE)."""
  if name == "cwe":
    return {"score": scoring.string_match_all(predicted, answers)}
  s = scoring.squad(predicted, answers)
  return {"score": s["f1"], "exact_match": s["exact_match"]}


def read(config, engine: Engine, tok, chat: paper_prompts.ChatPrompts, name: str, docs) -> dict:
  """The three methods on `docs` (one set, one length)."""
  count = lambda text: len(tok.encode(text))  # noqa: E731
  cut = [documents.segments(d, segment_tokens=config.data.segment_tokens, count_tokens=count) for d in docs]
  readings = [reading.Reading(chat.head, [tok.encode(s) for s in texts], d.question, chat.direct(d.question))
              for d, (texts, _) in zip(docs, cut, strict=True)]
  out = reading.read_three(
      engine, readings, chat.wim_prompts(),
      margin_params=SamplingParams(temperature=0.0, max_tokens=config.eval.margin_tokens),
      classify_params=SamplingParams(temperature=0.0, max_tokens=CLASSIFY_TOKENS),
      answer_params=SamplingParams(temperature=0.0, max_tokens=config.eval.answer_tokens),
      pool_tokens=config.engine.num_pages * config.engine.page_size, margin_tokens=config.eval.margin_tokens)
  result = {}
  for method in reading.METHODS:
    texts = [tok.decode(a).strip() for a in out.answers[method]]
    scores = [score(name, t, d.answers) for t, d in zip(texts, docs, strict=True)]
    result[method] = reading.summary([s["score"] for s in scores], out.prefill[method], out.decode[method])
    if "exact_match" in scores[0]:
      result[method]["exact_match"] = float(np.mean([s["exact_match"] for s in scores]))
  kept = [(m.relevant, gold) for r, (_, golds) in zip(out.runs, cut, strict=True)
          for m, gold in zip(r.margins, golds, strict=True)]
  runs = out.runs
  result["wim"].update(
      segments=float(np.mean([len(texts) for texts, _ in cut])),
      relevance_accuracy=float(np.mean([rel == gold for rel, gold in kept])),
      gold_kept=float(np.mean([rel for rel, gold in kept if gold] or [0.0])),
      first_margin_seconds=float(np.mean([r.first_margin_seconds for r in runs])), seconds=out.wim_seconds,
      example={"query": docs[0].question, "margins": [tok.decode(m.tokens) for m in runs[0].margins],
               "answer": tok.decode(runs[0].answer or []), "expected": list(docs[0].answers)})
  return result


def run(config, workdir: str) -> dict:
  name = config.data.set
  qa = None if name == "cwe" else sets.load(name, config.data.path, config.data.split)  # bad files fail first
  if qa is not None and not any(e.answers for e in qa.examples):
    raise ConfigError("data.path", f"{config.data.path}: no answerable question in the {name} files",
                      "a split with answerable questions")
  if qa is not None:
    logging.info("%s: %d examples, %d passages in the distractor pool", name, len(qa.examples), len(qa.pool))
  # Tensor parallel over the first mesh.shape.tensor devices, as serve: the weights read straight onto the mesh.
  mesh, rules = tensor_parallel.tensor_mesh(config.mesh.shape), sharding.rules_from_config(config.mesh.rules)
  model, tok = pretrained.load_pretrained(config.model.pretrained, mesh=mesh, rules=rules,
                                          **{k: config.model[k] for k in pretrained.RUNTIME_FIELDS})
  e = config.engine
  engine = Engine(model, num_pages=e.num_pages, page_size=e.page_size, max_num_seqs=e.max_num_seqs,
                  max_batch_tokens=e.max_batch_tokens, prefill_chunk=e.prefill_chunk, eos_id=tok.eos_id,
                  stop_ids=getattr(tok, "eos_ids", ()),
                  max_model_len=max(config.model.max_seq_len, model.cfg.max_seq_len), mesh=mesh, rules=rules)
  chat = paper_prompts.ChatPrompts(tok)
  count = lambda text: len(tok.encode(text))  # noqa: E731
  lengths = parse_ints(config.eval.segments)
  metrics = {"set": name, "reader": config.model.pretrained, "segment_tokens": config.data.segment_tokens,
             "results": {name: {}}}
  for n in lengths:
    docs = long_documents(config, name, count, n * config.data.segment_tokens, qa)
    result = read(config, engine, tok, chat, name, docs)
    metrics["results"][name][str(n)] = result
    logging.info("%s, %d x %d tokens: WiM %.3f, full context %.3f, retrieval-only %.3f (%.1f segments, relevance "
                 "vs gold segments %.2f; prefill tokens %.0f / %.0f / %.0f)", name, n, config.data.segment_tokens,
                 result["wim"]["score"], result["full"]["score"], result["retrieval"]["score"],
                 result["wim"]["segments"], result["wim"]["relevance_accuracy"], result["wim"]["prefill_tokens"],
                 result["full"]["prefill_tokens"], result["retrieval"]["prefill_tokens"])
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    names = {"wim": "WiM (margins)", "full": "full context", "retrieval": "retrieval-only"}
    results = metrics["results"][name]
    series = {names[m]: [(n * config.data.segment_tokens, results[str(n)][m]["score"], results[str(n)][m]["se"])
                         for n in lengths] for m in reading.METHODS}
    plots.line_chart(os.path.join(workdir, f"accuracy_{name}.png"), series,
                     title=f"{name}: score vs document length ({os.path.basename(config.model.pretrained)})",
                     x_label="document length (tokens)", y_label="RULER string match" if name == "cwe" else "F1",
                     y_range=(0.0, 1.0), log_x=2, error_note="shaded: ±1 standard error over documents")
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump(metrics, f, indent=2)
  return metrics
