"""The verifiers and their scores (GenRM, arXiv 2408.15240, §3-4): a discriminative reward model (a scalar
head on the GPT, binary cross-entropy) and generative verifiers scored by p(Yes) after the direct cue, or
by the mean p(Yes) over K sampled CoT rationales.

Scores are for a batch of verification sequences; every function is jitted with fixed shapes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lwjax.models.gpt import GPT, _param, dense
from lwjax.serving import batch_sampler


class RewardModel(nnx.Module):
  """A GPT whose final-normed hidden state at each sequence's last token feeds a scalar head (the logit
  of "correct")."""

  def __init__(self, gpt: GPT, *, rngs: nnx.Rngs):
    self.gpt = gpt
    d = gpt.cfg.d_model
    self.head = _param(rngs, (d, 1), ("embed", None), gpt.cfg.param_dtype, fan_in=d)
    self.bias = nnx.Param(jnp.zeros((1,), gpt.cfg.param_dtype), logical_axes=(None,))

  def gpt_config(self):
    """The wrapped GPT's shape."""
    return self.gpt.cfg

  def __call__(self, tokens_bt, last_b, *, positions_bt=None, segment_ids_bt=None):
    """Logits [b] of "correct" read at position `last_b` of each row."""
    h = self.gpt.final_norm(self.gpt.hidden(tokens_bt, positions_bt=positions_bt, segment_ids_bt=segment_ids_bt))
    h_bd = h[jnp.arange(tokens_bt.shape[0]), last_b]
    return (dense(h_bd.astype(jnp.float32), self.head[...].astype(jnp.float32)) + self.bias[...])[:, 0]


def disc_loss(model: RewardModel, batch):
  """Binary cross-entropy of the head on `label` (1 = correct): (sum loss, weight, metrics)."""
  logits = model(batch["inputs"], batch["last"], positions_bt=batch["positions"], segment_ids_bt=batch["segment_ids"])
  label, weight = batch["label"].astype(jnp.float32), batch["weight"].astype(jnp.float32)
  loss = optax.sigmoid_binary_cross_entropy(logits, label)
  correct = ((logits > 0) == (label > 0.5)) * weight
  return jnp.sum(loss * weight), jnp.sum(weight), {"accuracy": jnp.sum(correct)}


@functools.partial(jax.jit, static_argnums=0)
def _disc_scores(graphdef, params, tokens_bt, last_b):
  return jax.nn.sigmoid(nnx.merge(graphdef, params)(tokens_bt, last_b))


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _p_yes(graphdef, params, tokens_bt, last_b, yes_id: int, no_id: int):
  """p(Yes) at position `last_b` (the next-token distribution after the cue), and p(Yes) + p(No)."""
  logits = nnx.merge(graphdef, params)(tokens_bt)[jnp.arange(tokens_bt.shape[0]), last_b]
  probs = jax.nn.softmax(logits, axis=-1)
  return probs[:, yes_id], probs[:, yes_id] + probs[:, no_id]


def _batches(sequences: list[list[int]], batch: int, seq_len: int):
  """Right-padded [batch, seq_len] token arrays and last indices (the final batch padded with copies)."""
  for start in range(0, len(sequences), batch):
    chunk = sequences[start:start + batch]
    tokens = np.zeros((batch, seq_len), np.int32)
    last = np.zeros(batch, np.int32)
    for i, seq in enumerate(chunk + [chunk[0]] * (batch - len(chunk))):
      if len(seq) > seq_len:
        raise ValueError(f"a verification sequence of {len(seq)} tokens exceeds seq_len={seq_len}")
      tokens[i, :len(seq)], last[i] = seq, len(seq) - 1
    yield len(chunk), tokens, last


def score_disc(model: RewardModel, sequences: list[list[int]], *, batch: int, seq_len: int) -> np.ndarray:
  """sigmoid(head) of each sequence ([bos] question solution, read at its last token)."""
  graphdef, params = nnx.split(model)
  out = [np.asarray(_disc_scores(graphdef, params, t, last))[:n] for n, t, last in _batches(sequences, batch, seq_len)]
  return np.concatenate(out) if out else np.zeros(0)


def score_p_yes(model: GPT, sequences: list[list[int]], *, yes_id: int, no_id: int, batch: int,
                seq_len: int) -> np.ndarray:
  """p(Yes) of the next token after each sequence (ending in the verification cue)."""
  graphdef, params = nnx.split(model)
  out = [np.asarray(_p_yes(graphdef, params, t, last, yes_id, no_id)[0])[:n]
         for n, t, last in _batches(sequences, batch, seq_len)]
  return np.concatenate(out) if out else np.zeros(0)


def score_cot(model: GPT, tokenizer, prompts: list[list[int]], *, k: int, max_new_tokens: int, temperature: float,
              seed: int, batch_prompts: int, prompt_len: int, yes_id: int, no_id: int,
              progress=None) -> tuple[np.ndarray, list[list[str]]]:
  """GenRM-CoT: K rationales sampled after each prompt (`... verify step`); the score of a rationale is
  p(Yes) at its verdict position (after its last `;`, where the verdict word is due), the prompt's score
  the mean over its K rationales (majority voting, §3). Returns (scores [prompts, k], rationales)."""
  graphdef, params = nnx.split(model)
  sample_n = batch_sampler.make_sampler(graphdef, prompt_len=prompt_len, max_new_tokens=max_new_tokens, n=k,
                                        eos_id=tokenizer.eos_id)
  drawn = batch_sampler.sample_texts(sample_n, params, tokenizer, prompts, n=k, prompt_len=prompt_len,
                                     batch_prompts=batch_prompts, seed=seed, temperature=temperature,
                                     progress=progress)
  sequences, texts = [], []
  for prompt, samples in zip(prompts, drawn, strict=True):
    texts.append([text for text, _ in samples])
    for text, _ in samples:
      words = text.split()
      cut = len(words) - 1 - words[::-1].index(";") if ";" in words else len(words)
      body = tokenizer.encode(" ".join(words[:cut + 1])) if ";" in words else tokenizer.encode(" ".join(words))
      sequences.append(prompt + body)
  seq_len = prompt_len + max_new_tokens
  scores = score_p_yes(model, sequences, yes_id=yes_id, no_id=no_id, batch=batch_prompts * k, seq_len=seq_len)
  return scores.reshape(len(prompts), k), texts
