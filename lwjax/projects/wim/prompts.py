"""The reader's prompts (Writing in the Margins, arXiv 2408.14906, §2), the same in training and at inference:

- margin: `<context up to this segment> ? <query> note` -> `<margin> <eos>` (the paper's extraction prompt)
- relevance: `<bos> query <query> | <margin> rel` -> `yes|no <eos>` (its classification prompt, own cache)
- answer with margins: `<context> margins <m1> | <m2> ... ? <query> ans` -> `<answer> <eos>`
- answer without margins (full context, and retrieval-only over the chosen segments): `<context> ? <query> ans`
  -> `<answer> <eos>`

Each function returns token ids (of `tasks.WiMTokenizer`, or a pretrained reader's own tokenizer); `wim_prompts` is
the serving engine's `WiMPrompts`.
"""

from __future__ import annotations

from collections.abc import Sequence

from lwjax.data.tokenizer import bos_prefix
from lwjax.projects.wim import tasks
from lwjax.serving import wim


def extraction(tok: tasks.WiMTokenizer, query: str) -> list[int]:
  return tok.encode(f"? {query} note")


def classification(tok: tasks.WiMTokenizer, query: str, margin: str) -> list[int]:
  return bos_prefix(tok) + tok.encode(f"query {query} | {margin} rel")


def answer_with_margins(tok: tasks.WiMTokenizer, query: str, margins: Sequence[str]) -> list[int]:
  return tok.encode("margins " + " | ".join(margins) + f" ? {query} ans") if margins else tok.encode(
      f"margins {tasks.NONE} ? {query} ans")


def answer_direct(tok: tasks.WiMTokenizer, query: str) -> list[int]:
  return tok.encode(f"? {query} ans")


def wim_prompts(tok: tasks.WiMTokenizer) -> wim.WiMPrompts:
  yes = tok.encode(tasks.YES)[0]
  return wim.WiMPrompts(
      extraction=lambda query: extraction(tok, query),
      classification=lambda query, margin: classification(tok, query, tok.decode(margin)),
      answer=lambda query, margins: answer_with_margins(tok, query, [tok.decode(m) for m in margins]),
      is_relevant=lambda output: bool(output) and output[0] == yes)
