"""What the detectors read from the generator for each (prompt, answer) (LRP4RAG, arXiv 2408.15533, Sec. 3-4):
the AttnLRP relevance matrix (answer tokens x prompt tokens) and, for the baselines, the attention of the
answer positions to the prompt, gradient x input, and the answer's log-probability and mean entropy; and AttnLRP's
conservation measured on the generator (`conservation`).

Examples are grouped by (prompt length, answer length), the static shapes of `attnlrp.answer_relevance`, and
run `batch` at a time (the last batch of a group padded with copies of its first row), so each group compiles
once. The answer tokens are the greedy answer's text re-encoded (exact for the word-list tokenizer); an empty
answer is explained through the eos the model wrote.
"""

from __future__ import annotations

import collections
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from lwjax.relevance import attnlrp, baselines

CONSERVATION_EXAMPLES = 64  # held-out answers whose first token's logit is explained layer by layer


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


_conservation_report = nnx.jit(attnlrp.conservation_report)


def conservation(model, prompt_ids, answer_ids, *, batch: int) -> dict:
  """AttnLRP's conservation (`attnlrp.conservation_report`) measured on the generator: the logit of the first
  answer token of the first CONSERVATION_EXAMPLES held-out answers, explained from the prompt; medians over the
  examples (per layer for the layer errors), logged."""
  rows = list(range(min(CONSERVATION_EXAMPLES, len(prompt_ids))))
  length = max(len(prompt_ids[i]) + len(answer_ids[i]) for i in rows)
  # Right padding leaves everything up to the explained position unchanged (causal attention; it gets exactly 0
  # relevance): one shape, one compilation. The last chunk is padded with copies of its first row.
  tokens = np.zeros((len(rows), length), np.int32)
  for i in rows:
    seq = prompt_ids[i] + answer_ids[i]
    tokens[i, :len(seq)] = seq
  position = np.asarray([len(prompt_ids[i]) - 1 for i in rows], np.int32)
  target = np.asarray([answer_ids[i][0] for i in rows], np.int32)
  size, parts = min(batch, len(rows)), []
  for start in range(0, len(rows), size):
    chunk = list(range(start, min(start + size, len(rows))))
    padded = chunk + [chunk[0]] * (size - len(chunk))
    out = _conservation_report(model, tokens[padded], position[padded], target[padded])
    parts.append({k: np.asarray(v)[:len(chunk)] for k, v in out.items()})
  r = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  result = {
      "n": len(rows), "total_error_median": float(np.median(r["total_error"])),
      "total_error_mean": float(np.mean(r["total_error"])),
      "input_sum_over_logit_median": float(np.median(r["layer_sums"][:, 0] / r["logit"])),
      "softmax_absorbed_share_median": float(np.median(r["softmax_absorbed"].sum(axis=1) / r["logit"])),
      "head_error_median": float(np.median(r["head_error"])),
      "rule_error_median": np.median(r["rule_error"], axis=0).tolist(),
      "layer_error_median": np.median(r["layer_error"], axis=0).tolist(),
      "logit_median": float(np.median(r["logit"])),
  }
  logging.info("conservation on the generator (first answer token of %d held-out answers, medians): sum of the "
               "input relevance / logit %.3f (the softmax rule absorbs %.3f of the logit), total error %.3g (mean "
               "%.3g), per-layer rule error %s, per-layer error %s, head error %.2g", result["n"],
               result["input_sum_over_logit_median"], result["softmax_absorbed_share_median"],
               result["total_error_median"], result["total_error_mean"],
               " ".join(f"{x:.1e}" for x in result["rule_error_median"]),
               " ".join(f"{x:.3f}" for x in result["layer_error_median"]), result["head_error_median"])
  return result
