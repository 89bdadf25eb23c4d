"""Pretrains the core GPT on packed text: generated corpus, local text files, or a TFDS data set; with
`model.pretrained` (a Hugging Face directory or an lwjax workdir), continues pretraining or finetunes that
model with its own tokenizer: all weights, in `model.param_dtype` (float32 master weights by default, whatever
the checkpoint's dtype), or with `train.lora.rank > 0` LoRA adapters over the frozen weights, the merged model
written to `<workdir>/merged` at the end (a workdir `model.pretrained` takes, with the tokenizer).

Reports eval loss next to the unigram cross-entropy of the same held-out tokens (the baseline any LM
must beat), both in nats per token, in the log and in `<workdir>/metrics.json`.
"""

from __future__ import annotations

import functools
import glob
import itertools
import json
import logging
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from lwjax.config import ConfigError, Field, non_negative_int, positive_int, validate as validate_schema
from lwjax.data import corpus, pipeline, tokenizer as tokenizer_lib
from lwjax.launch import distributed
from lwjax.models import pretrained
from lwjax.models.gpt import CONFIG_SCHEMA as MODEL_SCHEMA, GPT, GPTConfig
from lwjax.training import losses, mesh, optim, trainer as trainer_lib

TAKES_PRETRAINED = True
SOURCES = ("generated", "text_files", "tfds")
TOKENIZERS = ("bytes", "sentencepiece")
DATA_SCHEMA = {
    "source": Field(str, choices=SOURCES),
    "train_files": Field(str, doc="glob of text files, one document per line (source=text_files)"),
    "eval_files": Field(str, doc="glob of text files (source=text_files)"),
    "num_train_docs": positive_int("documents generated for training (source=generated)"),
    "num_eval_docs": positive_int("documents generated for evaluation (source=generated)"),
    "tfds_name": Field(str, doc="TFDS data set name, e.g. lm1b (source=tfds)"),
    "tfds_train_split": Field(str), "tfds_eval_split": Field(str),
    "text_key": Field(str, doc="feature holding the text (source=tfds)"),
    "tokenizer": Field(str, choices=TOKENIZERS),
    "tokenizer_path": Field(str, doc="sentencepiece model; empty = train one into the workdir"),
    "seq_len": Field(int, min=2),
    "shuffle_seed": Field(int),
    "num_shards": non_negative_int("fixed document shards, a multiple of the process count; 0 = the process "
                                   "count. Fixed, it gives the same global batches on any process count"),
}
SCHEMA = {
    "job": Field(str), "seed": Field(int),
    "model": MODEL_SCHEMA, "data": DATA_SCHEMA, "train": trainer_lib.SCHEMA, "optim": optim.SCHEMA,
    "mesh": mesh.SCHEMA, "distributed": distributed.SCHEMA,
}


def validate(config) -> None:
  """Schema plus the cross-field rules; raises ConfigError naming the key."""
  validate_schema(config, SCHEMA)
  model_cfg = _model_config(config)
  if config.train.get("lora") and config.train.lora.rank and not config.model.pretrained:
    raise ConfigError("train.lora.rank", "LoRA adapts a pretrained model; model.pretrained is empty",
                      "0 (train all weights), or set model.pretrained")
  if config.model.pretrained and not pretrained.tokenizer_file(config.model.pretrained):
    raise ConfigError("model.pretrained", f"{config.model.pretrained} holds no tokenizer file",
                      "a workdir of a run that wrote its tokenizer (sentencepiece), or a Hugging Face directory")
  if config.data.seq_len > model_cfg.max_seq_len:
    source = "the checkpoint's max_seq_len" if config.model.pretrained else "model.max_seq_len"
    raise ConfigError("data.seq_len", f"{config.data.seq_len} exceeds {source}", f"<= {model_cfg.max_seq_len}")
  if not config.model.pretrained and config.data.tokenizer == "bytes" and (
      config.model.vocab_size < tokenizer_lib.ByteTokenizer.vocab_size):
    raise ConfigError("model.vocab_size", "too small for the byte tokenizer",
                      f">= {tokenizer_lib.ByteTokenizer.vocab_size}")
  if config.train.global_batch_size % config.train.grad_accum_steps:
    raise ConfigError("train.grad_accum_steps", "must divide train.global_batch_size",
                      f"a divisor of {config.train.global_batch_size}")
  if config.data.num_shards and config.train.global_batch_size % config.data.num_shards:
    raise ConfigError("data.num_shards", "must divide train.global_batch_size",
                      f"0 or a divisor of {config.train.global_batch_size}")
  if config.data.source == "text_files" and not glob.glob(config.data.train_files):
    raise ConfigError("data.train_files", f"no file matches {config.data.train_files!r}", "a glob of text files")


def _model_config(config) -> GPTConfig:
  """The model's config: `config.model`, or the pretrained checkpoint's shape; a ConfigError naming the key."""
  return pretrained.checked_model_config(config.model, pretrained.TRAINING_FIELDS)


def _sources(config, workdir):
  """(train documents, eval documents) as Grain-readable sources."""
  data = config.data
  if data.source == "generated":
    directory = os.path.join(workdir, "corpus")
    if jax.process_index() == 0:
      corpus.write_corpus(directory, num_train_docs=data.num_train_docs, num_eval_docs=data.num_eval_docs,
                          seed=config.seed)
    multihost_utils.sync_global_devices("corpus written")
    return (pipeline.TextLineSource(os.path.join(directory, "train.txt")),
            pipeline.TextLineSource(os.path.join(directory, "eval.txt")))
  if data.source == "text_files":
    return pipeline.TextLineSource(data.train_files), pipeline.TextLineSource(data.eval_files)
  return (pipeline.tfds_text(data.tfds_name, split=data.tfds_train_split, text_key=data.text_key),
          pipeline.tfds_text(data.tfds_name, split=data.tfds_eval_split, text_key=data.text_key))


def _tokenizer(config, workdir, train_docs):
  data = config.data
  if config.model.pretrained:
    tok = pretrained.load_tokenizer(config.model.pretrained, required=True)
    if tok.vocab_size > config.model.vocab_size:
      raise ConfigError("model.pretrained", f"its tokenizer has {tok.vocab_size} ids, its model "
                        f"{config.model.vocab_size}", "a checkpoint whose tokenizer fits its embedding")
    return tok
  if data.tokenizer == "bytes":
    return tokenizer_lib.ByteTokenizer()
  def texts():
    return (train_docs[i] for i in range(min(len(train_docs), 20000)))
  if jax.process_index() == 0:
    tok = tokenizer_lib.get_or_train(workdir, data.tokenizer_path or None, texts, config.model.vocab_size)
  multihost_utils.sync_global_devices("tokenizer ready")
  if jax.process_index() != 0:
    tok = tokenizer_lib.get_or_train(workdir, data.tokenizer_path or None, texts, config.model.vocab_size)
  if tok.vocab_size > config.model.vocab_size:
    raise ConfigError("model.vocab_size", f"smaller than the tokenizer's {tok.vocab_size}",
                      f">= {tok.vocab_size}")
  return tok


def run(config, workdir: str) -> dict:
  """Trains, evaluates, and writes `<workdir>/metrics.json`; returns the metrics."""
  # The checkpoint's shape (written into config.model, so the run's saved config names it), its tokenizer copied
  # into the workdir, and a loader of its weights onto the trainer's mesh; without model.pretrained, config.model.
  model_cfg, _, init_params = pretrained.finetune_start(config.model, workdir)
  train_docs, eval_docs = _sources(config, workdir)
  tok = _tokenizer(config, workdir, train_docs)
  data, batch = config.data, config.train.global_batch_size
  num_shards = data.num_shards or None
  train_ds = pipeline.make_lm_dataset(train_docs, tok, seq_len=data.seq_len, global_batch_size=batch,
                                      shuffle_seed=data.shuffle_seed, num_shards=num_shards)

  def eval_batches():
    ds = pipeline.make_lm_dataset(eval_docs, tok, seq_len=data.seq_len, global_batch_size=batch,
                                  shuffle_seed=None, num_epochs=1, num_shards=num_shards)
    return pipeline.take_padded(iter(ds), config.train.eval_steps)

  trainer = trainer_lib.Trainer(config, workdir, model_fn=lambda rngs: GPT(model_cfg, rngs=rngs),
                                loss_fn=losses.lm_loss, flops_per_token=model_cfg.flops_per_token(data.seq_len),
                                seq_len=data.seq_len)
  result = trainer.fit(iter(train_ds), eval_batches, seed=config.seed,
                       init_params=None if init_params is None else functools.partial(init_params, trainer.mesh,
                                                                                      trainer.rules))
  pretrained.keep_tokenizer_with_merged(config.model, result)  # LoRA: the merged model, with its tokenizer

  # The baseline: unigram cross-entropy of the very eval targets the model was scored on, with counts
  # summed over all processes.
  counts = np.stack([pipeline.token_counts(itertools.islice(iter(train_ds), 50), model_cfg.vocab_size),
                     pipeline.token_counts(eval_batches(), model_cfg.vocab_size)])
  if jax.process_count() > 1:
    counts = multihost_utils.process_allgather(counts).sum(0)
  unigram = pipeline.unigram_cross_entropy(counts[0], counts[1])
  metrics = {"step": result["step"], "train_loss": result["train"].get("loss"),
             "eval_loss": result["eval"].get("loss"), "eval_accuracy": result["eval"].get("accuracy"),
             "unigram_cross_entropy": unigram, "tokens_per_s": result["train"].get("tokens_per_s")}
  logging.info("eval loss %.4f nats/token vs unigram cross-entropy %.4f nats/token (held-out text)",
               metrics["eval_loss"] or float("nan"), unigram)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump(metrics, f, indent=2)
  return metrics
