"""What the detectors read from the generator for each (prompt, answer) (LRP4RAG, arXiv 2408.15533, Sec. 3-4):
the AttnLRP relevance matrix (answer tokens x prompt tokens) and, for the baselines, the attention of the
answer positions to the prompt, gradient x input, and the answer's log-probability and mean entropy.

Examples are grouped by (prompt length, answer length), the static shapes of `attnlrp.answer_relevance`, and
run `batch` at a time (the last batch of a group padded with copies of its first row), so each group compiles
once. The answer tokens are the greedy answer's text re-encoded (exact for the word-list tokenizer); an empty
answer is explained through the eos the model wrote.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from lwjax.relevance import attnlrp, baselines


def _signals(model, tokens_bt, prompt_len: int, relevance_chunk: int | None):
  """[b, A, P] relevance, [b, P] attention and gradient x input, [b] log-probability and entropy (A = answer
  tokens, P = prompt tokens; answer token j is predicted at position P - 1 + j)."""
  answer = tokens_bt.shape[1] - prompt_len
  relevance = attnlrp.answer_relevance(model, tokens_bt, prompt_len, batch_size=relevance_chunk)
  logits, acts = attnlrp.lrp_forward(model, tokens_bt)  # the GPT's values, with its attention weights
  at = slice(prompt_len - 1, prompt_len - 1 + answer)
  logp_bav = jax.nn.log_softmax(logits[:, at], axis=-1)
  answer_ba = tokens_bt[:, prompt_len:]
  logprob = jnp.sum(jnp.take_along_axis(logp_bav, answer_ba[..., None], axis=-1)[..., 0], axis=1)
  entropy = jnp.mean(-jnp.sum(jnp.exp(logp_bav) * logp_bav, axis=-1), axis=1)
  # probs per layer: [b, kv_heads, groups, q, s] -> answer queries, prompt keys, mean over layers/heads/queries.
  attention = jnp.mean(jnp.stack([p[:, :, :, at, :prompt_len] for p in acts["probs"]]), axis=(0, 2, 3, 4))
  gxi = sum(baselines.gradient_x_input(model, tokens_bt, prompt_len - 1 + j, tokens_bt[:, prompt_len + j])
            [:, :prompt_len] for j in range(answer)) / answer
  return {"relevance": relevance, "attention": attention, "gradient_x_input": gxi, "logprob": logprob,
          "entropy": entropy}


_signals_jit = nnx.jit(_signals, static_argnames=("prompt_len", "relevance_chunk"))


def answer_tokens(tokenizer, answer: str) -> list[int]:
  ids = tokenizer.encode(answer) if answer else []
  return ids or [tokenizer.eos_id]


def extract(model, prompts: list[list[int]], answers: list[list[int]], *, batch: int,
            relevance_chunk: int | None = None) -> list[dict]:
  """Per example (prompt ids with bos, answer ids): {"relevance" [A, P], "attention" [P], "gradient_x_input" [P],
  "logprob", "entropy"} as numpy."""
  groups = collections.defaultdict(list)
  for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
    groups[(len(p), len(a))].append(i)
  out: list[dict | None] = [None] * len(prompts)
  with tqdm(total=len(prompts), desc="relevance and baselines", unit="answer") as progress:
    for (prompt_len, _), rows in sorted(groups.items()):
      for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        padded = chunk + [chunk[0]] * (batch - len(chunk))
        tokens = np.asarray([prompts[i] + answers[i] for i in padded], np.int32)
        values = _signals_jit(model, jnp.asarray(tokens), prompt_len=prompt_len, relevance_chunk=relevance_chunk)
        values = {k: np.asarray(v) for k, v in values.items()}
        for j, i in enumerate(chunk):
          out[i] = {k: v[j] for k, v in values.items()}
        progress.update(len(chunk))
  return out
