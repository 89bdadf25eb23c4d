"""LRP4RAG on RAGTruth (arXiv 2408.15533, §4): the detectors on the published responses instead of the generated task.

Each response of the selection (`data.splits`, `data.task_types`, `data.models`; the paper: QA responses of
Llama-2-7b-chat) is explained by the pretrained model (`model.pretrained`, read as it is): the prompt is RAGTruth's
own (instruction, retrieved content and question), in the model's chat template as a user turn when it has one,
the answer is the given response, teacher-forced; its label is whether any span of it is annotated as a
hallucination. Signals and detectors as on the generated task (`signals`, `detectors`), less self-consistency,
which needs answers sampled from the model that wrote the response. Responses longer than the model's context
are left out (counted). `<workdir>/metrics.json`: the class balance per task type and per model, conservation,
per-detector accuracy / precision / recall / F1 over the folds (hallucinated = positive), accuracy per task type.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import pathlib
import random

import jax
import numpy as np

from lwjax.config import ConfigError
from lwjax.data import ragtruth
from lwjax.data.tokenizer import bos_prefix
from lwjax.models import pretrained
from lwjax.projects.lrp4rag import detectors, signals

SETS = ("generated", "ragtruth")


def data_set(config) -> str:
  return config.data.get("set", "generated") if "data" in config else "generated"


def _names(value: str) -> tuple[str, ...]:
  return tuple(v for v in value.split(",") if v)


def validate(config, on_disk: bool = True) -> None:
  """What reading RAGTruth needs beyond the schema: a pretrained model (checked first), the files' directory, known
  splits and task types. `on_disk=False` (a compile of the shape named by `model_preset`): neither the model nor
  the files need be on this machine."""
  if on_disk and not config.model.pretrained:
    raise ConfigError("model.pretrained", "empty: RAGTruth's responses are explained by a pretrained model",
                      "a Hugging Face checkpoint with its tokenizer, e.g. /models/Llama-2-7b-chat-hf (the paper's)")
  d = config.data
  for key, allowed in (("splits", ragtruth.SPLITS), ("task_types", ragtruth.TASK_TYPES)):
    given = _names(d.get(key, ""))
    if not given or any(v not in allowed for v in given):
      raise ConfigError(f"data.{key}", f"{d.get(key, '')!r}: expected comma-separated names", ", ".join(allowed))
  for key in ("seq_len", "num_train"):
    if key in d:
      raise ConfigError(f"data.{key}", "unused on RAGTruth (nothing is trained)", "absent")
  if not on_disk:
    return
  if not d.get("path"):
    raise ConfigError("data.path", "empty: RAGTruth is read from its published files",
                      "the directory holding source_info.jsonl and response.jsonl, e.g. /data/RAGTruth/dataset")
  if not pathlib.Path(d.path).expanduser().exists():
    raise ConfigError("data.path", f"{d.path} does not exist", "RAGTruth's dataset directory")


def prompt_ids(tok, prompt: str) -> list[int]:
  """RAGTruth's prompt as the model reads it: a user turn of its chat template, else after its bos."""
  if getattr(tok, "chat_template", None) is not None:
    return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
  return bos_prefix(tok) + tok.encode(prompt)


def _balance(responses, key) -> dict:
  groups = collections.defaultdict(list)
  for r in responses:
    groups[getattr(r, key)].append(r.hallucinated)
  return {g: {"n": len(v), "hallucinated": float(np.mean(v))} for g, v in sorted(groups.items())}


def run(config, workdir: str) -> dict:
  d, e = config.data, config.eval
  responses = ragtruth.load(d.path, splits=_names(d.splits), task_types=_names(d.task_types),
                            models=_names(d.models))
  model, tok = pretrained.load_pretrained(config.model.pretrained,
                                          **{k: config.model[k] for k in pretrained.RUNTIME_FIELDS})
  examples = [(r, prompt_ids(tok, r.prompt), signals.answer_tokens(tok, r.response)) for r in responses]
  fits = [x for x in examples if len(x[1]) + len(x[2]) <= model.cfg.max_seq_len]
  too_long = len(examples) - len(fits)
  if len(fits) > e.num:
    fits = [fits[i] for i in sorted(random.Random(config.seed).sample(range(len(fits)), e.num))]
  if not fits:
    raise ConfigError("model.pretrained", f"none of the {len(examples)} selected responses fits its context of "
                      f"{model.cfg.max_seq_len} tokens with its prompt", "a model with a longer context")
  chosen = [r for r, _, _ in fits]
  prompts, answers = [p for _, p, _ in fits], [a for _, _, a in fits]
  labels = np.asarray([r.hallucinated for r in chosen], np.int64)
  metrics = {"generator": {"source": "pretrained", "checkpoint": config.model.pretrained},
             "data": {"set": "ragtruth", "path": d.path, "splits": d.splits, "task_types": d.task_types,
                      "models": d.models},
             "seed": config.seed, "selected": len(responses), "too_long": too_long,
             "n": len(chosen), "hallucinated": int(labels.sum()), "hallucination_rate": float(labels.mean()),
             "by_group": _balance(chosen, "task_type"), "by_model": _balance(chosen, "model")}
  logging.info("RAGTruth: %d responses selected, %d left out as longer than the context, %d explained: %d "
               "hallucinated (%.1f%%)", len(responses), metrics["too_long"], len(chosen), metrics["hallucinated"],
               100 * metrics["hallucination_rate"])
  detected, _ = detectors.explain_and_detect(model, prompts, answers, labels, [r.task_type for r in chosen], None,
                                             config)
  metrics.update(detected)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump(metrics, f, indent=2)
  return metrics
