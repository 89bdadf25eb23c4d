"""Candidate solutions: N samples per problem from a solver, each labelled exactly by the task's checker.

What GenRM (arXiv 2408.15240, §4: Best-of-N candidates and verifier training data) and compute-matched
sampling (arXiv 2408.16737, §2-3: coverage, diversity and false positives of sampled data) share. The
samples come from `lwjax.serving.batch_sampler` (each prompt prefilled once, its KV shared by its N
samples); every candidate gets the checker's verdict: final answer right, whole solution right, first
wrong step and its kind. A candidate set is written once to ArrayRecord (one JSON problem per record:
the problem record and its candidates) with a metadata file beside it, and reused by every run that
asks for the same set: `build` samples only when the file is missing.

A solver is an lwjax run directory or a Hugging Face checkpoint directory (`lwjax.models.pretrained`); one with
a tokenizer of its own (a pretrained model, or a run finetuned from one) reads the problems and writes its
solutions through it, a run trained on a task's words through the task's tokenizer.

  python -m lwjax.candidates --workdir runs/igsm_solver_cpu/weak --task igsm --split test --num 200 \
      --n 32 --out runs/candidates/igsm_weak_test.arrayrecord
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence

import grain
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from lwjax import reasoning_tasks
from lwjax.data import tokenizer as tokenizer_lib
from lwjax.models import pretrained
from lwjax.models.gpt import GPT, GPTConfig
from lwjax.serving import batch_sampler
from lwjax.training import checkpoint

LABEL_FIELDS = ("answer", "answer_correct", "correct", "first_error", "error_kind")
SHARD_PROBLEMS = 1024  # a set of more problems is sampled in shards of about this many, each kept when done


def label(task: reasoning_tasks.ReasoningTask, record: dict, text: str) -> dict:
  """The checker's verdict on one candidate solution of `record`."""
  verdict = task.check(record, text)
  return {"answer": task.answer(text), "answer_correct": bool(verdict.answer_correct),
          "correct": bool(verdict.correct), "first_error": verdict.first_error, "error_kind": verdict.error_kind}


def load_solver(path: str, step: int | None = None, *, param_dtype: str | None = None):
  """A solver: (model, its tokenizer or None, checkpoint step). `path` is an lwjax run directory (checkpoint
  `step`, default the latest; the tokenizer the run keeps beside its checkpoints, None for a run on a task's own
  words) or a Hugging Face checkpoint directory (step 0; `param_dtype` replaces the checkpoint's, e.g. float32
  master weights for a model that will be trained)."""
  if pretrained.kind(path) == "hf":
    if step:
      raise ValueError(f"{path}: a Hugging Face checkpoint has no steps; drop step={step}")
    model, tokenizer = pretrained.load_pretrained(path, param_dtype=param_dtype)
    return model, tokenizer, 0
  merged = pretrained.run_model_dir(path)  # a finished LoRA run: its merged model (saved at the run's last step)
  model, _, step = checkpoint.load_model(os.path.join(merged, pretrained.CHECKPOINTS_DIR),
                                         lambda c: GPT(GPTConfig.from_dict(c["model"]), rngs=nnx.Rngs(0)), step)
  return model, pretrained.load_tokenizer(merged), step


def task_for(task: reasoning_tasks.ReasoningTask, tokenizer) -> reasoning_tasks.ReasoningTask:
  """`task` as a solver with `tokenizer` (None: the task's own) reads and writes it; a data set, which has no
  tokenizer of its own, needs the solver's."""
  if tokenizer is not None:
    return task.with_tokenizer(tokenizer)
  if task.tokenizer is None:
    raise ValueError(f"task {task.name}: a data set has no tokenizer of its own; its solver must be a pretrained "
                     "model (a Hugging Face directory, or a run finetuned from one, which keeps its tokenizer)")
  return task


def forward_flops_per_token(cfg: GPTConfig, context: int) -> float:
  """Sampling cost of one token at `context` tokens: 2 N + its attention over the context."""
  return cfg.decode_flops_per_token(context)


def sample(model: GPT, task: reasoning_tasks.ReasoningTask, records: Sequence[dict], *, n: int,
           temperature: float, max_new_tokens: int, seed: int = 0, top_p: float = 1.0,
           batch_prompts: int = 8, prompt_len: int | None = None, first_index: int = 0,
           encoded: Sequence[list[int]] | None = None, mesh: Mesh | None = None) -> tuple[list[dict], dict]:
  """Samples and labels `n` candidates for every record: ([{"index", "record", "candidates"}], stats). A few-shot
  prompt's continuation is cut at the next problem (`task.trim`); `num_tokens` counts every token sampled.
  `first_index`: the records are a set's from that position on (their indices, and their samples' seeds, are
  the whole set's: `build` samples a large set in shards that give what one call would). `encoded`: the records'
  prompts already tokenized (`encode_prompts`). `mesh`: sampled there (`lwjax.serving.batch_sampler`: weights over
  `tensor`, prompts over the data-parallel axes, `batch_prompts` rounded up to split over them), the samples those
  of one device."""
  tok = task.tokenizer
  prompts = list(encoded) if encoded is not None else encode_prompts(task, records)
  prompt_len = prompt_len or batch_sampler.bucket(max(len(p) for p in prompts))
  if prompt_len + max_new_tokens > model.cfg.max_seq_len:
    raise ValueError(f"max_new_tokens: {prompt_len} prompt tokens + {max_new_tokens} exceed the model's "
                     f"max_seq_len {model.cfg.max_seq_len} (valid: at most {model.cfg.max_seq_len - prompt_len})")
  graphdef, params = nnx.split(model)
  placement = batch_sampler.sampler_shardings(model, mesh)
  if placement is not None:
    params = placement.place_params(params)  # once, not per call
  sample_n = batch_sampler.make_sampler(graphdef, prompt_len=prompt_len, max_new_tokens=max_new_tokens, n=n,
                                        eos_id=tok.eos_id, placement=placement)
  start = time.time()
  with tqdm(total=len(records), desc=f"sampling {n} per problem", unit="problem") as progress:
    samples = batch_sampler.sample_texts(sample_n, params, tok, prompts, n=n, prompt_len=prompt_len,
                                         batch_prompts=batch_sampler.rounded_batch(min(batch_prompts, len(records)),
                                                                                   mesh), seed=seed,
                                         temperature=temperature, top_p=top_p, progress=progress,
                                         first_index=first_index)
  seconds = time.time() - start
  problems = []
  for index, (record, drawn) in enumerate(zip(records, samples, strict=True)):
    candidates = [{"text": text, "num_tokens": num_tokens, **label(task, record, text)}
                  for text, num_tokens in ((task.trim(t), k) for t, k in drawn)]
    problems.append({"index": first_index + index, "record": record, "candidates": candidates})
  return problems, _stats(model.cfg, problems, [len(p) for p in prompts], n=n, temperature=temperature, top_p=top_p,
                          seed=seed, max_new_tokens=max_new_tokens, seconds=seconds)


def encode_prompts(task: reasoning_tasks.ReasoningTask, records: Sequence[dict]) -> list[list[int]]:
  """Each record's prompt as the solver reads it: BOS (where the tokenizer adds one) + the task's prompt."""
  tok = task.tokenizer
  return [tokenizer_lib.bos_prefix(tok) + tok.encode(task.prompt(r)) for r in records]


def _stats(cfg: GPTConfig, problems: Sequence[dict], prompt_lengths: Sequence[int], *, n: int, temperature: float,
           top_p: float, seed: int, max_new_tokens: int, seconds: float) -> dict:
  tokens = sum(c["num_tokens"] for p in problems for c in p["candidates"])
  mean_len = tokens / max(len(problems) * n, 1)
  return {"num_problems": len(problems), "n": n, "temperature": temperature, "top_p": top_p, "seed": seed,
          "max_new_tokens": max_new_tokens, "generated_tokens": tokens, "seconds": seconds,
          "tokens_per_second": tokens / max(seconds, 1e-9),
          "forward_flops_per_token": forward_flops_per_token(cfg, int(np.mean(prompt_lengths) + mean_len / 2)),
          "answer_accuracy": float(np.mean([c["answer_correct"] for p in problems for c in p["candidates"]])),
          "accuracy": float(np.mean([c["correct"] for p in problems for c in p["candidates"]]))}


def sample_in_shards(model: GPT, task: reasoning_tasks.ReasoningTask, records: Sequence[dict], *, parts_dir: str,
                     shard_problems: int, n: int, temperature: float, max_new_tokens: int, seed: int = 0,
                     top_p: float = 1.0, batch_prompts: int = 8, mesh: Mesh | None = None
                     ) -> tuple[list[dict], dict]:
  """`sample` of a large set, resumable: `shard_problems` records at a time (a multiple of `batch_prompts`, so the
  batches are those of one call), each finished shard written to `parts_dir` (json, atomically) and read back by
  a rerun instead of sampled again. One prompt length for every shard, and the whole set's seeds: the problems
  equal one call's. `seconds` sums the shards' sampling times. `mesh` as for `sample`."""
  encoded = encode_prompts(task, records)
  prompt_lengths = [len(p) for p in encoded]
  prompt_len = batch_sampler.bucket(max(prompt_lengths))
  problems, seconds = [], 0.0
  os.makedirs(parts_dir, exist_ok=True)
  for start in range(0, len(records), shard_problems):
    part = os.path.join(parts_dir, f"{start:08d}.json")
    if os.path.isfile(part):
      with open(part) as f:
        done = json.load(f)
      logging.info("candidates %d-%d: read back from %s", start, start + len(done["problems"]) - 1, part)
    else:
      shard, stats = sample(model, task, records[start:start + shard_problems], n=n, temperature=temperature,
                            max_new_tokens=max_new_tokens, seed=seed, top_p=top_p, batch_prompts=batch_prompts,
                            prompt_len=prompt_len, first_index=start,
                            encoded=encoded[start:start + shard_problems], mesh=mesh)
      done = {"problems": shard, "seconds": stats["seconds"]}
      with open(part + ".tmp", "w") as f:
        json.dump(done, f, separators=(",", ":"))
      os.replace(part + ".tmp", part)
    problems += done["problems"]
    seconds += done["seconds"]
  return problems, _stats(model.cfg, problems, prompt_lengths, n=n, temperature=temperature, top_p=top_p, seed=seed,
                          max_new_tokens=max_new_tokens, seconds=seconds)


def greedy(model: GPT, task: reasoning_tasks.ReasoningTask, records: Sequence[dict], *, max_new_tokens: int,
           batch_prompts: int, mesh: Mesh | None = None) -> list[dict]:
  """The checker's verdict on the greedy solution of every record (one label dict each, with its text); `mesh` as
  for `sample`."""
  problems, _ = sample(model, task, records, n=1, temperature=0.0, max_new_tokens=max_new_tokens,
                       batch_prompts=batch_prompts, mesh=mesh)
  return [p["candidates"][0] for p in problems]


def greedy_accuracy(model: GPT, task: reasoning_tasks.ReasoningTask, records: Sequence[dict], *,
                    max_new_tokens: int, batch_prompts: int, mesh: Mesh | None = None) -> dict:
  """Greedy solutions of `records`, checked: full-solution and final-answer accuracy."""
  labels = greedy(model, task, records, max_new_tokens=max_new_tokens, batch_prompts=batch_prompts, mesh=mesh)
  return {"accuracy": float(np.mean([c["correct"] for c in labels])),
          "answer_accuracy": float(np.mean([c["answer_correct"] for c in labels])), "n": len(labels),
          "samples": [c["text"] for c in labels[:3]]}


def write(path: str, problems: Sequence[dict], metadata: dict) -> None:
  """ArrayRecord of the problems and `<path>.json` of the metadata, each written to a temporary name and
  renamed, so a reader sees a whole set or none."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  writer = ArrayRecordWriter(path + ".tmp", "group_size:1")
  try:
    for problem in problems:
      writer.write(json.dumps(problem, separators=(",", ":")).encode("utf-8"))
  finally:
    writer.close()
  with open(path + ".json.tmp", "w") as f:
    json.dump(metadata, f, indent=2)
  os.replace(path + ".tmp", path)
  os.replace(path + ".json.tmp", path + ".json")


def read(path: str) -> tuple[list[dict], dict]:
  """(problems, metadata) of a candidate set written by `write`."""
  with open(path + ".json") as f:
    metadata = json.load(f)
  source = grain.sources.ArrayRecordDataSource([path])
  return [json.loads(source[i]) for i in range(len(source))], metadata


def build(path: str, *, workdir: str, task: str, split: str, num: int, n: int, temperature: float = 0.8,
          max_new_tokens: int = 192, seed: int = 0, record_seed: int = 0, batch_prompts: int = 8,
          task_options: dict | None = None, step: int | None = None,
          loaded: tuple | None = None, mesh: Mesh | None = None) -> tuple[list[dict], dict]:
  """The candidate set at `path`, sampled from the solver `workdir` (an lwjax run, checkpoint `step`, default the
  latest; or a Hugging Face checkpoint directory) when not there yet (else read). `loaded`: the solver as
  `load_solver(workdir, step)` returned it, when the caller holds it already (not read from disk again). `mesh`:
  sampled there (`sample`); the set is the one device's."""
  settings = {"workdir": os.path.abspath(workdir), "task": task, "split": split, "num": num, "n": n,
              "temperature": temperature, "max_new_tokens": max_new_tokens, "seed": seed,
              "record_seed": record_seed, "task_options": task_options or {}}
  if step is not None:
    settings["step"] = step
  settings = json.loads(json.dumps(settings))  # as stored: tuples become lists
  if os.path.isfile(path) and os.path.isfile(path + ".json"):
    problems, metadata = read(path)
    different = {k: (metadata["settings"].get(k), v) for k, v in settings.items()
                 if k != "workdir" and metadata["settings"].get(k) != v}
    if different:
      raise ValueError(f"{path} holds candidates sampled with other settings {different} (stored, asked): "
                       "delete it or choose another path")
    return problems, metadata
  model, tokenizer, step = loaded or load_solver(workdir, step)
  reasoning_task = task_for(reasoning_tasks.get(task, **(task_options or {})), tokenizer)
  records = reasoning_task.records(num, seed=record_seed, split=split)
  batch_prompts = batch_sampler.rounded_batch(batch_prompts, mesh)
  shard = batch_prompts * max(1, SHARD_PROBLEMS // batch_prompts)
  if len(records) <= shard:
    problems, stats = sample(model, reasoning_task, records, n=n, temperature=temperature,
                             max_new_tokens=max_new_tokens, seed=seed, batch_prompts=batch_prompts, mesh=mesh)
  else:  # hours of sampling at the paper's sizes: in shards a stopped run does not redo
    problems, stats = sample_in_shards(model, reasoning_task, records, parts_dir=path + ".parts", shard_problems=shard,
                                       n=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed,
                                       batch_prompts=batch_prompts, mesh=mesh)
  metadata = {"settings": settings, "checkpoint_step": step, "stats": stats}
  write(path, problems, metadata)
  shutil.rmtree(path + ".parts", ignore_errors=True)
  return problems, metadata


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="the solver: its run directory or a Hugging Face checkpoint")
  parser.add_argument("--task", required=True, choices=reasoning_tasks.TASK_NAMES)
  parser.add_argument("--split", default="test", choices=reasoning_tasks.SPLITS)
  parser.add_argument("--num", type=int, default=100, help="problems")
  parser.add_argument("--n", type=int, default=8, help="candidates per problem")
  parser.add_argument("--temperature", type=float, default=0.8)
  parser.add_argument("--max_new_tokens", type=int, default=192)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", required=True, help="ArrayRecord path (metadata in <out>.json)")
  args = parser.parse_args(argv)
  _, metadata = build(args.out, workdir=args.workdir, task=args.task, split=args.split, num=args.num, n=args.n,
                      temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed)
  print(json.dumps(metadata["stats"], indent=2))


if __name__ == "__main__":
  main()
