"""The WiM job (Writing in the Margins, arXiv 2408.14906, §3-4): train a small reader on the generated long-context
tasks (from scratch on their words, or finetuned from `model.pretrained` through its own tokenizer; or reuse a
trained one, `base`), then read held-out documents of every task and length three ways on the serving engine,
same model, same documents:

- WiM (`lwjax.serving.wim`): segment by segment with margins, relevance requests, the answer from the context
  and the kept margins;
- full context: the whole document in one prefill, then the answer;
- retrieval-only: the segments whose margins WiM's classifier kept, without margins, then the answer.

Scores: exact match (retrieval, multi-hop) or F1 (aggregation), ± standard error over documents; compute per
document (tokens prefilled and decoded); WiM's time to its first margin; how often WiM's margins equal the
exact ones and its relevance calls are right. `<workdir>/metrics.json`, `accuracy_<task>.png`.

With `data.set` a published set (HotpotQA, SQuAD v2, MultiHop-RAG, or RULER's CWE) nothing is trained: the
pretrained reader reads it as it is with the paper's prompts (`published`).
"""

from __future__ import annotations

import functools
import json
import logging
import os

import jax
import numpy as np
from flax import nnx

from lwjax import plots
from lwjax.config import ConfigError, Field, int_list, parse_ints, positive_int, validate as validate_schema
from lwjax.data import tokenizer as tokenizer_lib
from lwjax.data.tokenizer import bos_prefix
from lwjax.launch import distributed
from lwjax.models import pretrained
from lwjax.models.gpt import CONFIG_SCHEMA as MODEL_SCHEMA, GPT, GPTConfig
from lwjax.projects.wim import data as data_lib, prompts, published, reading, tasks
from lwjax.serving import tensor_parallel
from lwjax.serving.engine import Engine
from lwjax.serving.sampling import SamplingParams
from lwjax.training import checkpoint, lora as lora_lib, losses, mesh, optim, sharding, trainer as trainer_lib

METHODS = reading.METHODS
DATA_SETS = ("generated", *published.SETS)


def _task_list(value: str) -> str | None:
  bad = [t for t in value.split(",") if t not in tasks.TASKS]
  return f"unknown tasks {bad} (valid: {', '.join(tasks.TASKS)})" if bad or not value else None


SCHEMA = {
    "job": Field(str), "seed": Field(int),
    "base": Field(str, doc="a trained reader's workdir (a wim run's); empty: train one"),
    "model": MODEL_SCHEMA,
    "task": {"names": Field(str, check=_task_list), "segment_words": positive_int("words per segment"),
             "train_segments": int_list("document lengths in training, in segments")},
    "data": {"set": Field(str, choices=DATA_SETS, doc="the generated tasks (trains a reader), or a published set "
                          "read by model.pretrained as it is"),
             "path": Field(str, doc="the published set's file or directory (not for generated, cwe)"),
             "split": Field(str, doc="the split's files in a data.path directory (`<split>-*.parquet`, ...)"),
             "segment_tokens": positive_int("tokens per segment of a published set's documents (paper: ~4k)"),
             "seq_len": Field(int, min=8), "num_docs": positive_int("training documents per task"),
             "copy_fraction": Field(float, min=0.0, max=0.9, doc="share of training rows that are copy rows")},
    "eval": {"segments": int_list("document lengths evaluated, in segments"),
             "num_docs": positive_int("documents per task and length"), "margin_tokens": positive_int(),
             "answer_tokens": positive_int(), "seed": Field(int)},
    "engine": {"num_pages": positive_int(), "page_size": positive_int(), "max_num_seqs": positive_int(),
               "max_batch_tokens": positive_int(), "prefill_chunk": positive_int()},
    "train": trainer_lib.SCHEMA, "optim": optim.SCHEMA, "mesh": mesh.SCHEMA, "distributed": distributed.SCHEMA,
}


TAKES_PRETRAINED = True


def validate(config) -> None:
  validate_schema(config, SCHEMA)
  cfg = pretrained.checked_model_config(config.model, pretrained.TRAINING_FIELDS)
  if config.data.set != "generated":
    published.validate(config, cfg.max_seq_len)
    return
  if lora_lib.from_section(config.train.get("lora")) and not config.model.pretrained:
    raise ConfigError("train.lora.rank", "LoRA adapts a pretrained model; model.pretrained is empty",
                      "0 (train all weights), or set model.pretrained")
  if config.model.pretrained and config.base:
    raise ConfigError("base", "a trained reader, and model.pretrained one to train: give one of them", "''")
  if not config.model.pretrained:
    tok = tasks.WiMTokenizer()
    if cfg.vocab_size < tok.vocab_size:
      raise ConfigError("model.vocab_size", "too small for the WiM vocabulary", f">= {tok.vocab_size}")
    # The answer request: the whole document, every margin kept at its longest, the prompts, the answer (in the
    # task's words, one id each; a pretrained reader's tokenizer takes more, which the engine checks per request).
    e = config.eval
    longest = max(parse_ints(e.segments)) * (config.task.segment_words + e.margin_tokens + 1) + e.answer_tokens + 16
    if cfg.max_seq_len < longest:
      raise ConfigError("model.max_seq_len", f"the longest evaluated document needs about {longest} positions",
                        f">= {longest}, or shorter eval.segments")
  if config.base and not os.path.isdir(os.path.join(config.base, "checkpoints")):
    raise ConfigError("base", f"{config.base!r} holds no checkpoints", "a finished wim run's workdir, or ''")


def reader_tokenizer(tokenizer):
  """The reader's tokenizer: its own (a pretrained one's, decoding exactly the text it encodes), else the task's."""
  return tasks.WiMTokenizer() if tokenizer is None else tokenizer_lib.exact_text(tokenizer)


def train_reader(config, workdir: str):
  """(the reader trained on every prompt of the pattern, its tokenizer); the reader is None when stopped early
  (run again to resume)."""
  cfg, tokenizer, init_params = pretrained.finetune_start(config.model, workdir)
  tok = reader_tokenizer(tokenizer)
  records = data_lib.documents(config.data.num_docs, seed=config.seed, task_names=config.task.names.split(","),
                               num_segments=parse_ints(config.task.train_segments),
                               segment_words=config.task.segment_words)
  logging.info("reader: %d training documents, %d rows", len(records),
               sum(len(data_lib.row_specs(r)) for r in records))
  trainer = trainer_lib.Trainer(config, workdir, model_fn=lambda rngs: GPT(cfg, rngs=rngs), loss_fn=losses.lm_loss,
                                flops_per_token=cfg.flops_per_token(config.data.seq_len), seq_len=config.data.seq_len)
  train_iter = iter(data_lib.batches(records, tok, seq_len=config.data.seq_len,
                                     batch_size=config.train.global_batch_size, seed=config.seed,
                                     copy_fraction=config.data.copy_fraction))
  result = trainer.fit(train_iter, seed=config.seed,
                       init_params=None if init_params is None else functools.partial(init_params, trainer.mesh,
                                                                                      trainer.rules))
  pretrained.keep_tokenizer_with_merged(config.model, result)  # LoRA: the merged model, with its tokenizer
  if result["step"] < config.train.steps:
    return None, tok
  return nnx.merge(trainer.graphdef, trainer.restore_params()), tok


def _engine(config, model: GPT, tok) -> Engine:
  """The engine reads up to `model.max_seq_len` positions of the config, which may exceed the reader's own (a
  trained `base` read on documents longer than its training: RoPE positions have no table to outgrow). It runs
  tensor parallel over the first `mesh.shape.tensor` devices under `mesh.rules`, as `serve` does
  (`tensor_parallel.tensor_mesh`; training's data and fsdp split no engine)."""
  e = config.engine
  return Engine(model, num_pages=e.num_pages, page_size=e.page_size, max_num_seqs=e.max_num_seqs,
                max_batch_tokens=e.max_batch_tokens, prefill_chunk=e.prefill_chunk, eos_id=tok.eos_id,
                max_model_len=max(config.model.max_seq_len, model.cfg.max_seq_len),
                mesh=tensor_parallel.tensor_mesh(config.mesh.shape),
                rules=sharding.rules_from_config(config.mesh.rules))


def _strip(tokens, eos):
  return list(tokens[:-1]) if tokens and tokens[-1] == eos else list(tokens)


def read(config, model: GPT, docs: list[tasks.Record], engine: Engine | None = None, tok=None) -> dict:
  """The three methods on `docs` (one task, one length): per method the scores and the compute per document
  (`tok`: the reader's tokenizer, default the task's)."""
  tok = tok or tasks.WiMTokenizer()
  greedy = SamplingParams(temperature=0.0, max_tokens=config.eval.answer_tokens)
  engine = engine or _engine(config, model, tok)
  readings = [reading.Reading(bos_prefix(tok), [tok.encode(s) for s in d.segments], d.query,
                              prompts.answer_direct(tok, d.query)) for d in docs]
  out = reading.read_three(engine, readings, prompts.wim_prompts(tok),
                           margin_params=SamplingParams(temperature=0.0, max_tokens=config.eval.margin_tokens),
                           classify_params=SamplingParams(temperature=0.0, max_tokens=2), answer_params=greedy,
                           pool_tokens=config.engine.num_pages * config.engine.page_size,
                           margin_tokens=config.eval.margin_tokens)
  texts = {"wim": [tok.decode(a) for a in out.answers["wim"]]}
  texts.update({m: [tok.decode(_strip(a, tok.eos_id)) for a in out.answers[m]] for m in ("full", "retrieval")})
  result = {m: reading.summary([tasks.score(d.task, t, d.answer) for d, t in zip(docs, texts[m], strict=True)],
                               out.prefill[m], out.decode[m]) for m in METHODS}
  runs = out.runs
  margins = [(tok.decode(m.tokens), m.relevant, want, relevant) for d, r in zip(docs, runs, strict=True)
             for m, want, relevant in zip(r.margins, d.margins, d.relevant, strict=True)]
  result["wim"].update(
      margin_exact=float(np.mean([got == want for got, _, want, _ in margins])),
      relevance_accuracy=float(np.mean([rel == want for _, rel, _, want in margins])),
      first_margin_seconds=float(np.mean([r.first_margin_seconds for r in runs])), seconds=out.wim_seconds,
      example={"query": docs[0].query, "margins": [tok.decode(m.tokens) for m in runs[0].margins],
               "answer": texts["wim"][0], "expected": " ".join(docs[0].answer)})
  return result


def _plot(workdir: str, task: str, lengths, results: dict, train_segments: str) -> None:
  names = {"wim": "WiM (margins)", "full": "full context", "retrieval": "retrieval-only"}
  series = {names[m]: [(n, results[str(n)][m]["score"], results[str(n)][m].get("se", 0.0)) for n in lengths]
            for m in METHODS}
  trained = parse_ints(train_segments)
  plots.line_chart(os.path.join(workdir, f"accuracy_{task}.png"), series,
                   title=f"{task}: score vs document length (reader trained on {min(trained)}-{max(trained)} "
                         "segments)", x_label="document length (segments)", y_label="exact match / F1",
                   y_range=(0.0, 1.0), log_x=2, error_note="shaded: ±1 standard error over documents")


def reader_train_segments(config, base_config: dict | None) -> str:
  """The document lengths the reader was trained on: its own run's (`base_config`, the config saved with a
  `base` checkpoint) when it comes from one, not this config's."""
  if base_config is not None:
    return str(base_config.get("task", {}).get("train_segments", config.task.train_segments))
  return config.task.train_segments


def run(config, workdir: str) -> dict:
  if config.data.set != "generated":
    return published.run(config, workdir)
  base_config = None
  if config.base:
    reader = pretrained.run_model_dir(config.base)  # a finished LoRA run: its merged model
    model, base_config, step = checkpoint.load_model(
        os.path.join(reader, "checkpoints"), lambda saved: GPT(GPTConfig.from_dict(saved["model"]), rngs=nnx.Rngs(0)))
    tok = reader_tokenizer(pretrained.load_tokenizer(reader))  # a reader finetuned from a checkpoint keeps it
    logging.info("reader: %s (step %d)", config.base, step)
  else:
    model, tok = train_reader(config, workdir)
    if model is None:
      logging.warning("stopped before the end of training; run again to resume")
      return {}
  lengths = parse_ints(config.eval.segments)
  # One engine for every task and length: its compiled programs are reused, not compiled again per length.
  engine = _engine(config, model, tok)
  metrics = {"base": config.base or workdir, "segment_words": config.task.segment_words,
             "train_segments": reader_train_segments(config, base_config), "results": {}}
  for task in config.task.names.split(","):
    metrics["results"][task] = {}
    for n in lengths:
      docs = tasks.generate(task, config.eval.num_docs, seed=config.eval.seed + 7919 * n, num_segments=n,
                            segment_words=config.task.segment_words)
      result = read(config, model, docs, engine, tok)
      metrics["results"][task][str(n)] = result
      logging.info("%s, %d segments: WiM %.3f, full context %.3f, retrieval-only %.3f (margins exact %.2f, "
                   "relevance %.2f; prefill tokens %.0f / %.0f / %.0f; %d programs compiled so far)", task, n,
                   result["wim"]["score"], result["full"]["score"], result["retrieval"]["score"],
                   result["wim"]["margin_exact"], result["wim"]["relevance_accuracy"], result["wim"]["prefill_tokens"],
                   result["full"]["prefill_tokens"], result["retrieval"]["prefill_tokens"],
                   engine.num_compiled_programs)
  metrics["short_context"] = {t: metrics["results"][t][str(lengths[0])]["full"]["score"] for t in metrics["results"]}
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    for task, results in metrics["results"].items():
      _plot(workdir, task, lengths, results, metrics["train_segments"])
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump(metrics, f, indent=2)
  return metrics
