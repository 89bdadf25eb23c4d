"""The GenRM job (Generative Verifiers, arXiv 2408.15240, §3-4): train one verifier from a solver checkpoint on
its own labelled candidates, then Best-of-N on held-out (test) and longer/harder (hard) problems.

1. Candidates (`lwjax.candidates`, shared with every verifier run of the same solver and task): the solver's
   samples on training, test and hard problems, each labelled exactly by the task's checker.
2. The verifier (`verifier.kind`): `disc` (scalar head, BCE), `direct` (p(Yes) after `verify ?`), `cot`
   (rationales, then Yes/No: the step checker's, or with `rationales.source=api` a model's over an
   OpenAI-compatible API, graded against the reference and kept when their verdict agrees with the label,
   `api_rationales`), `unified` (direct or CoT + lambda x solution generation), or
   `judge` (LLM-as-judge: the untrained solver asked the direct question). All start from the solver's
   parameters and train on the same balanced candidates for `train.steps`.
3. Scores for every test/hard candidate; Best-of-N accuracy for n in `eval.ns` (final answer right, as the
   paper; and whole solution right), with self-consistency, pass@n and the first sample measured on the
   same candidates; for CoT, accuracy vs the number of rationales K; the verifier's AUC.

`base` is the solver's workdir or a Hugging Face checkpoint directory: a solver with a tokenizer of its own (a
pretrained model, or a `genrm_solver` run finetuned from one) is sampled, verified and trained through it,
and `judge` with a pretrained `base` is the paper's LLM-as-a-judge baseline on that model.

`<workdir>/metrics.json` holds it all; `bestofn_<split>.png` draws the curves; TensorBoard `bestofn/`.
"""

from __future__ import annotations

import gzip
import json
import logging
import os

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from lwjax import candidates as candidates_lib, judge as judge_lib, plots, reasoning_tasks
from lwjax.config import ConfigError, Field, int_list, parse_ints, positive_int, validate as validate_schema
from lwjax.data import rows as rows_lib, tokenizer as tokenizer_lib
from lwjax.launch import distributed
from lwjax.models import pretrained
from lwjax.models.gpt import GPT
from lwjax.projects.genrm import api_rationales, bestofn, data as data_lib, rationale, verifiers
from lwjax.serving import batch_sampler
from lwjax.training import lora as lora_lib, losses, mesh, optim, trainer as trainer_lib

KINDS = ("disc", "direct", "cot", "unified", "judge")
RATIONALE_SOURCES = ("checker", "api")


SCHEMA = {
    "job": Field(str), "seed": Field(int),
    "base": Field(str, doc="the solver: its workdir (checkpoints/) or a Hugging Face checkpoint directory"),
    "base_preset": Field(str, has_default=True, doc="compile only: the base's shape (e.g. gemma2_9b) when `base` is "
                         "not on this machine"),
    "task": {"name": Field(str, choices=reasoning_tasks.TASK_NAMES), "preset": Field(str),
             "train_ops": int_list(), "hard_ops": int_list(),
             "train_words": int_list(), "hard_words": int_list(),
             "path": Field(str, doc="gsm8k, math: where the published files are (lwjax.data.math_sets)"),
             "fewshot": Field(int, min=0, has_default=True,
                              doc="gsm8k, math: exemplars in a pretrained solver's prompt (0: none)")},
    "candidates": {"dir": Field(str, doc="where candidate sets are written once and reused"),
                   "num_train": positive_int("training problems"), "n_train": positive_int("candidates each"),
                   "num_test": positive_int("test problems (and as many hard ones)"),
                   "n_test": positive_int("candidates per test problem (the largest N)"),
                   "temperature": Field(float, min=0.0), "max_new_tokens": positive_int(),
                   "batch_prompts": positive_int(),
                   "seed": Field(int, doc="problems and sampling; the same for every verifier seed")},
    "verifier": {"kind": Field(str, choices=KINDS), "per_class": positive_int("candidates per verdict per problem"),
                 "unified_lambda": Field(float, min=0.0), "unified_base": Field(str, choices=("direct", "cot")),
                 "cot_k": int_list("numbers of rationales K to report; the largest is sampled"),
                 "cot_temperature": Field(float, min=0.0), "cot_max_new_tokens": positive_int()},
    "rationales": {"source": Field(str, choices=RATIONALE_SOURCES, doc="who writes the CoT rationales: the task's "
                                   "step checker, or a model over an OpenAI-compatible API"),
                   "base_url": Field(str, doc="api: the endpoint, e.g. http://localhost:8000/v1"),
                   "model": Field(str), "prompt": Field(str, doc="with {question}, {reference} and {candidate}"),
                   "samples": positive_int("rationales asked per candidate (those with the wrong verdict dropped)"),
                   "temperature": Field(float, min=0.0), "max_tokens": positive_int(),
                   "workers": positive_int("requests at a time"),
                   "api_key_env": Field(str, doc="the environment variable holding the key ('' = none)")},
    "data": {"seq_len": Field(int, min=8)},
    "eval": {"ns": int_list(), "draws": positive_int(), "batch_size": positive_int()},
    "train": trainer_lib.SCHEMA, "optim": optim.SCHEMA, "mesh": mesh.SCHEMA, "distributed": distributed.SCHEMA,
}


def validate(config) -> None:
  validate_schema(config, SCHEMA)
  if max(parse_ints(config.eval.ns)) > config.candidates.n_test:
    raise ConfigError("eval.ns", "asks for more candidates than were sampled",
                      f"values <= candidates.n_test ({config.candidates.n_test})")
  uses_cot = config.verifier.kind == "cot" or (config.verifier.kind == "unified" and
                                               config.verifier.unified_base == "cot")
  r = config.rationales
  if uses_cot and r.source == "checker" and config.task.name in reasoning_tasks.DATASET_NAMES:
    raise ConfigError("rationales.source", f"checker: {config.task.name} has no step checker to write the CoT "
                      "rationales", "api, with rationales.base_url and rationales.model (the paper's are a strong "
                      "LLM's), or verifier.kind judge, disc, direct")
  if uses_cot and r.source == "api":
    for key in ("base_url", "model"):
      if not r[key]:
        raise ConfigError(f"rationales.{key}", "empty with rationales.source=api", "the endpoint's URL and the "
                          "model it serves, e.g. http://localhost:8000/v1")
    if "{candidate}" not in r.prompt or "{reference}" not in r.prompt:
      raise ConfigError("rationales.prompt", "lacks {candidate} or {reference}", "a template with {question}, "
                        "{reference} and {candidate} (the paper grades against the reference)")
    if r.samples > 1 and r.temperature <= 0:
      raise ConfigError("rationales.temperature", f"{r.temperature} with {r.samples} samples per candidate: "
                        "they would all be the same", "a temperature > 0, or rationales.samples=1")
  reasoning_tasks.check_path(config.task.name, config.task.path)
  if config.verifier.kind == "disc" and lora_lib.from_section(config.train.get("lora")):
    raise ConfigError("train.lora.rank", "the discriminative verifier's reward head is new and must train; LoRA "
                      "freezes every weight but its adapters", "0 for disc (LoRA takes the generative verifiers)")
  reasoning_tasks.check_fewshot(config.task.name, config.task.get("fewshot", 0))
  if not config.base:
    raise ConfigError("base", "required", "the workdir of a trained solver, e.g. runs/igsm_solver_cpu/weak, or a "
                      "Hugging Face checkpoint directory")


def get_task(config) -> reasoning_tasks.ReasoningTask:
  t = config.task
  return reasoning_tasks.get(t.name, **task_options(config))


def task_options(config) -> dict:
  """The options of `config.task` as `reasoning_tasks.get` takes them (and candidate sets record them)."""
  t = config.task
  return {"preset": t.preset, "train_ops": parse_ints(t.train_ops), "hard_ops": parse_ints(t.hard_ops),
          "train_words": parse_ints(t.train_words), "hard_words": parse_ints(t.hard_words),
          **({"path": os.path.abspath(t.path)} if t.get("path") else {}),
          **({"fewshot": t.fewshot} if t.get("fewshot") else {})}


def candidate_sets(config, task, loaded: tuple | None = None) -> dict[str, list[dict]]:
  """The train/test/hard candidate sets of the solver `config.base`, sampled once under `candidates.dir` (on the
  job's mesh, `batch_sampler.job_mesh`)."""
  c, sets = config.candidates, {}
  options = task_options(config)
  sampling_mesh = batch_sampler.job_mesh(config.mesh.shape)
  for split, num, n in (("train", c.num_train, c.n_train), ("test", c.num_test, c.n_test),
                        ("hard", c.num_test, c.n_test)):
    path = os.path.join(c.dir, f"{task.name}_{split}_{num}x{n}_t{c.temperature:g}_s{c.seed}.arrayrecord")
    problems, metadata = candidates_lib.build(
        path, workdir=config.base, task=task.name, split=split, num=num, n=n, temperature=c.temperature,
        max_new_tokens=c.max_new_tokens, seed=c.seed * 7919 + {"train": 0, "test": 1, "hard": 2}[split],
        record_seed=c.seed, batch_prompts=c.batch_prompts, task_options=options, loaded=loaded, mesh=sampling_mesh)
    logging.info("candidates %s: %d problems x %d, answer accuracy %.3f, accuracy %.3f (%s)", split,
                 len(problems), n, metadata["stats"]["answer_accuracy"], metadata["stats"]["accuracy"], path)
    sets[split] = problems
  return sets


def rationale_writer(config, workdir: str, stats: dict):
  """With `rationales.source=api`: the function that has the API write (and label-filter) the CoT rationales
  of the balanced training pairs, its counts put in `stats`; answers cached in `<workdir>/rationales.jsonl`
  (and written out readable in `rationales_kept.jsonl`). None: the step checker writes them."""
  r = config.rationales
  if r.source != "api":
    return None
  client = judge_lib.Judge.from_config(r, cache_path=os.path.join(workdir, "rationales.jsonl"), group="rationales")

  def write(pairs):
    kept, counts = api_rationales.write(client, pairs, samples=r.samples, temperature=r.temperature)
    stats.update(counts)
    logging.info("API rationales: %d asked, %d kept (verdict agreeing with the label: %.3f of those read; %d "
                 "unread); %d of %d candidates left without one", counts["asked"], counts["kept"],
                 counts["agreement"], counts["unread"], counts["candidates_without"], counts["candidates"])
    if jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
      with open(os.path.join(workdir, "rationales_kept.jsonl"), "w") as f:
        f.writelines(json.dumps({"question": record["question"], "candidate": c["text"], "correct": c["correct"],
                                 "rationales": texts}) + "\n" for (record, c), texts in zip(pairs, kept, strict=True))
    return kept

  return write


def train_verifier(config, workdir: str, task, base_model: GPT, problems: list[dict], rationale_stats: dict):
  """The trained verifier: a RewardModel for `disc`, else a GPT (the solver's shape)."""
  v, kind = config.verifier, config.verifier.kind
  cfg = base_model.cfg
  rows = data_lib.training_rows(kind, task.name, problems, task.tokenizer, seq_len=config.data.seq_len,
                                per_class=v.per_class, seed=config.seed, unified_lambda=v.unified_lambda,
                                unified_base=v.unified_base,
                                write_rationales=rationale_writer(config, workdir, rationale_stats))
  labels = [r["label"] for r in rows if kind == "disc"]
  logging.info("verifier %s: %d training rows (those longer than data.seq_len left out)%s", kind, len(rows),
               f", {np.mean(labels):.2f} correct" if labels else "")
  if kind == "disc":
    def model_fn(rngs):
      return verifiers.RewardModel(GPT(cfg, rngs=rngs), rngs=rngs)
    fresh = nnx.to_pure_dict(nnx.state(model_fn(nnx.Rngs(config.seed))))
    init = {**fresh, "gpt": nnx.to_pure_dict(nnx.state(base_model))}
    loss_fn = verifiers.disc_loss
  else:
    def model_fn(rngs):
      return GPT(cfg, rngs=rngs)
    init, loss_fn = nnx.to_pure_dict(nnx.state(base_model)), losses.lm_loss
  trainer = trainer_lib.Trainer(config, workdir, model_fn=model_fn, loss_fn=loss_fn,
                                flops_per_token=cfg.flops_per_token(config.data.seq_len), seq_len=config.data.seq_len)
  train_iter = iter(rows_lib.shuffled_batches(rows, batch_size=config.train.global_batch_size, seed=config.seed))
  result = trainer.fit(train_iter, seed=config.seed, init_params=init)
  if result["step"] < config.train.steps:
    return None, result
  return nnx.merge(trainer.graphdef, trainer.restore_params()), result


def aot_step(config, devices):
  """The verifier's train step for ahead-of-time compilation (`lwjax.launch.compile`): the base's shape (from
  `base_preset`, or the config of `base`), `disc` with its reward head and BCE, the generative kinds the LM loss
  on their rows, LoRA when `train.lora` asks, at `data.seq_len` on a mesh of `devices`. Returns a
  `compile.AotStep`."""
  import jax.numpy as jnp

  from lwjax.launch.compile import AotStep, token_batch
  cfg = pretrained.shape_for_compile(config.base, config.get("base_preset", ""), "base", "base_preset")
  if config.verifier.kind == "disc":
    def model_fn(rngs):
      return verifiers.RewardModel(GPT(cfg, rngs=rngs), rngs=rngs)
    loss_fn = verifiers.disc_loss
  else:
    def model_fn(rngs):
      return GPT(cfg, rngs=rngs)
    loss_fn = losses.lm_loss
  seq_len, batch = config.data.seq_len, config.train.global_batch_size
  trainer = trainer_lib.Trainer(config, "/tmp/lwjax-compile-unused", model_fn=model_fn, loss_fn=loss_fn,
                                flops_per_token=cfg.flops_per_token(seq_len), seq_len=seq_len,
                                mesh=mesh.make_mesh(config.mesh.shape, devices))
  rows = {**token_batch(batch, seq_len), "last": ((batch,), jnp.int32), "label": ((batch,), jnp.float32),
          "weight": ((batch,), jnp.float32)}  # every verifier row carries the head's fields (data.verification_row)
  return AotStep(trainer, rows, cfg.flops_per_token(seq_len) * batch * seq_len,
                 f"{batch} x {seq_len} tokens ({config.verifier.kind} verifier)")


def _fit(sequences: list[list[int]]) -> int:
  """The scoring length: the longest sequence rounded up to 64 (few shapes, few compilations)."""
  return batch_sampler.bucket(max(len(s) for s in sequences), 64)


def score(config, task, verifier, problems: list[dict], split: str) -> tuple[np.ndarray, dict]:
  """[problems, N] verifier scores of the candidates, and extras (CoT: scores per rationale)."""
  tok, kind, v = task.tokenizer, config.verifier.kind, config.verifier
  batch = config.eval.batch_size
  yes_id, no_id = tok.encode(rationale.YES)[0], tok.encode(rationale.NO)[0]
  bos = tokenizer_lib.bos_prefix(tok)
  pairs = [(p["record"], c) for p in problems for c in p["candidates"]]
  shape = (len(problems), len(problems[0]["candidates"]))
  base_kind = v.unified_base if kind == "unified" else kind
  if kind == "disc":
    seqs = [bos + tok.encode(f"{r['question']} {c['text']}") for r, c in pairs]
    return verifiers.score_disc(verifier, seqs, batch=batch, seq_len=_fit(seqs)).reshape(shape), {}
  if base_kind in ("direct", "judge"):
    seqs = [bos + tok.encode(rationale.direct_prompt(r["question"], c["text"])) for r, c in pairs]
    return verifiers.score_p_yes(verifier, seqs, yes_id=yes_id, no_id=no_id, batch=batch,
                                 seq_len=_fit(seqs)).reshape(shape), {}
  prompts = [bos + tok.encode(rationale.cot_prompt(r["question"], c["text"])) for r, c in pairs]
  k = max(parse_ints(v.cot_k))
  prompt_len = batch_sampler.bucket(max(len(p) for p in prompts), 64)
  with tqdm(total=len(prompts), desc=f"CoT verification ({split}, K={k})", unit="candidate") as progress:
    scores_ck, texts = verifiers.score_cot(
        verifier, tok, prompts, k=k, max_new_tokens=v.cot_max_new_tokens, temperature=v.cot_temperature,
        seed=config.seed, batch_prompts=max(1, batch // k), prompt_len=prompt_len, yes_id=yes_id, no_id=no_id,
        progress=progress)
  per_k = scores_ck.reshape(*shape, k)
  return per_k.mean(-1), {"per_rationale": per_k, "example_rationales": texts[:3]}


def evaluate(config, scores_pn: np.ndarray, problems: list[dict], extras: dict) -> dict:
  """Best-of-N curves of the verifier and the baselines, and the verifier's AUC."""
  ns, draws = parse_ints(config.eval.ns), config.eval.draws
  answer_ok = np.array([[c["answer_correct"] for c in p["candidates"]] for p in problems], bool)
  full_ok = np.array([[c["correct"] for c in p["candidates"]] for p in problems], bool)
  answers = [[c["answer"] for c in p["candidates"]] for p in problems]
  first = np.zeros_like(scores_pn)
  out = {"n": ns, "num_problems": len(problems), "candidate_answer_accuracy": float(answer_ok.mean()),
         "candidate_accuracy": float(full_ok.mean()),
         "auc": bestofn.roc_auc(scores_pn, full_ok), "auc_answer": bestofn.roc_auc(scores_pn, answer_ok),
         "verifier_accuracy": float(((scores_pn > 0.5) == full_ok).mean()),
         "within_problem": bestofn.within_problem_auc(scores_pn, full_ok),
         "within_problem_answer": bestofn.within_problem_auc(scores_pn, answer_ok)}
  for name, ok in (("answer", answer_ok), ("full", full_ok)):
    out[name] = {
        "verifier": [bestofn.best_of_n(scores_pn, ok, n, draws=draws, seed=config.seed) for n in ns],
        "majority": [bestofn.majority_vote(answers, ok, n, draws=draws, seed=config.seed) for n in ns],
        "pass": [bestofn.pass_at_n(ok, n) for n in ns],
        "first": bestofn.best_of_n(first, ok, 1, draws=draws, seed=config.seed),
    }
  if "per_rationale" in extras:
    per_k = extras["per_rationale"]
    out["cot_k"] = {str(k): bestofn.best_of_n(per_k[..., :k].mean(-1), answer_ok, max(ns), draws=draws,
                                              seed=config.seed) for k in parse_ints(config.verifier.cot_k)}
    out["example_rationales"] = extras["example_rationales"]
  return out


def write_scores(path: str, problems: list[dict], scores_pn: np.ndarray, extras: dict) -> None:
  """The raw data of a split's Best-of-N: one json line per problem (its index, and per candidate the final
  answer, the two verdicts, the verifier's score, and for CoT the score of each rationale), gzipped; every
  number of `evaluate` can be recomputed from it."""
  per_k = extras.get("per_rationale")
  with gzip.open(path + ".tmp", "wt") as f:
    for i, (problem, scores) in enumerate(zip(problems, scores_pn, strict=True)):
      line = {"problem": problem["index"], "answer": [c["answer"] for c in problem["candidates"]],
              "answer_correct": [bool(c["answer_correct"]) for c in problem["candidates"]],
              "correct": [bool(c["correct"]) for c in problem["candidates"]],
              "score": [round(float(s), 6) for s in scores]}
      if per_k is not None:
        line["rationale_scores"] = np.round(per_k[i], 6).tolist()
      f.write(json.dumps(line) + "\n")
  os.replace(path + ".tmp", path)


def _plot(path: str, result: dict, kind: str, split: str) -> None:
  ns, a = result["n"], result["answer"]
  series = {f"{kind} verifier": [(n, *v) for n, v in zip(ns, a["verifier"], strict=False)],
            "self-consistency": [(n, *v) for n, v in zip(ns, a["majority"], strict=False)],
            "pass@n (oracle)": [(n, *v) for n, v in zip(ns, a["pass"], strict=False)],
            "first sample": [(n, *a["first"]) for n in ns]}
  plots.line_chart(path, series, title=f"Best-of-N, {split} problems ({kind})", x_label="N candidates",
                   y_label="final answer accuracy", log_x=2,
                   dashed=("self-consistency", "pass@n (oracle)", "first sample"),
                   error_note="shaded: ±1 standard error over problems")


def run(config, workdir: str) -> dict:
  pretrained.checked_kind(config.base, "base")  # config, shards and tokenizer, before any heavy work
  trains = config.verifier.kind != "judge"
  base_model, tokenizer, step = candidates_lib.load_solver(config.base, param_dtype="float32" if trains else None)
  task = candidates_lib.task_for(get_task(config), tokenizer)
  logging.info("solver %s (step %d), task %s, %s tokenizer", config.base, step, task.name,
               "its own" if tokenizer is not None else "the task's")
  sets = candidate_sets(config, task, loaded=(base_model, tokenizer, step))  # sampled from the model held here
  kind, rationale_stats = config.verifier.kind, {}
  if kind == "judge":
    verifier = base_model
  else:
    verifier, result = train_verifier(config, workdir, task, base_model, sets["train"], rationale_stats)
    if verifier is None:
      logging.warning("stopped at step %d of %d: no evaluation; run again to resume", result["step"],
                      config.train.steps)
      return {}
  metrics = {"kind": kind, "task": task.name, "base": config.base, "base_step": step, "seed": config.seed,
             "steps": config.train.steps if kind != "judge" else 0,
             "step_checker": task.step_checker}  # False: "full" is the final answer's verdict (a data set)
  if kind == "unified":
    metrics["unified_lambda"] = config.verifier.unified_lambda
  if rationale_stats:
    metrics["api_rationales"] = {"model": config.rationales.model, **rationale_stats}
  for split in ("test", "hard"):
    scores_pn, extras = score(config, task, verifier, sets[split], split)
    metrics[split] = evaluate(config, scores_pn, sets[split], extras)
    if jax.process_index() == 0:
      os.makedirs(workdir, exist_ok=True)
      write_scores(os.path.join(workdir, f"scores_{split}.jsonl.gz"), sets[split], scores_pn, extras)
    m = metrics[split]
    logging.info("%s: best-of-%d %.3f (self-consistency %.3f, pass %.3f, first %.3f), AUC %.3f, verifier "
                 "accuracy %.3f, within-problem AUC %.3f (%d problems)", split, m["n"][-1],
                 m["answer"]["verifier"][-1][0], m["answer"]["majority"][-1][0], m["answer"]["pass"][-1][0],
                 m["answer"]["first"][0], m["auc"], m["verifier_accuracy"], m["within_problem"]["auc"],
                 m["within_problem"]["problems"])
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    for split in ("test", "hard"):
      _plot(os.path.join(workdir, f"bestofn_{split}.png"), metrics[split], kind, split)
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump(metrics, f, indent=2)
  return metrics
