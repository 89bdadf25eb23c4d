"""The distillation's chat data, as the paper trains its chat models (arXiv 2408.15237, Sec. 3 and its recipe):
UltraChat conversations (`data.sft_path`) and binarized UltraFeedback pairs (`data.dpo_path`) rendered by the
teacher's chat template.

- Stage-1 prompts: each conversation up to its first answer, rendered with the generation prompt (the teacher
  answers them: the pseudo-labels), those of at most `distill.prompt_len` tokens.
- SFT and evaluation rows: whole conversations, the loss on the assistant's turns only (train_sft, test_sft).
- DPO pairs: chosen and rejected conversations, the loss mask on each final answer (train_prefs, test_prefs).
Rows are padded, one conversation per row, cut to `data.seq_len` + 1 tokens (`lwjax.data.chat_rows`); a row left
without an answer token by the cut is dropped, and the number dropped is logged.
"""

from __future__ import annotations

import logging

import numpy as np

from lwjax.config import ConfigError
from lwjax.data import chat_rows, chat_sets, chat_template

SFT_SPLITS = ("train_sft", "test_sft")
DPO_SPLITS = ("train_prefs", "test_prefs")


def check(config, tok) -> None:
  """Before any heavy work: the teacher's tokenizer has a chat template, and the splits the run reads exist."""
  if tok is None or not getattr(tok, "chat_template", None):
    raise ConfigError("data.source", f"'chat' renders conversations with the teacher's chat template; "
                      f"{config.teacher.workdir} has none", "documents, or a teacher with a chat template")
  for split in SFT_SPLITS:
    chat_sets.split_files(config.data.sft_path, split, "data.sft_path")
  if config.dpo.steps:
    for split in DPO_SPLITS:
      chat_sets.split_files(config.data.dpo_path, split, "data.dpo_path")


def _rendered(rows, what: str, render) -> list:
  """`render(row)` of each row; a chat template that refuses one (or cannot mask it) is a one-line error."""
  out = []
  for number, row in enumerate(rows):
    try:
      out.append(render(row))
    except chat_template.ChatTemplateError as e:
      raise ConfigError("teacher.workdir", f"{what} row {number}: {e}",
                        "a teacher whose chat template renders the set's conversations") from None
  return out


def _first(dataset, limit: int):
  return (dataset[i] for i in range(min(limit, len(dataset))))


def _kept(rows: list, what: str, read: int) -> list:
  kept = [row for row in rows if row is not None]
  if len(kept) < read:
    logging.info("%s: %d of %d rows have no answer token within data.seq_len; dropped", what, read - len(kept), read)
  if not kept:
    raise ConfigError("data.seq_len", f"{what}: no row keeps an answer token within it", "a longer data.seq_len")
  return kept


def sft_rows(data, tok, split: str, limit: int) -> list[dict]:
  """The first `limit` UltraChat conversations of `split` as rows, the loss on the assistant's turns."""
  rows = _rendered(_first(chat_sets.ultrachat(data.sft_path, split), limit), f"UltraChat {split}",
                   lambda r: chat_rows.sft_row(tok, r["messages"], data.seq_len))
  return _kept(rows, f"UltraChat {split}", len(rows))


def prompts(data, tok, prompt_len: int, limit: int) -> list[np.ndarray]:
  """Prompt ids of the first `limit` train_sft conversations (each up to its first answer), those of at most
  `prompt_len` tokens."""
  def prompt(row):  # int32 arrays: 200k prompts as lists of Python ints would take a gigabyte
    messages = row["messages"]
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    ids = chat_rows.prompt_ids(tok, messages[:first]) if first else []
    return np.asarray(ids, np.int32) if 0 < len(ids) <= prompt_len else None
  candidates = _rendered(_first(chat_sets.ultrachat(data.sft_path, "train_sft"), limit), "UltraChat train_sft", prompt)
  found, read = [ids for ids in candidates if ids is not None], len(candidates)
  if not found:
    raise ConfigError("distill.prompt_len", f"none of {read} UltraChat prompts has at most {prompt_len} tokens",
                      "a larger distill.prompt_len")
  logging.info("stage-1 prompts: %d of %d UltraChat prompts within distill.prompt_len", len(found), read)
  return found


def preference_rows(data, tok, split: str, limit: int) -> list[dict]:
  """The first `limit` UltraFeedback pairs of `split` as [2, seq_len] rows (chosen, rejected)."""
  rows = _rendered(_first(chat_sets.ultrafeedback(data.dpo_path, split), limit), f"UltraFeedback {split}",
                   lambda r: chat_rows.preference_row(tok, r["chosen"], r["rejected"], data.seq_len))
  return _kept(rows, f"UltraFeedback {split}", len(rows))
