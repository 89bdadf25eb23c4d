"""Solvers of the GenRM algorithmic tasks (arXiv 2408.15240, §4: last-letter concatenation, word sorting): a
GPT trained from scratch on the task's training problems (question -> step-by-step solution), then greedy
accuracy, checked step by step, on held-out problems of the training lengths (test) and on longer lists
(hard). A from-scratch model does not extrapolate to longer lists (0% on 5-6 words after training on 2-4),
so `data.long_fraction` of the training problems (ours, 2% at the cpu scale) are at the hard lengths: the
hard split is then rare in training rather than unseen, and the solver sometimes solves it. The verifiers of
`lwjax.projects.genrm.job` start from its checkpoint (`base=<workdir>`).

With `model.pretrained` (a Hugging Face checkpoint directory or an lwjax workdir) the solver is that model
finetuned, reading and writing the problems through its own tokenizer (kept in the workdir, so the verifiers
and candidate sets of `base=<workdir>` use it too); any task, compact iGSM included, since the checkpoint
brings its language. Without it, a GPT of `model`'s shape trains from scratch on the task's words.

`<workdir>/metrics.json`: full-solution and final-answer accuracy per split.
"""

from __future__ import annotations

import functools
import json
import logging
import os

import jax
from flax import nnx

from lwjax import candidates as candidates_lib, reasoning_tasks
from lwjax.config import ConfigError, Field, positive_int, validate as validate_schema
from lwjax.data import algorithmic, rows as rows_lib
from lwjax.launch import distributed
from lwjax.models import pretrained
from lwjax.models.gpt import CONFIG_SCHEMA as MODEL_SCHEMA, GPT
from lwjax.projects.genrm import data as data_lib
from lwjax.projects.genrm.job import SCHEMA as GENRM_SCHEMA, get_task, parse_ints
from lwjax.serving import batch_sampler
from lwjax.training import lora as lora_lib, losses, mesh, optim, trainer as trainer_lib

TAKES_PRETRAINED = True

SCHEMA = {
    "job": Field(str), "seed": Field(int), "model": MODEL_SCHEMA, "task": GENRM_SCHEMA["task"],
    "data": {"seq_len": Field(int, min=8), "num_train": positive_int("distinct training problems (repeated)"),
             "long_fraction": Field(float, min=0.0, max=1.0,
                                    doc="share of training problems at the hard lengths (ours; the paper: 0)")},
    "eval": {"num": positive_int("problems per split"), "max_new_tokens": positive_int(),
             "batch_prompts": positive_int()},
    "train": trainer_lib.SCHEMA, "optim": optim.SCHEMA, "mesh": mesh.SCHEMA, "distributed": distributed.SCHEMA,
}


def validate(config) -> None:
  validate_schema(config, SCHEMA)
  cfg = pretrained.checked_model_config(config.model, pretrained.TRAINING_FIELDS)
  if lora_lib.from_section(config.train.get("lora")) and not config.model.pretrained:
    raise ConfigError("train.lora.rank", "LoRA adapts a pretrained model; model.pretrained is empty",
                      "0 (train all weights), or set model.pretrained")
  if config.model.pretrained:
    if config.task.name not in ("last_letter", "word_sort") and config.data.long_fraction:
      raise ConfigError("data.long_fraction", "the hard lengths are the algorithmic tasks'",
                        f"0 for {config.task.name}")
    reasoning_tasks.check_path(config.task.name, config.task.path)
    return
  if config.task.name == "igsm":
    raise ConfigError("task.name", "a from-scratch iGSM solver is experiments/igsm_solver.py's (a finetuned one: "
                      "model.pretrained)", "last_letter, word_sort")
  if config.task.name in reasoning_tasks.DATASET_NAMES:
    raise ConfigError("model.pretrained", f"empty: {config.task.name} is text a pretrained model reads through its "
                      "own tokenizer", "a Hugging Face checkpoint directory or an lwjax workdir")
  vocab = get_task(config).tokenizer.vocab_size
  if cfg.vocab_size < vocab:
    raise ConfigError("model.vocab_size", f"too small for the {config.task.name} tokenizer", f">= {vocab}")


def run(config, workdir: str) -> dict:
  cfg, tokenizer, init_params = pretrained.finetune_start(config.model, workdir)
  task = candidates_lib.task_for(get_task(config), tokenizer)  # a pretrained model's own tokenizer, if any
  tok, seq_len = task.tokenizer, config.data.seq_len
  records = task.records(config.data.num_train, seed=config.seed, split="train")
  num_long = int(round(config.data.long_fraction * config.data.num_train))
  if num_long:  # a few long lists, drawn apart from every split's problems (their own seed stream)
    long = algorithmic.TASKS[task.name].generate(num_long, seed=config.seed + 5_000_011,
                                                 num_words=parse_ints(config.task.hard_words))
    records = records[:len(records) - num_long] + long
  rows = [data_lib.solution_row(r, r["solution"], tok, seq_len, 1.0) for r in records]
  rows = [r for r in rows if r is not None]
  if not rows:
    raise ConfigError("data.seq_len", "no training problem fits", "a larger value")
  logging.info("%s solver: %d training problems, %d at the hard lengths (%d fit seq_len %d)", task.name,
               len(records), num_long, len(rows), seq_len)
  trainer = trainer_lib.Trainer(config, workdir, model_fn=lambda rngs: GPT(cfg, rngs=rngs), loss_fn=losses.lm_loss,
                                flops_per_token=cfg.flops_per_token(seq_len), seq_len=seq_len)
  train_iter = iter(rows_lib.shuffled_batches(rows, batch_size=config.train.global_batch_size, seed=config.seed))
  result = trainer.fit(train_iter, seed=config.seed,
                       init_params=None if init_params is None else functools.partial(init_params, trainer.mesh,
                                                                                      trainer.rules))
  pretrained.keep_tokenizer_with_merged(config.model, result)  # LoRA: the merged model, with its tokenizer
  if result["step"] < config.train.steps:
    logging.warning("stopped at step %d of %d: no evaluation; run again to resume", result["step"], config.train.steps)
    return {}
  model = nnx.merge(trainer.graphdef, trainer.restore_params())
  metrics = {"task": task.name, "steps": config.train.steps, "train_loss": result["train"].get("loss")}
  for split in ("test", "hard"):
    held_out = task.records(config.eval.num, seed=config.seed + 1, split=split)
    metrics[split] = candidates_lib.greedy_accuracy(model, task, held_out,
                                                    max_new_tokens=config.eval.max_new_tokens,
                                                    batch_prompts=config.eval.batch_prompts,
                                                    mesh=batch_sampler.job_mesh(config.mesh.shape))
    logging.info("%s: accuracy %.3f, answer accuracy %.3f (n=%d)", split, metrics[split]["accuracy"],
                 metrics[split]["answer_accuracy"], metrics[split]["n"])
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump(metrics, f, indent=2)
  return metrics
