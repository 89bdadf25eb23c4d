"""Conversations rendered by a model's chat template into training rows, the loss on the assistant's turns only.

The assistant's tokens are found by rendering prefixes, not from `{% generation %}` blocks (few Hub templates
have them: Llama-3's, Mistral's and Zephyr's do not). For each assistant message i (after the first message),
the text of messages[:i] with the generation prompt must be a prefix of the text of messages[:i + 1], and what
the second adds is the assistant's turn as the template writes it: its content and end-of-turn token, which the
model has to learn to emit. The whole conversation is then encoded once and a token is the assistant's when its
first character lies in such a turn (character offsets of a `tokenizers` encoding), so the ids are exactly
`apply_chat_template(messages, tokenize=True)`'s. A template that rewrites earlier turns as the conversation
grows (its shorter renderings are not prefixes of the longer ones) is refused.

Rows are padded, one conversation per row, cut to seq_len + 1 tokens (`rows.masked_row`), as the distillation's
other rows are: the trainer's batch format (inputs, targets, loss_mask, segment_ids, positions).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from lwjax.data import chat_template, rows as rows_lib

Messages = Sequence[Mapping[str, str]]


def assistant_spans(tok, messages: Messages) -> tuple[str, list[tuple[int, int]]]:
  """(the conversation's text, the [start, end) character span of each assistant turn in it) under `tok`'s chat
  template (an `HFTokenizer`'s). A ChatTemplateError when the template is not prefix-consistent."""
  text = tok.apply_chat_template(messages)
  spans = []
  for i, message in enumerate(messages):
    if message["role"] != "assistant" or i == 0:  # a conversation opening with the assistant: context only
      continue
    prompt = tok.apply_chat_template(messages[:i], add_generation_prompt=True)
    with_turn = tok.apply_chat_template(messages[:i + 1])
    if not (with_turn.startswith(prompt) and text.startswith(with_turn)):
      raise chat_template.ChatTemplateError(
          f"the chat template of {tok.name} renders message {i} (the assistant's) so that the conversation before "
          "it is not a prefix of the conversation with it; its turns cannot be told apart for the loss mask")
    spans.append((len(prompt), len(with_turn)))
  return text, spans


def encode(tok, messages: Messages, *, last_answer_only: bool = False) -> tuple[list[int], list[float]]:
  """(the ids of the rendered conversation, 1.0 on the assistant's tokens and 0.0 elsewhere); with
  `last_answer_only`, only the last assistant turn's tokens are 1.0 (a preference pair's response)."""
  text, spans = assistant_spans(tok, messages)
  if last_answer_only:
    spans = spans[-1:]
  encoding = tok.tokenizer.encode(text, add_special_tokens=False)
  starts = np.array([start for start, _ in encoding.offsets], np.int64)
  weights = np.zeros(len(starts), np.float32)
  for begin, end in spans:
    weights[(starts >= begin) & (starts < end)] = 1.0
  return list(encoding.ids), weights.tolist()


def prompt_ids(tok, messages: Messages) -> list[int]:
  """The ids of `messages` followed by the generation prompt: what the model answers."""
  return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def sft_row(tok, messages: Messages, seq_len: int) -> dict | None:
  """A padded row of the conversation, the loss on the assistant's tokens; None when none is left after the cut
  to seq_len + 1 tokens."""
  row = rows_lib.masked_row(*encode(tok, messages), seq_len)
  return row if row["loss_mask"].any() else None


def preference_row(tok, chosen: Messages, rejected: Messages, seq_len: int) -> dict | None:
  """A pair as one row of [2, seq_len] fields (chosen first), the loss mask on each last answer; None when either
  answer loses all its tokens in the cut to seq_len + 1."""
  pair = [rows_lib.masked_row(*encode(tok, m, last_answer_only=True), seq_len) for m in (chosen, rejected)]
  if not all(row["loss_mask"].any() for row in pair):
    return None
  return {key: np.stack([pair[0][key], pair[1][key]]) for key in pair[0]}
