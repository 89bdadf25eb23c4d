"""Logit processing before sampling: OpenAI's `logit_bias`, presence and frequency penalties; vLLM's
`repetition_penalty` and `min_tokens`.

Applied to a batch's float32 logits [b, vocab] inside the jitted step, before temperature, top-k and top-p (and
before the logprobs a request asks for: vLLM's `processed_logprobs`), in vLLM's order: the bias, then the
penalties, then the stop ids a row may not sample yet set to -inf. Nothing is kept between steps: each step
reads a row's prompt and output ids (gathers and scatters at those ids, no [b, vocab] array), so preemption,
failure recovery and tokens still in flight on the device (placeholders, which the engine fills before
`process_logits`) need no bookkeeping. A batch where no row asks for any of it passes no arrays and runs the
program without them.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

MAX_LOGIT_BIAS = 300  # entries of a request's logit_bias (OpenAI's limit)
MAX_ABS_LOGIT_BIAS = 100.0  # OpenAI's range of a bias: [-100, 100]
MAX_ABS_PENALTY = 2.0  # OpenAI's range of presence_penalty and frequency_penalty: [-2, 2]
MIN_WIDTH = 8  # the narrowest per-row id list: few shapes to compile


def uses_processing(params) -> bool:
  """Whether a request's `SamplingParams` change its logits (stop_token_ids alone do not: the host stops at them)."""
  return bool(params.logit_bias) or params.min_tokens > 0 or params.presence_penalty != 0.0 or \
      params.frequency_penalty != 0.0 or params.repetition_penalty != 1.0


def _pack(lists: Sequence[Sequence[int]], fill: int, used: bool = True) -> np.ndarray:
  """Ragged id lists as one int32 array [rows, width], padded with `fill`: width 0 where unused, else the power of
  two that holds the longest, at least MIN_WIDTH (few widths: few programs to compile)."""
  longest = max(map(len, lists), default=0)
  out = np.full((len(lists), 1 << (max(longest, MIN_WIDTH) - 1).bit_length() if used else 0), fill, np.int32)
  for row, ids in enumerate(lists):
    out[row, :len(ids)] = ids
  return out


def batch_processing(params: Sequence, prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]],
                     stop_ids: frozenset[int], vocab: int) -> dict[str, np.ndarray] | None:
  """The per-row arrays `process_logits` takes, for the sampled rows' params, prompts and outputs so far (an
  output may end in the engine's placeholder); None when no row processes its logits. Padding ids are `vocab`
  (out of range: dropped by every scatter).

  A row's banned ids (while it has generated fewer than `min_tokens`): its `stop_token_ids` and, unless it
  ignores EOS, the engine's `stop_ids`."""
  if not any(map(uses_processing, params)):
    return None
  penalised = [p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0
               for p in params]
  bias = [dict(p.logit_bias) for p in params]
  bias_ids = _pack([list(b) for b in bias], vocab)
  bias_values = np.zeros(bias_ids.shape, np.float32)
  for row, b in enumerate(bias):
    bias_values[row, :len(b)] = list(b.values())
  banned = [sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else stop_ids)) if len(out) < p.min_tokens
            else [] for p, out in zip(params, outputs, strict=True)]
  # Every list is passed whatever the rows ask (one program for them all), but the prompt: it is long, and only
  # the repetition penalty reads it.
  repeated = [p.repetition_penalty != 1.0 for p in params]
  return {
      "bias_ids": bias_ids, "bias": bias_values, "banned_ids": _pack(banned, vocab),
      "output_ids": _pack([out if pen else [] for out, pen in zip(outputs, penalised, strict=True)], vocab),
      "prompt_ids": _pack([prompt if r else [] for prompt, r in zip(prompts, repeated, strict=True)], vocab,
                          any(repeated)),
      "presence": np.array([p.presence_penalty for p in params], np.float32),
      "frequency": np.array([p.frequency_penalty for p in params], np.float32),
      "repetition": np.array([p.repetition_penalty for p in params], np.float32),
  }


def process_logits(logits_bv, arrays: dict):
  """float32 logits [b, vocab] with each row's bias added, its penalties applied and its banned ids at -inf.

  Penalties, per row: a token seen in the prompt or the output so far (repetition) has a positive logit divided
  by `repetition`, a negative one multiplied (HF's and vLLM's); then OpenAI's
  logit[j] -= presence * (count[j] > 0) + frequency * count[j] over the output's counts. Every step reads and
  writes the logits at the rows' ids only, never a [b, vocab] count array (a 32k-128k vocabulary made that most
  of a step on CPU): a repeated id sets the same value again (the repetition and presence terms, once per id) or
  adds once per occurrence (the frequency term, the count)."""
  rows = jnp.arange(logits_bv.shape[0])[:, None]
  logits = jnp.asarray(logits_bv, jnp.float32).at[rows, arrays["bias_ids"]].add(arrays["bias"], mode="drop")
  output_ids = arrays["output_ids"]
  if arrays["prompt_ids"].shape[1]:  # some row has a repetition penalty
    seen = jnp.concatenate([arrays["prompt_ids"], output_ids], axis=1)
    value = logits.at[rows, seen].get(mode="fill", fill_value=0.0)
    repetition = arrays["repetition"][:, None]
    logits = logits.at[rows, seen].set(jnp.where(value > 0, value / repetition, value * repetition), mode="drop")
  logits = logits.at[rows, output_ids].add(-arrays["frequency"][:, None], mode="drop")
  value = logits.at[rows, output_ids].get(mode="fill", fill_value=0.0)
  logits = logits.at[rows, output_ids].set(value - arrays["presence"][:, None], mode="drop")
  return logits.at[rows, arrays["banned_ids"]].set(-jnp.inf, mode="drop")
