"""Token sampling for serving: greedy, temperature, top-k, top-p, per-request seeds (NanoFlow §4 engine).

Every row of a dense batch carries its own parameters, so one jitted `sample` serves a batch that mixes
greedy and stochastic requests. A request's randomness depends only on its seed and the index of the
token it generates, never on which other requests share the batch. The logits a request's bias, penalties and
min_tokens change are processed before `sample` (`lwjax.serving.logits_processors`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lwjax.serving.logits_processors import MAX_ABS_LOGIT_BIAS, MAX_ABS_PENALTY, MAX_LOGIT_BIAS

MAX_TOP_LOGPROBS = 20  # the most alternatives a token's logprobs report (OpenAI's limit)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """What a request asks of generation (the OpenAI / vLLM fields)."""
  max_tokens: int = 16
  temperature: float = 1.0  # 0 = greedy
  top_k: int = 0  # 0 = no limit
  top_p: float = 1.0
  seed: int | None = None
  stop: tuple[str, ...] = ()
  n: int = 1
  ignore_eos: bool = False
  logprobs: int | None = None  # report each generated token's logprob and this many top alternatives (0-20)
  prompt_logprobs: int | None = None  # the same for each prompt token after the first (no prefix-cache sharing)
  # Logit processing (`lwjax.serving.logits_processors`): OpenAI's bias ({token id: bias}, kept as sorted
  # (id, bias) pairs) and penalties over the output so far; vLLM's repetition penalty over prompt and output.
  logit_bias: tuple[tuple[int, float], ...] = ()
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  repetition_penalty: float = 1.0
  min_tokens: int = 0  # the stop ids (the engine's unless ignore_eos, and stop_token_ids) are masked until then
  stop_token_ids: tuple[int, ...] = ()  # ids that end generation (vLLM's), beside the engine's stop ids

  def __post_init__(self):
    object.__setattr__(self, "stop", tuple(self.stop) if not isinstance(self.stop, str) else (self.stop,))
    object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
    object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
    for name, ok, valid in (
        ("max_tokens", self.max_tokens >= 1, ">= 1"),
        ("temperature", 0.0 <= self.temperature <= 100.0, "0 (greedy) to 100"),
        ("top_k", self.top_k >= 0, ">= 0 (0 = no limit)"),
        ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
        ("n", 1 <= self.n <= 128, "1 to 128"),
        ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS, f"0 to {MAX_TOP_LOGPROBS}"),
        ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS,
         f"0 to {MAX_TOP_LOGPROBS}"),
        ("presence_penalty", -MAX_ABS_PENALTY <= self.presence_penalty <= MAX_ABS_PENALTY,
         f"-{MAX_ABS_PENALTY} to {MAX_ABS_PENALTY}"),
        ("frequency_penalty", -MAX_ABS_PENALTY <= self.frequency_penalty <= MAX_ABS_PENALTY,
         f"-{MAX_ABS_PENALTY} to {MAX_ABS_PENALTY}"),
        ("repetition_penalty", 0.0 < self.repetition_penalty < math.inf, "> 0 and finite (1: none)"),
        ("min_tokens", 0 <= self.min_tokens <= self.max_tokens, f"0 to max_tokens ({self.max_tokens})"),
        ("stop_token_ids", all(isinstance(t, (int, np.integer)) and t >= 0 for t in self.stop_token_ids),
         "token ids >= 0"),
    ):
      if not ok:
        raise ValueError(f"{name}: {getattr(self, name)!r} is invalid (valid: {valid})")
    if any(not s for s in self.stop):
      raise ValueError("stop: empty stop strings are invalid (valid: non-empty strings)")


def _bias_pairs(bias) -> tuple[tuple[int, float], ...]:
  """A logit_bias ({token id (an int, or its decimal string): bias} or (id, bias) pairs) as sorted (int, float)
  pairs; ValueError naming `logit_bias` for a key that is no token id, a bias outside [-100, 100], or more than
  300 entries (OpenAI's limits)."""
  items = bias.items() if isinstance(bias, dict) else bias
  pairs = {}
  for key, value in items:
    if not (isinstance(key, (int, np.integer)) or (isinstance(key, str) and key.isascii() and key.isdigit())):
      raise ValueError(f"logit_bias: key {key!r} is not a token id (valid: a token id >= 0, as a decimal string)")
    token = int(key)
    if not -MAX_ABS_LOGIT_BIAS <= value <= MAX_ABS_LOGIT_BIAS:
      raise ValueError(f"logit_bias: the bias {value!r} of token {token} is outside [-{MAX_ABS_LOGIT_BIAS:g}, "
                       f"{MAX_ABS_LOGIT_BIAS:g}]")
    pairs[token] = float(value)
  if len(pairs) > MAX_LOGIT_BIAS:
    raise ValueError(f"logit_bias: {len(pairs)} entries (valid: at most {MAX_LOGIT_BIAS})")
  if any(t < 0 for t in pairs):
    raise ValueError("logit_bias: token ids must be >= 0")
  return tuple(sorted(pairs.items()))


@jax.jit
def sample(logits_bv, temperature_b, top_k_b, top_p_b, seed_b, step_b):
  """Next tokens [b] from float32 logits [b, vocab] with per-row parameters.

  temperature 0 picks the argmax; top_k 0 keeps every token; the nucleus keeps the smallest set of
  most likely tokens whose probability reaches top_p (always at least one). A batch with no stochastic
  row skips the sort of the vocabulary (a `lax.cond`: most of a greedy step's sampling time).
  """
  greedy = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)

  def stochastic(_):
    vocab = logits_bv.shape[-1]
    scaled = logits_bv / jnp.maximum(temperature_b, 1e-6)[:, None]
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    keep = rank < jnp.where(top_k_b > 0, top_k_b, vocab)[:, None]
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep &= mass_before < top_p_b[:, None]
    sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)
    keys = jax.vmap(lambda s, t: jax.random.fold_in(jax.random.key(s), t))(seed_b, step_b)
    choice = jax.vmap(jax.random.categorical)(keys, sorted_logits)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    return jnp.where(temperature_b > 0, sampled, greedy).astype(jnp.int32)

  return jax.lax.cond(jnp.any(temperature_b > 0), stochastic, lambda _: greedy, None)


@functools.partial(jax.jit, static_argnums=6)
def sample_with_logprobs(logits_bv, temperature_b, top_k_b, top_p_b, seed_b, step_b, num_top: int):
  """`sample`'s tokens, and from the same logits: each token's logprob [b] and the `num_top` most likely tokens
  [b, num_top] with their logprobs. The logprobs are the model's own log-softmax, before temperature, top-k and
  top-p (vLLM's default `raw_logprobs`): a token's probability under the model, whatever the sampling."""
  tokens = sample(logits_bv, temperature_b, top_k_b, top_p_b, seed_b, step_b)
  logprobs = jax.nn.log_softmax(logits_bv.astype(jnp.float32), axis=-1)
  chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
  top_logprobs, top_ids = jax.lax.top_k(logprobs, num_top)
  return tokens, (chosen, top_ids.astype(jnp.int32), top_logprobs)


@functools.partial(jax.jit, static_argnums=2)
def token_logprobs(logits_btv, targets_bt, num_top: int):
  """Per position of [b, t] logits: the logprob of `targets_bt` (the next prompt token) and the `num_top` most
  likely tokens with their logprobs (the model's log-softmax, as `sample_with_logprobs`)."""
  logprobs = jax.nn.log_softmax(logits_btv.astype(jnp.float32), axis=-1)
  chosen = jnp.take_along_axis(logprobs, targets_bt[..., None], axis=-1)[..., 0]
  top_logprobs, top_ids = jax.lax.top_k(logprobs, num_top)
  return chosen, top_ids.astype(jnp.int32), top_logprobs


def batch_arrays(params: Sequence[SamplingParams], seeds: Sequence[int], steps: Sequence[int]) -> tuple:
  """The per-row arrays `sample` takes, for requests' params, resolved seeds and token indices."""
  top_k = [min(p.top_k, np.iinfo(np.int32).max) for p in params]  # past the vocabulary, any k keeps every token
  return (np.array([p.temperature for p in params], np.float32), np.array(top_k, np.int32),
          np.array([p.top_p for p in params], np.float32), np.array(seeds, np.uint32),
          np.array(steps, np.int32))
