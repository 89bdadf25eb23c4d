"""LRP4RAG (arXiv 2408.15533): hallucination detection in RAG from AttnLRP relevance, on the synthetic RAG task of
`lwjax.projects.lrp4rag.task` with exact labels.

1. The generator: a GPT trained here on the task with the core Trainer (resumable), or a trained run reused
   (`base=<workdir>`), or, as the paper, a pretrained model read as it is (`model.pretrained`: a Hugging Face
   checkpoint directory with its tokenizer, of a family AttnLRP implements, or an lwjax workdir with one).
2. Held-out prompts: greedy answers (batch sampler), each labelled faithful / hallucinated by the generator's
   ground truth; K samples at temperature 1 for self-consistency. Logged first: the generator's competence
   (answers the passage's value where a passage states it), per prompt kind, and the class balance.
3. Signals (`signals`): AttnLRP answer x prompt relevance matrices, attention, gradient x input, uncertainty.
4. Detectors (`detectors`): SVM, random forest, MLP, LSTM on the resampled relevance vectors and on each
   baseline's features, stratified k-fold CV on shared folds.

`<workdir>/metrics.json`: competence, class balance, AttnLRP's conservation measured on the generator
(`conservation`), per-detector accuracy / precision / recall / F1 (hallucinated = positive) as mean and std over
folds, accuracy per prompt kind; `relevance_faithful.png` and `relevance_hallucinated.png`: one relevance matrix
of each class, prompt tokens labelled.

With `data.set=ragtruth` the same signals and detectors run on RAGTruth's published responses, explained by the
pretrained model (`published`). At the paper's scale the TPU step is the signals' (`aot_inference`, compiled by
`python -m lwjax.launch.compile`); the detectors train on the host.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from lwjax import plots
from lwjax.config import ConfigError, DefaultedGroup, Field, positive_int, validate as validate_schema
from lwjax.data import rows as rows_lib, tokenizer as tokenizer_lib
from lwjax.launch import distributed
from lwjax.models import pretrained
from lwjax.models.gpt import CONFIG_SCHEMA as MODEL_SCHEMA, GPT, GPTConfig
from lwjax.projects.lrp4rag import classifiers, detectors, published, signals
from lwjax.projects.lrp4rag.task import SCHEMA as TASK_SCHEMA, RagTask, TaskConfig, check as check_task
from lwjax.relevance import attnlrp
from lwjax.serving import batch_sampler
from lwjax.training import checkpoint, losses, mesh, optim, sharding, trainer as trainer_lib

EVAL_SEED = 1_000_003  # held-out prompts: their own stream, apart from the training prompts
SAMPLE_SEED = 2_000_003
WORLD_KEYS = ("entities", "attributes", "values", "unknown_fraction", "popular_fraction", "world_seed")
TRAINING_GROUPS = ("model", "data", "train", "optim")
TAKES_PRETRAINED = True
ATTNLRP_MODELS = "a model of Llama's options (Llama 2/3, or Mistral without a sliding window)"

SCHEMA = {
    "job": Field(str), "seed": Field(int),
    "base": Field(str, doc="workdir of a trained lrp4rag run to reuse; '' trains in the workdir"),
    "model_preset": Field(str, has_default=True, doc="compile only: the generator's shape by name (e.g. llama2_7b) "
                          "when model.pretrained is not on this machine; then neither it nor RAGTruth is read"),
    "task": TASK_SCHEMA,
    "model": DefaultedGroup(MODEL_SCHEMA),
    # The generated task's training rows (seq_len, num_train), or RAGTruth's files and selection (set=ragtruth).
    "data": DefaultedGroup({
        "set": Field(str, choices=published.SETS, has_default=True, doc="generated (default) or ragtruth"),
        "seq_len": Field(int, min=8, has_default=True),
        "num_train": Field(int, min=1, has_default=True, doc="training prompts (repeated)"),
        "path": Field(str, has_default=True, doc="RAGTruth's directory (source_info.jsonl, response.jsonl)"),
        "splits": Field(str, has_default=True, doc="RAGTruth splits, comma-separated: train,test"),
        "task_types": Field(str, has_default=True, doc="RAGTruth task types, comma-separated: QA,Data2txt,Summary"),
        "models": Field(str, has_default=True, doc="RAGTruth models whose responses are read, comma-separated; "
                        "empty: all")}),
    "train": DefaultedGroup(trainer_lib.SCHEMA), "optim": DefaultedGroup(optim.SCHEMA),
    "eval": {"num": positive_int("held-out prompts"), "batch_prompts": positive_int(),
             "max_new_tokens": positive_int(), "samples": positive_int("K answers at temperature 1"),
             "temperature": Field(float, min=0.0, doc="of the self-consistency samples"),
             "signal_batch": positive_int("answers per relevance batch"),
             "relevance_chunk": Field(int, min=0, doc="answer tokens per LRP backward batch; 0 = all at once"),
             "compile_length": Field(int, min=0, has_default=True, doc="compile only: the padded total length of "
                                     "the compiled batch; 0 = the bucket of the model's max_seq_len"),
             "compile_answer_rows": Field(int, min=0, has_default=True, doc="compile only: its answer bucket; 0 = "
                                          "that of eval.max_new_tokens (generated answers)")},
    "detect": classifiers.SCHEMA,
    "mesh": mesh.SCHEMA, "distributed": distributed.SCHEMA,
}


def validate(config) -> None:
  validate_schema(config, SCHEMA)
  task_cfg = TaskConfig.from_dict(config.task)
  if (fault := check_task(task_cfg)) is not None:
    raise ConfigError(*fault)
  if config.detect.folds > config.eval.num:
    raise ConfigError("detect.folds", f"more folds than held-out prompts ({config.eval.num})",
                      f"<= eval.num ({config.eval.num})")
  if "model" not in config:
    raise ConfigError("model", "missing", "a group: a GPT's shape to train, or model.pretrained, e.g. "
                      "experiments/lrp4rag.py:scale=paper,pretrained=/models/Llama-2-7b-chat-hf")
  e = config.eval
  if e.get("compile_length") and e.get("compile_answer_rows", 0) >= e.compile_length:
    raise ConfigError("eval.compile_answer_rows", f"{e.compile_answer_rows} leaves no prompt token in "
                      f"eval.compile_length={e.compile_length}", f"< {e.compile_length}")
  if config.get("model_preset"):
    compile_shape(config)
  if published.data_set(config) == "ragtruth":
    published.validate(config, on_disk=not config.get("model_preset"))
    _validate_pretrained(config)
  elif config.model.pretrained:
    _validate_pretrained(config)
  else:
    _validate_gpt(config, task_cfg)


def _validate_pretrained(config) -> None:
  """A pretrained generator is read as it is: its checkpoint and tokenizer load, AttnLRP takes its options (with
  `model_preset`, checked on the named shape, nothing read)."""
  if not config.get("model_preset"):
    cfg = pretrained.checked_model_config(config.model)
    if not pretrained.tokenizer_file(config.model.pretrained):
      raise ConfigError("model.pretrained", f"{config.model.pretrained} holds no tokenizer file",
                        "a checkpoint with its tokenizer (an lrp4rag run's own workdir is `base`)")
    if (reason := attnlrp.unsupported(cfg)) is not None:
      raise ConfigError("model.pretrained", f"AttnLRP does not implement {reason}", ATTNLRP_MODELS)
  if config.base:
    raise ConfigError("base", "cannot be combined with model.pretrained", "''")
  for group in TRAINING_GROUPS[1:]:
    if group in config and not (group == "data" and published.data_set(config) == "ragtruth"):
      raise ConfigError(group, "unused with model.pretrained (the generator is read as it is, not trained)",
                        "absent: experiments/lrp4rag.py's pretrained= argument leaves it out")


def _validate_gpt(config, task_cfg: TaskConfig) -> None:
  missing = [group for group in TRAINING_GROUPS if group not in config]
  if missing:
    raise ConfigError("model.pretrained", f"empty, and no {'/'.join(missing)} group to train a generator with",
                      "a pretrained generator, e.g. experiments/lrp4rag.py:scale=paper,data=generated,"
                      "pretrained=/models/Llama-2-7b-chat-hf, or a scale that trains one")
  for key in ("seq_len", "num_train"):
    if key not in config.data:
      raise ConfigError(f"data.{key}", "missing: the generator is trained on the generated task", "an int")
  if task_cfg.template != "symbolic":
    raise ConfigError("task.template", "the text template needs a pretrained model's tokenizer (model.pretrained)",
                      "'symbolic'")
  try:
    cfg = GPTConfig.from_dict(config.model)
  except ValueError as e:
    raise ConfigError("model", str(e), "n_kv_heads dividing n_heads, even head_dim") from None
  task = RagTask(task_cfg)
  if cfg.vocab_size < task.tokenizer.vocab_size:
    raise ConfigError("model.vocab_size", "too small for the task's words", f">= {task.tokenizer.vocab_size}")
  longest = task.max_prompt_tokens()
  if config.data.seq_len < longest + 1:
    raise ConfigError("data.seq_len", f"the longest prompt ({longest} tokens) and its answer do not fit",
                      f">= {longest + 1}")
  needed = max(batch_sampler.bucket(longest) + config.eval.max_new_tokens, config.data.seq_len)
  if cfg.max_seq_len < needed:
    raise ConfigError("model.max_seq_len", "too short for the padded prompts plus eval.max_new_tokens",
                      f">= {needed}")
  if config.base and not os.path.isdir(os.path.join(config.base, "checkpoints")):
    raise ConfigError("base", f"no checkpoints/ under {config.base!r}", "the workdir of a finished lrp4rag run")


def _train(config, workdir: str, task: RagTask) -> GPT | None:
  """The GPT trained on the task's training mix in `workdir` (resumes); None when stopped early."""
  cfg, seq_len = GPTConfig.from_dict(config.model), config.data.seq_len
  prompts = task.prompts(config.data.num_train, mix=task.cfg.train_mix, seed=config.seed)
  rows = [row for p in prompts if (row := task.training_row(p, seq_len)) is not None]
  counts = collections.Counter(p.kind for p in prompts)
  logging.info("training prompts: %d (%s); %d known entities (%d popular), %d facts to store", len(rows),
               ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), int(task.known.sum()),
               int(task.popular.sum()), int(task.known.sum()) * task.cfg.attributes)
  trainer = trainer_lib.Trainer(config, workdir, model_fn=lambda rngs: GPT(cfg, rngs=rngs), loss_fn=losses.lm_loss,
                                flops_per_token=cfg.flops_per_token(seq_len), seq_len=seq_len)
  dataset = rows_lib.shuffled_batches(rows, batch_size=config.train.global_batch_size, seed=config.seed)
  result = trainer.fit(iter(dataset), seed=config.seed)
  if result["step"] < config.train.steps:
    logging.warning("stopped at step %d of %d: no evaluation; run again to resume", result["step"], config.train.steps)
    return None
  return nnx.merge(trainer.graphdef, trainer.restore_params())


def load_generator(config, workdir: str, task_cfg: TaskConfig):
  """(model, task, {"source": ...}): the HF checkpoint, the reused base run, or a GPT trained here."""
  if config.model.pretrained:
    model, tokenizer = pretrained.load_pretrained(config.model.pretrained,
                                                  **{k: config.model[k] for k in pretrained.RUNTIME_FIELDS})
    return model, RagTask(task_cfg, tokenizer), {"source": "pretrained", "checkpoint": config.model.pretrained}
  task = RagTask(task_cfg)
  if not config.base:
    return _train(config, workdir, task), task, {"source": "trained", "steps": config.train.steps}
  model, base_config, step = checkpoint.load_model(
      os.path.join(config.base, "checkpoints"), lambda c: GPT(GPTConfig.from_dict(c["model"]), rngs=nnx.Rngs(0)))
  if base_config.get("job") != "lrp4rag":
    raise ConfigError("base", f"{config.base!r} is a {base_config.get('job')!r} run", "an lrp4rag run's workdir")
  differ = [k for k in WORLD_KEYS if base_config["task"][k] != task_cfg.to_dict()[k]]
  if differ:
    raise ConfigError("base", f"{config.base!r} was trained on another world (task.{', task.'.join(differ)} "
                      "differ)", "a run with the same task world")
  logging.info("generator: %s at step %d", config.base, step)
  return model, task, {"source": "base", "base": config.base, "step": step}


def generate(model, tokenizer, prompts: list[list[int]], *, n: int, temperature: float, seed: int, config,
             desc: str) -> list[list[str]]:
  """`n` answers per prompt (texts cut at eos), with the batch sampler."""
  e = config.eval
  prompt_len = batch_sampler.bucket(max(len(p) for p in prompts))
  if prompt_len + e.max_new_tokens > model.cfg.max_seq_len:
    raise ConfigError("eval.max_new_tokens", f"{prompt_len} prompt tokens + {e.max_new_tokens} exceed the model's "
                      f"max_seq_len {model.cfg.max_seq_len}", f"<= {model.cfg.max_seq_len - prompt_len}")
  graphdef, params = nnx.split(model)
  sample_n = batch_sampler.make_sampler(graphdef, prompt_len=prompt_len, max_new_tokens=e.max_new_tokens, n=n,
                                        eos_id=tokenizer.eos_id)
  with tqdm(total=len(prompts), desc=desc, unit="prompt") as progress:
    out = batch_sampler.sample_texts(sample_n, params, tokenizer, prompts, n=n, prompt_len=prompt_len,
                                     batch_prompts=min(e.batch_prompts, len(prompts)), seed=seed,
                                     temperature=temperature, progress=progress)
  return [[text for text, _ in row] for row in out]


def group_of(task: RagTask, p) -> str:
  """The prompt kind, conflicts split by whether the entity is popular (its memory was trained to win)."""
  if p.kind == "conflict":
    return "conflict_popular" if task.popular[p.entity] else "conflict_other"
  return p.kind


def behaviour(task: RagTask, prompts, answers: list[str], labels) -> dict:
  """Where the generator's answers come from, per prompt group, and the class balance; logged."""
  groups = [group_of(task, p) for p in prompts]
  sources = [task.source(p, a) for p, a in zip(prompts, answers, strict=True)]
  stated = [p.stated is not None for p in prompts]
  competence = float(np.mean([s == "passage" for s, has in zip(sources, stated, strict=True) if has] or [0.0]))
  by_group = {}
  for g in sorted(set(groups)):
    rows = [i for i, x in enumerate(groups) if x == g]
    by_group[g] = {"n": len(rows), "hallucinated": float(np.mean([labels[i] for i in rows])),
                   **{s: float(np.mean([sources[i] == s for i in rows])) for s in ("passage", "memory", "other")}}
  logging.info("competence: the greedy answer is the passage's value on %.1f%% of the %d prompts whose passages "
               "state the fact", 100 * competence, sum(stated))
  for g, row in by_group.items():
    logging.info("  %-17s n=%-5d passage %.2f  memory %.2f  other %.2f  -> hallucinated %.2f", g, row["n"],
                 row["passage"], row["memory"], row["other"], row["hallucinated"])
  num = int(np.sum(labels))
  logging.info("class balance: %d hallucinated (%.1f%%), %d faithful, of %d held-out answers", num,
               100 * num / len(labels), len(labels) - num, len(labels))
  return {"competence": competence, "n": len(labels), "hallucinated": num,
          "hallucination_rate": num / len(labels), "by_group": by_group}


def write_heatmaps(workdir: str, task: RagTask, prompts, prompt_ids, answer_ids, answers, labels, rows) -> dict:
  """relevance_faithful.png / relevance_hallucinated.png: a conflict prompt of each class when there is one."""
  tok, written = task.tokenizer, {}

  def words(ids):
    return [{tok.bos_id: "<bos>", tok.eos_id: "<eos>"}.get(i) or tok.decode([i]) or f"<{i}>" for i in ids]
  for name, label in (("faithful", 0), ("hallucinated", 1)):
    candidates = [i for i in range(len(labels)) if labels[i] == label]
    if not candidates:
      logging.warning("no %s answer: relevance_%s.png not written", name, name)
      continue
    i = next((i for i in candidates if prompts[i].kind == "conflict"), candidates[0])
    p = prompts[i]
    stated, memory = (task.value_word(p.attribute, v) if v is not None else "-" for v in (p.stated, p.memory))
    title = [f"{name}: {group_of(task, p)} prompt, answer {answers[i]!r}",
             f"the passages state {stated}; the parametric knowledge is {memory}"]
    path = os.path.join(workdir, f"relevance_{name}.png")
    plots.heatmap(path, rows[i]["relevance"], words(answer_ids[i]), words(prompt_ids[i]), title=title)
    written[name] = {"index": i, "path": os.path.basename(path)}
  return written


def compile_shape(config) -> GPTConfig:
  """The generator's shape for an ahead-of-time compile, no weight read: the preset `model_preset` names, its
  weights stored in the compute dtype `model.dtype` (as the public bf16/fp16 checkpoints); else model.pretrained's
  config.json or saved run config (its stored dtype); else the GPT this config trains (`model`). ConfigError
  naming `model_preset` for an unknown shape or one AttnLRP does not implement."""
  preset = config.get("model_preset", "")
  if not (preset or config.model.pretrained):
    return GPTConfig.from_dict(config.model)
  cfg = pretrained.shape_for_compile(config.model.pretrained, preset, "model.pretrained", "model_preset",
                                     fields=pretrained.RUNTIME_FIELDS, section=config.model)
  if (reason := attnlrp.unsupported(cfg)) is not None:
    raise ConfigError("model_preset" if preset else "model.pretrained", f"AttnLRP does not implement {reason}",
                      ATTNLRP_MODELS)
  return dataclasses.replace(cfg, param_dtype=cfg.dtype) if preset else cfg


def relevance_flops(cfg: GPTConfig, rows: int, length: int, answer_rows: int) -> float:
  """Model FLOPs of one signals batch (`signals.padded_signals`) of `rows` rows of `length` tokens explaining
  `answer_rows` answer tokens each: one forward (2 N a token plus causal attention, a third of
  `GPTConfig.flops_per_token`) and answer_rows + 1 backward passes to the input embeddings (AttnLRP's one per
  answer token, gradient x input's one for the answer's mean). A backward to the input takes each weight's input
  gradient only (2 N a token, no weight gradients) and attention's two products twice (dq, dk; dprobs, dv). The
  program itself runs more: three forwards (the relevance's, the attention and logits', gradient x input's own)
  and the LRP's attention over all t x t pairs, masked."""
  attention = cfg.n_layers * cfg.n_heads * cfg.head_dim * length  # per token: causal QK^T and PV are 2 of these
  forward = cfg.flops_per_token(length) / 3
  backward = 2.0 * cfg.num_params(include_embedding=False) + 4.0 * attention
  return rows * length * (forward + (answer_rows + 1) * backward)


def aot_inference(config, devices):
  """LRP4RAG's TPU step for ahead-of-time compilation (`lwjax.launch.compile`): the signals of one padded batch
  (`signals.padded_signals`: the AttnLRP relevance matrix, attention, gradient x input, log-probability and
  entropy), the generator's shape from `compile_shape` (`--config.model_preset=llama2_7b`, or model.pretrained's
  config.json), parameters sharded by their logical axes under `mesh.rules` on a mesh of `devices` and the rows
  over its data-parallel axes. The batch: `eval.signal_batch` rows of `eval.compile_length` tokens (0: the bucket
  of the model's max_seq_len, the longest row an answer that is not left out takes) with
  `eval.compile_answer_rows` answer rows (0: the bucket of `eval.max_new_tokens`, generated answers only; RAGTruth's
  responses have no configured bound, so its scales set it), LRP backward passes `eval.relevance_chunk` at a time.
  Model FLOPs: `relevance_flops`. Returns a `compile.AotInference`."""
  import jax.numpy as jnp

  from lwjax.launch.compile import AotInference, abstract_params
  cfg, e = compile_shape(config), config.eval
  length = e.get("compile_length", 0) or signals.bucket(cfg.max_seq_len)
  if length > signals.bucket(cfg.max_seq_len):
    raise ConfigError("eval.compile_length", f"{length} tokens: longer than any bucket of the model's "
                      f"max_seq_len {cfg.max_seq_len}", f"<= {signals.bucket(cfg.max_seq_len)}")
  answer_rows = e.get("compile_answer_rows", 0)
  if not answer_rows and published.data_set(config) == "ragtruth":
    raise ConfigError("eval.compile_answer_rows", "0: RAGTruth's responses have no configured length",
                      "the answer bucket to compile, a power of two such as 512")
  answer_rows = answer_rows or signals.bucket(e.max_new_tokens)
  if answer_rows >= length:
    raise ConfigError("eval.compile_answer_rows", f"{answer_rows} leaves no prompt token in {length}", f"< {length}")
  rows, chunk = e.signal_batch, e.relevance_chunk or None
  slice_mesh, rules = mesh.make_mesh(config.mesh.shape, devices), sharding.rules_from_config(config.mesh.rules)
  graphdef, params = abstract_params(lambda rngs: GPT(cfg, rngs=rngs), slice_mesh, rules)

  def step(params, batch):
    return signals.padded_signals(nnx.merge(graphdef, params), batch["tokens"], batch["prompt_len"],
                                  batch["answer_len"], answer_rows, chunk)
  batch = {"tokens": ((rows, length), jnp.int32), "prompt_len": ((rows,), jnp.int32),
           "answer_len": ((rows,), jnp.int32)}
  return AotInference(step, params, slice_mesh, rules, batch,
                      relevance_flops(cfg, rows, length, answer_rows),
                      f"{rows} x {length} tokens, {answer_rows} answer rows explained "
                      f"{chunk or answer_rows} at a time ({cfg.dtype})", "eval.signal_batch",
                      "fewer rows or answer rows per LRP backward batch: --config.eval.signal_batch, "
                      "--config.eval.relevance_chunk; a smaller bucket: --config.eval.compile_length, "
                      "compile_answer_rows; or a larger slice")


def run(config, workdir: str) -> dict:
  if config.get("model_preset"):
    raise ConfigError("model_preset", "compile only (python -m lwjax.launch.compile): a run reads its generator "
                      "from model.pretrained or trains one", "''")
  if published.data_set(config) == "ragtruth":
    return published.run(config, workdir)
  task_cfg = TaskConfig.from_dict(config.task)
  model, task, source = load_generator(config, workdir, task_cfg)
  if model is None:
    return {}
  tok, e = task.tokenizer, config.eval
  prompts = task.prompts(e.num, mix=task_cfg.eval_mix, seed=config.seed + EVAL_SEED)
  prompt_ids = [tokenizer_lib.bos_prefix(tok) + tok.encode(task.prompt_text(p)) for p in prompts]
  # Greedy answers with the samples' shapes (K equal rows at temperature 0): one compilation serves both.
  answers = [row[0] for row in generate(model, tok, prompt_ids, n=e.samples, temperature=0.0, seed=config.seed,
                                        config=config, desc="greedy answers")]
  labels = np.asarray([not task.is_faithful(p, a) for p, a in zip(prompts, answers, strict=True)], np.int64)
  metrics = {"generator": source, "seed": config.seed, **behaviour(task, prompts, answers, labels)}
  samples = generate(model, tok, prompt_ids, n=e.samples, temperature=e.temperature,
                     seed=config.seed + SAMPLE_SEED, config=config, desc=f"{e.samples} samples per prompt")
  agreement = [np.mean([task.answer_word(s) == task.answer_word(a) for s in row])
               for row, a in zip(samples, answers, strict=True)]
  answer_ids = [signals.answer_tokens(tok, a) for a in answers]
  detected, rows = detectors.explain_and_detect(model, prompt_ids, answer_ids, labels,
                                                [group_of(task, p) for p in prompts], agreement, config)
  metrics.update(detected)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    metrics["heatmaps"] = write_heatmaps(workdir, task, prompts, prompt_ids, answer_ids, answers, labels, rows)
    metrics["task"] = dataclasses.asdict(task_cfg)
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump(metrics, f, indent=2)
  return metrics
