"""What the detectors read from the generator for each (prompt, answer) (LRP4RAG, arXiv 2408.15533, Sec. 3-4):
the AttnLRP relevance matrix (answer tokens x prompt tokens) and, for the baselines, the attention of the
answer positions to the prompt, gradient x input, and the answer's log-probability and mean entropy; and AttnLRP's
conservation measured on the generator (`conservation`).

Examples are right-padded to buckets of (total length, answer length), each rounded up to a power of two
(`bucket`), and run `batch` at a time (the last batch of a bucket padded with copies of its first row): one
compiled program per bucket, not per (prompt length, answer length), which on RAGTruth would be one per response.
The padding changes no value (`attnlrp.padded_answer_relevance`: it follows every explained position, so causal
attention hides it) and is cut off before the signals are returned. The answer tokens are the greedy answer's
text re-encoded (exact for the word-list tokenizer); an empty answer is explained through the eos the model wrote.
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


def bucket(length: int) -> int:
  """`length` rounded up to a power of two: the padded lengths the signals compile for.

  Powers of two keep the programs few, log2 of the range of lengths per dimension (totals of 300-2,000 tokens and
  answers of 10-500 tokens, RAGTruth-like, take 3 x 6 buckets, fewer in practice as the two go together), at a
  cost of at most 2x (about 1.4x on average) padded work; multiples of 64 would pad less but compile some 28 x 8
  programs for the same range, each ~45 s on CPU for a tiny model.
  """
  return 1 << max(length - 1, 0).bit_length()


def padded_signals(model, tokens_bt, prompt_len_b, answer_len_b, answer_rows: int, relevance_chunk: int | None):
  """Right-padded rows (prompt_len_b [b] prompt tokens, answer_len_b [b] answer tokens, padding) -> [b, R, t]
  relevance, [b, t] attention and gradient x input (prompt columns i < prompt_len, the rest 0), [b] log-probability
  and entropy (R = answer_rows; answer token j is predicted at position prompt_len - 1 + j). One batch of a bucket:
  the step `extract` runs, and the one `lwjax.launch.compile` compiles for a TPU (`job.aot_inference`)."""
  length = tokens_bt.shape[1]
  relevance = attnlrp.padded_answer_relevance(model, tokens_bt, prompt_len_b, answer_len_b, answer_rows,
                                              batch_size=relevance_chunk)
  logits, acts = attnlrp.lrp_forward(model, tokens_bt)  # the GPT's values, with its attention weights
  rows = jnp.arange(answer_rows)
  at_ba = jnp.minimum(prompt_len_b[:, None] - 1 + rows, length - 2)  # rows past the answer: clipped, weighted 0
  weight_ba = (rows < answer_len_b[:, None]) / answer_len_b[:, None].astype(jnp.float32)  # a mean over the answer
  prompt_bt = jnp.arange(length) < prompt_len_b[:, None]
  logp_bav = jax.nn.log_softmax(jnp.take_along_axis(logits, at_ba[..., None], axis=1), axis=-1)
  answer_ba = jnp.take_along_axis(tokens_bt, at_ba + 1, axis=1)
  logp_ba = jnp.take_along_axis(logp_bav, answer_ba[..., None], axis=-1)[..., 0]
  logprob = jnp.sum(jnp.where(weight_ba > 0, logp_ba, 0.0), axis=1)
  entropy = jnp.sum(weight_ba * -jnp.sum(jnp.exp(logp_bav) * logp_bav, axis=-1), axis=1)
  # probs per layer: [b, kv_heads, groups, q, s] -> answer queries, prompt keys, mean over layers/heads/queries.
  per_query = jnp.mean(jnp.stack([jnp.take_along_axis(p, at_ba[:, None, None, :, None], axis=3)
                                  for p in acts["probs"]]), axis=(0, 2, 3))  # [b, R, t]
  attention = jnp.where(prompt_bt, jnp.einsum("ba,bat->bt", weight_ba, per_query), 0.0)
  gxi = baselines.gradient_x_input(model, tokens_bt, at_ba, answer_ba, weight_ba)
  return {"relevance": relevance, "attention": attention, "gradient_x_input": jnp.where(prompt_bt, gxi, 0.0),
          "logprob": logprob, "entropy": entropy}


_signals_jit = nnx.jit(padded_signals, static_argnames=("answer_rows", "relevance_chunk"))


def answer_tokens(tokenizer, answer: str) -> list[int]:
  ids = tokenizer.encode(answer) if answer else []
  return ids or [tokenizer.eos_id]


def extract(model, prompts: list[list[int]], answers: list[list[int]], *, batch: int,
            relevance_chunk: int | None = None) -> list[dict]:
  """Per example (prompt ids with bos, answer ids): {"relevance" [A, P], "attention" [P], "gradient_x_input" [P],
  "logprob", "entropy"} as numpy, the padding cut off."""
  groups = collections.defaultdict(list)
  for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
    groups[(bucket(len(p) + len(a)), bucket(len(a)))].append(i)
  logging.info("signals of %d answers, padded to %d shape(s) (one compilation each): %s", len(prompts), len(groups),
               ", ".join(f"{t} tokens / {a} answer rows x{len(rows)}" for (t, a), rows in sorted(groups.items())))
  out: list[dict | None] = [None] * len(prompts)
  with tqdm(total=len(prompts), desc="relevance and baselines", unit="answer") as progress:
    for (length, answer_rows), rows in sorted(groups.items()):
      for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        padded = chunk + [chunk[0]] * (batch - len(chunk))
        tokens = np.zeros((batch, length), np.int32)
        for j, i in enumerate(padded):
          tokens[j, :len(prompts[i]) + len(answers[i])] = prompts[i] + answers[i]
        prompt_len = np.asarray([len(prompts[i]) for i in padded], np.int32)
        answer_len = np.asarray([len(answers[i]) for i in padded], np.int32)
        values = _signals_jit(model, tokens, prompt_len, answer_len, answer_rows=answer_rows,
                              relevance_chunk=relevance_chunk)
        values = {k: np.asarray(v) for k, v in values.items()}
        for j, i in enumerate(chunk):
          p, a = len(prompts[i]), len(answers[i])
          out[i] = {"relevance": values["relevance"][j, :a, :p], "attention": values["attention"][j, :p],
                    "gradient_x_input": values["gradient_x_input"][j, :p], "logprob": values["logprob"][j],
                    "entropy": values["entropy"][j]}
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
