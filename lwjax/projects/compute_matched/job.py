"""The compute-matched sampling job (Smaller, Weaker, Yet Better, arXiv 2408.16737, §3-4): sample training data
from a weaker-cheaper (WC) and a stronger-expensive (SE) solver at the same FLOPs budget, measure its quality,
and finetune one model on each source.

1. Candidates (`lwjax.candidates`, written once under `candidates.dir` and shared by every setup of a seed):
   on the training problems, SE draws max(`budget.se_samples`) solutions per problem and WC the number of
   samples the same FLOPs pay for (`budget.matched_samples`); every candidate labelled by the step checker.
2. Data quality at every budget: coverage, diversity and false-positive rate of both sources (`quality`).
3. Finetuning (`setup`): `kd` finetunes a third model, the student (`models.student`), `self` the WC model,
   `w2s` the SE model; once on WC data and once on SE data at the budget `budget.finetune`, filtered by final
   answer only (the paper's filter: what it lets through is the false-positive rate), same steps, same
   hyperparameters. The finetuned models and the untouched one are evaluated by greedy solutions of held-out
   problems (test-split templates at the training ops, and harder ops), every step checked.

Each model (`models.wc`, `models.se`, `models.student`) is an lwjax solver's workdir or a Hugging Face checkpoint
directory, as in the paper (Gemma-2 9B and 27B sampling, a smaller pretrained student): a model with a
tokenizer of its own samples, finetunes and is evaluated through it, the others through the task's; the
candidates are text, so WC and SE data finetune any of them. The finetuned model keeps float32 master weights.

GSM8K and MATH have no step checker: their false-positive rate is an LLM judge's (`judge.base_url`, any
OpenAI-compatible endpoint, `judged`), as the paper's is Gemini's and humans' on 50 solutions: at every budget a
random `judge.max_candidates` of each source's answer-filtered data judged (nested draws, so the budgets share
requests), the rate reported with its standard error and n (`metrics.json` "judge_by_budget", and "judge" at the
finetuning budget), the judged candidates and answers in `<workdir>/judged.jsonl`. On compact iGSM the
same judge is measured against the exact checker (its agreement). A pretrained sampler reads the few-shot prompt
of `task.fewshot`; the finetuned models read the bare question they were finetuned on.

`<workdir>/metrics.json` holds everything; `coverage.png` and `diversity.png` plot the data quality against
the budget; each finetune's run (checkpoints, TensorBoard) is `<workdir>/on_wc_data` and `on_se_data`.
A stopped run resumes: finished finetunes and evaluations are read back, not repeated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, NamedTuple

import jax
import numpy as np
from flax import nnx

from lwjax import candidates as candidates_lib, plots, reasoning_tasks
from lwjax.config import ConfigError, Field, int_list, parse_ints, positive_int, validate as validate_schema
from lwjax.data import rows as rows_lib, tokenizer as tokenizer_lib
from lwjax.launch import distributed
from lwjax.models import pretrained
from lwjax.models.gpt import GPT
from lwjax.projects.compute_matched import budget as budget_lib, judged as judged_lib, quality
from lwjax.serving import batch_sampler
from lwjax.training import losses, mesh, optim, trainer as trainer_lib

SETUPS = ("kd", "self", "w2s")
FINETUNED = {"kd": "student", "self": "wc", "w2s": "se"}  # which model each setup finetunes
SOURCES = ("wc", "se")
TASKS = ("igsm", *reasoning_tasks.DATASET_NAMES)  # compact iGSM (its exact step checker), or GSM8K / MATH


SCHEMA = {
    "job": Field(str), "seed": Field(int, doc="sampling and finetuning; the evaluation problems stay fixed"),
    "setup": Field(str, choices=SETUPS),
    "models": {"wc": Field(str, doc="the weaker-cheaper solver: a workdir or a Hugging Face checkpoint directory"),
               "se": Field(str, doc="the stronger-expensive solver: a workdir or a Hugging Face checkpoint directory"),
               "student": Field(str, doc="kd: the student, a workdir or a Hugging Face checkpoint directory"),
               "student_step": Field(int, min=0, doc="kd: the student's checkpoint step (0: the latest)"),
               "finetuned_preset": Field(str, has_default=True, doc="compile only: the finetuned model's shape (e.g. "
                                         "gemma2_27b) when its checkpoint is not on this machine")},
    "task": {"name": Field(str, choices=TASKS), "preset": Field(str), "train_ops": int_list(), "hard_ops": int_list(),
             "path": Field(str, doc="gsm8k, math: where the published files are (lwjax.data.math_sets)"),
             "fewshot": Field(int, min=0, has_default=True, doc="gsm8k, math: exemplars in the prompt (0: none)")},
    "candidates": {"dir": Field(str, doc="where candidate sets are written once and reused"),
                   "num_train": positive_int("training problems"), "temperature": Field(float, min=0.0),
                   "max_new_tokens": positive_int(), "batch_prompts": positive_int(),
                   "record_seed": Field(int, doc="which training problems (the same for every seed)")},
    "budget": {"se_samples": int_list("budgets, in SE samples per problem"),
               "finetune": positive_int("the budget of the finetuning data, in SE samples per problem")},
    "judge": {"base_url": Field(str, doc="an OpenAI-compatible endpoint judging the reasoning of right-answer "
                                         "candidates, e.g. http://localhost:8000/v1 ('' = none: a data set's "
                                         "false-positive rate is not measured)"),
              "model": Field(str), "prompt": Field(str, doc="with {question}, {reference} and {candidate}"),
              "max_tokens": positive_int(), "workers": positive_int("requests at a time"),
              "api_key_env": Field(str, doc="the environment variable holding the key ('' = none)"),
              "max_candidates": positive_int("judged per source, drawn at random (the paper: 50)")},
    "data": {"seq_len": Field(int, min=8)},
    "eval": {"num_test": positive_int(), "num_hard": Field(int, min=0), "max_new_tokens": positive_int(),
             "batch_prompts": positive_int(), "seed": Field(int)},
    "train": trainer_lib.SCHEMA, "optim": optim.SCHEMA, "mesh": mesh.SCHEMA, "distributed": distributed.SCHEMA,
}


def validate(config) -> None:
  validate_schema(config, SCHEMA)
  budgets = parse_ints(config.budget.se_samples)
  if config.budget.finetune not in budgets:
    raise ConfigError("budget.finetune", f"{config.budget.finetune} is not one of the sampled budgets {budgets}",
                      f"one of budget.se_samples ({config.budget.se_samples})")
  reasoning_tasks.check_path(config.task.name, config.task.path)
  reasoning_tasks.check_fewshot(config.task.name, config.task.get("fewshot", 0))
  if config.judge.base_url and not config.judge.model:
    raise ConfigError("judge.model", "empty with judge.base_url set", "the model name the endpoint serves")
  if "{candidate}" not in config.judge.prompt:
    raise ConfigError("judge.prompt", "has no {candidate}", "a template with {question}, {reference}, {candidate}")
  for name in ("wc", "se") + (("student",) if config.setup == "kd" else ()):
    if not config.models[name]:
      raise ConfigError(f"models.{name}", "required", "a trained solver's workdir, e.g. runs/igsm_solver_cpu/weak, "
                        "or a Hugging Face checkpoint directory")


def task_options(config) -> dict:
  """The options of `config.task` as `reasoning_tasks.get` takes them (and candidate sets record them)."""
  t = config.task
  return {"preset": t.preset, "train_ops": parse_ints(t.train_ops), "hard_ops": parse_ints(t.hard_ops),
          **({"path": os.path.abspath(t.path)} if t.get("path") else {}),
          **({"fewshot": t.fewshot} if t.get("fewshot") else {})}


def get_task(config) -> reasoning_tasks.ReasoningTask:
  return reasoning_tasks.get(config.task.get("name", "igsm"), **task_options(config))


def _tag(workdir: str, step: int) -> str:
  return hashlib.sha1(f"{os.path.abspath(workdir)}@{step}".encode()).hexdigest()[:8]


def plan(config, task, models: dict) -> dict:
  """The budget arithmetic of a run: mean sampling context, cost ratio, samples per problem at every budget,
  and where each source's candidate set lives."""
  c = config.candidates
  budgets = parse_ints(config.budget.se_samples)
  records = task.records(c.num_train, seed=c.record_seed, split="train")
  tok = candidates_lib.task_for(task, models["se"].tokenizer).tokenizer  # SE's view of the prompts
  context = int(np.mean([len(tok.encode(task.prompt(r))) + 1 for r in records]) + c.max_new_tokens // 2)
  ratio = budget_lib.cost_ratio(models["se"].model.cfg, models["wc"].model.cfg, context)
  n = {"se": max(budgets), "wc": budget_lib.matched_samples(max(budgets), ratio)}
  paths = {source: os.path.join(c.dir, f"{source}_{_tag(models[source].path, models[source].step)}_train_{c.num_train}"
                                       f"x{n[source]}_t{c.temperature:g}_s{config.seed}.arrayrecord")
           for source in SOURCES}
  return {"context": context, "cost_ratio": ratio, "n": n, "paths": paths,
          "flops_per_token": {s: budget_lib.flops_per_token(models[s].model.cfg, context) for s in SOURCES},
          "samples": [{"se": k, "wc": budget_lib.matched_samples(k, ratio)} for k in budgets]}


def sample_sources(config, task, models: dict) -> tuple[dict, dict, dict]:
  """({source: candidate problems}, {source: metadata}, plan): both sources at the largest budget (sampled on the
  job's mesh, `batch_sampler.job_mesh`)."""
  c = config.candidates
  info = plan(config, task, models)
  n = info["n"]
  logging.info("cost ratio SE/WC %.2f at a context of %d tokens: %d SE samples per problem = %d WC samples",
               info["cost_ratio"], info["context"], n["se"], n["wc"])
  options = task_options(config)
  sets, metas = {}, {}
  for source in SOURCES:
    solver = models[source]
    problems, metadata = candidates_lib.build(
        info["paths"][source], workdir=solver.path, task=task.name, split="train", num=c.num_train, n=n[source],
        temperature=c.temperature, max_new_tokens=c.max_new_tokens, seed=config.seed * 7919 + SOURCES.index(source),
        record_seed=c.record_seed, batch_prompts=c.batch_prompts, task_options=options, step=solver.step,
        loaded=(solver.model, solver.tokenizer, solver.step), mesh=batch_sampler.job_mesh(config.mesh.shape))
    stats = metadata["stats"]
    stats["sampling_flops"] = budget_lib.spent_flops(stats["generated_tokens"], solver.model.cfg, info["context"])
    logging.info("%s candidates: %d problems x %d, answer accuracy %.3f, accuracy %.3f, %.3g FLOPs (%s)", source,
                 len(problems), n[source], stats["answer_accuracy"], stats["accuracy"], stats["sampling_flops"],
                 info["paths"][source])
    sets[source], metas[source] = problems, metadata
  return sets, metas, info


class Solver(NamedTuple):
  model: GPT
  path: str  # its workdir or Hugging Face directory
  step: int  # its checkpoint's (0 for a Hugging Face checkpoint)
  tokenizer: Any  # its own, or None: the task's


def load_models(config) -> dict[str, Solver]:
  """The WC and SE solvers by source; the one this setup finetunes with float32 parameters, whatever its
  checkpoint's."""
  models = {}
  for source in SOURCES:
    pretrained.checked_kind(config.models[source], f"models.{source}")
  if config.setup == "kd":
    pretrained.checked_kind(config.models.student, "models.student")
  for source in SOURCES:
    dtype = "float32" if FINETUNED[config.setup] == source else None
    model, tokenizer, step = candidates_lib.load_solver(config.models[source], param_dtype=dtype)
    models[source] = Solver(model, config.models[source], step, tokenizer)
  return models


def data_quality(sets: dict, info: dict, task) -> list[dict]:
  """Coverage, diversity and false-positive rate of both sources at every budget; a data set's candidates have
  no step verdict, so its false-positive rate and full coverage are nan (not measured), not 0."""
  rows = [{"budget": s, **{src: quality.summary(sets[src], s[src]) for src in SOURCES}} for s in info["samples"]]
  if not task.step_checker:
    for row in rows:
      for src in SOURCES:
        row[src].update(false_positive_rate=float("nan"), full_coverage=float("nan"))
  return rows


def evaluate(config, task, model: GPT) -> dict:
  """Greedy solutions of the held-out problems, checked: accuracy (± standard error) per split and op (`task`
  read and written through the model's tokenizer; on the job's mesh, `batch_sampler.job_mesh`)."""
  e, out = config.eval, {}
  sampling_mesh = batch_sampler.job_mesh(config.mesh.shape)
  for split, num in (("test", e.num_test), ("hard", e.num_hard)):
    if not num:
      continue
    records = task.records(num, seed=e.seed, split=split)
    labels = candidates_lib.greedy(model, task, records, max_new_tokens=e.max_new_tokens,
                                   batch_prompts=e.batch_prompts, mesh=sampling_mesh)
    correct = np.array([c["correct"] for c in labels], float)
    answer = np.array([c["answer_correct"] for c in labels], float)
    ops = np.array([r.get("op", 0) for r in records])
    out[split] = {"n": num, "accuracy": float(correct.mean()),
                  "accuracy_se": float(correct.std(ddof=1) / np.sqrt(num)) if num > 1 else 0.0,
                  "answer_accuracy": float(answer.mean()),
                  "by_op": {str(op): float(correct[ops == op].mean()) for op in sorted(set(ops.tolist()))},
                  "correct": "".join(str(int(v)) for v in correct), "samples": [c["text"] for c in labels[:2]]}
  return out


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, value) -> None:
  """Atomically (a reader sees the whole file or none), by process 0 only."""
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(value, f, indent=2)
    os.replace(path + ".tmp", path)


def finetune_rows(pairs: list[tuple[dict, dict]], tokenizer, seq_len: int) -> list[dict]:
  """Solution-generation rows (loss on the solution) of the kept candidates; those over seq_len left out."""
  rows = [rows_lib.lm_row(tokenizer_lib.bos_prefix(tokenizer) + tokenizer.encode(record["question"]),
                          tokenizer.encode(candidate["text"]) + [tokenizer.eos_id], seq_len)
          for record, candidate in pairs]
  return [r for r in rows if r is not None]


def finetune(config, workdir: str, base: GPT, rows: list[dict]) -> GPT | None:
  """`base` finetuned on `rows` for train.steps (None when stopped before the end: run again to resume)."""
  cfg = base.cfg
  trainer = trainer_lib.Trainer(config, workdir, model_fn=lambda rngs: GPT(cfg, rngs=rngs), loss_fn=losses.lm_loss,
                                flops_per_token=cfg.flops_per_token(config.data.seq_len), seq_len=config.data.seq_len)
  train_iter = iter(rows_lib.shuffled_batches(rows, batch_size=config.train.global_batch_size, seed=config.seed))
  result = trainer.fit(train_iter, seed=config.seed, init_params=nnx.to_pure_dict(nnx.state(base)))
  if result["step"] < config.train.steps:
    return None
  return nnx.merge(trainer.graphdef, trainer.restore_params())


def aot_step(config, devices):
  """The finetune's train step for ahead-of-time compilation (`lwjax.launch.compile`): the model this setup
  finetunes (`models.finetuned_preset`, or the config of its checkpoint), the LM loss on solution rows of
  `data.seq_len`, on a mesh of `devices`. Returns a `compile.AotStep`."""
  from lwjax.launch.compile import AotStep, token_batch
  which = FINETUNED[config.setup]
  cfg = pretrained.shape_for_compile(config.models[which], config.models.get("finetuned_preset", ""),
                                     f"models.{which}", "models.finetuned_preset")
  seq_len, batch = config.data.seq_len, config.train.global_batch_size
  trainer = trainer_lib.Trainer(config, "/tmp/lwjax-compile-unused", model_fn=lambda rngs: GPT(cfg, rngs=rngs),
                                loss_fn=losses.lm_loss, flops_per_token=cfg.flops_per_token(seq_len), seq_len=seq_len,
                                mesh=mesh.make_mesh(config.mesh.shape, devices))
  return AotStep(trainer, token_batch(batch, seq_len), cfg.flops_per_token(seq_len) * batch * seq_len,
                 f"{batch} x {seq_len} tokens ({config.setup}: {which} finetuned)")


def paired_difference(a: dict, b: dict) -> tuple[float, float]:
  """Mean and standard error of a - b over the same problems (per-problem correctness strings)."""
  d = np.array([int(x) for x in a["correct"]], float) - np.array([int(x) for x in b["correct"]], float)
  return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0


def _plot(workdir: str, quality_rows: list[dict]) -> None:
  for field, label in (("coverage", "coverage (>= 1 right answer)"), ("diversity", "distinct right solutions")):
    series = {f"{src.upper()} ({'weak, cheap' if src == 'wc' else 'strong, costly'})":
              [(q["budget"]["se"], q[src][field]) for q in quality_rows] for src in SOURCES}
    plots.line_chart(os.path.join(workdir, f"{field}.png"), series, title=f"{field} at matched sampling FLOPs",
                     x_label="budget (SE samples per problem)", y_label=label,
                     y_range=(0.0, 1.0) if field == "coverage" else None, log_x=2)


def run(config, workdir: str) -> dict:
  task = get_task(config)
  models = load_models(config)
  sets, metas, info = sample_sources(config, task, models)
  quality_rows = data_quality(sets, info, task)
  for q in quality_rows:
    logging.info("budget %d SE / %d WC samples: coverage %.3f / %.3f, diversity %.2f / %.2f, FPR %.3f / %.3f",
                 q["budget"]["se"], q["budget"]["wc"], q["se"]["coverage"], q["wc"]["coverage"], q["se"]["diversity"],
                 q["wc"]["diversity"], q["se"]["false_positive_rate"], q["wc"]["false_positive_rate"])
  which = FINETUNED[config.setup]
  if which == "student":
    step = config.models.student_step or None
    base, base_tokenizer, base_step = candidates_lib.load_solver(config.models.student, step, param_dtype="float32")
    base_source = (config.models.student, base_step)
  else:
    solver = models[which]
    base, base_source, base_tokenizer = solver.model, (solver.path, solver.step), solver.tokenizer
  task = candidates_lib.task_for(task, base_tokenizer)  # the finetuned model's own reading of the problems
  logging.info("setup %s: finetuning %s (%s, step %d)", config.setup, which, *base_source)
  base_eval = os.path.join(workdir, "base_eval.json")
  if not os.path.isfile(base_eval):
    _write_json(base_eval, evaluate(config, task, base))
  evals = {"base": _read_json(base_eval)}
  budget_row = next(q for q in quality_rows if q["budget"]["se"] == config.budget.finetune)
  judged_rows = judged_lib.false_positive_rates(config, task, sets, quality_rows, workdir)
  judged = next((r for r in judged_rows if r["budget"] == budget_row["budget"]), None) if judged_rows else None
  data_stats = {}
  for source in SOURCES:
    k = budget_row["budget"][source]
    pairs = quality.answer_filtered(sets[source], k)
    rows = finetune_rows(pairs, task.tokenizer, config.data.seq_len)
    data_stats[source] = {"samples_per_problem": k, "rows": len(rows),
                          "problems": len({record["question"] for record, _ in pairs}),
                          "false_positive_rate": float(np.mean([not c["correct"] for _, c in pairs]))
                          if pairs and task.step_checker else float("nan"),
                          "distinct": len({(r["question"], " ".join(c["text"].split())) for r, c in pairs})}
    if not rows:  # e.g. an untrained smoke solver: nothing to finetune on, said in the metrics
      logging.warning("no %s candidate with a right answer fits data.seq_len: no finetune on %s data",
                      source.upper(), source.upper())
      evals[f"{source}_data"] = None
      continue
    logging.info("finetuning on %s data: %d rows (%d distinct) from %d problems, FPR %.3f", source.upper(),
                 len(rows), data_stats[source]["distinct"], data_stats[source]["problems"],
                 data_stats[source]["false_positive_rate"])
    sub = os.path.join(workdir, f"on_{source}_data")
    eval_path = os.path.join(sub, "eval.json")
    if not os.path.isfile(eval_path):
      tuned = finetune(config, sub, base, rows)
      if tuned is None:
        logging.warning("stopped before the end of the finetune on %s data; run again to resume", source)
        return {}
      _write_json(eval_path, evaluate(config, task.zero_shot(), tuned))
    evals[f"{source}_data"] = _read_json(eval_path)
  metrics = {"setup": config.setup, "finetuned": which, "finetuned_from": list(base_source), "seed": config.seed,
             "steps": config.train.steps, **{k: v for k, v in info.items() if k != "paths"},
             "quality": quality_rows, "finetune_data": data_stats, "sampling": {s: metas[s]["stats"] for s in SOURCES},
             "eval": evals, "wc_minus_se": {},
             **({"judge": {s: judged[s] for s in SOURCES}, "judge_by_budget": judged_rows} if judged else {})}
  for split in evals["base"]:
    line = {name: "-" if e is None else f"{e[split]['accuracy']:.3f}" for name, e in evals.items()}
    difference = "-"
    if evals["wc_data"] is not None and evals["se_data"] is not None:
      metrics["wc_minus_se"][split] = paired_difference(evals["wc_data"][split], evals["se_data"][split])
      difference = "{:+.3f} ± {:.3f}".format(*metrics["wc_minus_se"][split])
    logging.info("%s (%s finetuned): base %s, on WC data %s, on SE data %s, WC - SE %s", split, which, line["base"],
                 line["wc_data"], line["se_data"], difference)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    _plot(workdir, quality_rows)
  _write_json(os.path.join(workdir, "metrics.json"), metrics)
  return metrics
