"""Exact greedy speculative decoding for GPTs and Mamba hybrids (The Mamba in the Llama, arXiv 2408.15237, Sec. 4).

A cheap draft model proposes k tokens; the target checks them in one pass and keeps the longest prefix that
its own greedy decoding would have produced, plus one token of its own. For a hybrid target the pass is
`HybridGPT.verify`: each Mamba layer advances from its checkpointed state over the k + 1 inputs and keeps the
state after the accepted ones only (the multi-step state update's `accepted` argument), so a rejection costs
no stored per-step states; the attention layers' extra keys are hidden by the shorter length. A GPT target
(or draft) rolls back by setting its KV length. The output is the target's own greedy decoding, exactly.

Per round: the draft proposes k tokens in one compiled loop, the target verifies them in one call; so a round
costs two dispatches and yields between 1 and k + 1 tokens.

With a `mesh` (the engine's, `tensor_parallel.serving_mesh`), target and draft run tensor parallel as the engine
serves them (`lwjax.serving.tensor_parallel`): weights over `tensor` by their logical axes, KV caches over kv heads,
a hybrid's Mamba states over heads; the tokens are those of one device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lwjax.models import logical
from lwjax.serving import tensor_parallel
from lwjax.training.mesh import SERVING_RULES


def _forward(model, tokens_bt, cache, accepted):
  """The target's pass over t tokens: (logits [b, t, vocab], cache advanced by `accepted [b]` of them)."""
  if hasattr(model, "verify"):
    return model.verify(tokens_bt, cache, accepted)
  logits, cache = model.prefill(tokens_bt, cache)
  return logits, dataclasses.replace(cache, lengths=cache.lengths - tokens_bt.shape[1] + accepted)


def on_mesh(model, mesh: jax.sharding.Mesh | None, rules=SERVING_RULES):
  """(`model` with its weights placed on `mesh` under `rules`, a copy; (mesh, rules), the static argument of the
  compiled steps: the rules their activations are constrained by), or (`model`, None) without a mesh. A
  ValueError (a ConfigError naming the model key) when the mesh does not split over `tensor` alone or does not
  divide the model's heads, kv heads, MLP hidden or vocabulary."""
  if mesh is None:
    return model, None
  cfg = model.gpt_config()
  tensor_parallel.check_mesh(mesh.shape)
  tensor_parallel.check_shapes(cfg, mesh.shape, rules)
  graphdef, state = nnx.split(model)
  placement = tensor_parallel.EngineShardings.build(state, cfg.n_kv_heads, mesh, rules)
  return nnx.merge(graphdef, placement.place_params(state)), (placement.mesh, placement.rules)


def _rules(placement):
  """The context of a compiled step: `placement`'s (mesh, rules) installed, or nothing on one device."""
  return contextlib.nullcontext() if placement is None else logical.axis_rules(*placement)


@functools.partial(nnx.jit, static_argnames=("k", "placement"))
def _draft(draft, feed_bt, num_feed, cache, k: int, placement=None):
  """The draft reads `feed` (right-padded, `num_feed [b]` real tokens) and proposes k greedy tokens [b, k]; its
  cache is returned holding the feed only (the proposals are re-fed next round if accepted)."""
  with _rules(placement):
    return _propose(draft, feed_bt, num_feed, cache, k)


def _propose(draft, feed_bt, num_feed, cache, k: int):
  logits, cache = draft.prefill(feed_bt, cache, num_new=num_feed)
  first = jnp.argmax(jnp.take_along_axis(logits, (num_feed - 1)[:, None, None], axis=1)[:, 0], -1).astype(
      jnp.int32)

  def body(carry, _):
    token, cache = carry
    logits, cache = draft.decode_step(token, cache)
    nxt = jnp.argmax(logits, -1).astype(jnp.int32)
    return (nxt, cache), nxt
  _, rest = jax.lax.scan(body, (first, cache), None, length=k - 1)
  return jnp.concatenate([first[:, None], rest.T], axis=1), cache  # the cache as it was after the feed


@functools.partial(nnx.jit, static_argnames="placement")
def _verify(target, tokens_bt, num_feed, cache, placement=None):
  """One target pass over [feed, proposals, padding] that commits the feed only (verified last round): the
  target's greedy choice after every input [b, t] and the new cache."""
  with _rules(placement):
    logits, cache = _forward(target, tokens_bt, cache, num_feed)
  return jnp.argmax(logits, -1).astype(jnp.int32), cache


@functools.partial(nnx.jit, static_argnames="placement")
def _prefill(model, tokens_bt, cache, placement=None):
  with _rules(placement):
    return model.prefill(tokens_bt, cache)


def generate(target, draft, prompt_ids, max_new_tokens: int, *, k: int = 4, max_len: int | None = None,
             mesh: jax.sharding.Mesh | None = None, rules=SERVING_RULES):
  """Greedy continuation of one prompt by `target`, with `draft` proposing k tokens a round.

  The target's state is committed lazily, as the paper's verification: a round's pass starts from the state
  after the tokens verified in earlier rounds, re-reads the tokens accepted in the previous round (the feed,
  1 to k + 1 of them) followed by the k new proposals, and commits the feed only; the newly accepted tokens
  and the target's own next token become the next feed. So one pass per round, no per-step states stored,
  and shapes fixed (feed + proposals padded to 2k + 1).

  Returns (tokens [max_new_tokens], stats: rounds, proposed, accepted, acceptance_rate, tokens_per_round).
  Equal to the target's greedy decoding (`greedy`), up to float ties. `mesh`: both models tensor parallel over
  it under `rules` (`on_mesh`)."""
  prompt = np.asarray(prompt_ids, np.int32)[None]
  width = 2 * k + 1
  max_len = max_len or prompt.shape[1] + max_new_tokens + width + 1
  (target, t_place), (draft, d_place) = on_mesh(target, mesh, rules), on_mesh(draft, mesh, rules)
  t_cache, d_cache = target.init_cache(1, max_len), draft.init_cache(1, max_len)
  if prompt.shape[1] > 1:
    _, t_cache = _prefill(target, jnp.asarray(prompt[:, :-1]), t_cache, t_place)
    _, d_cache = _prefill(draft, jnp.asarray(prompt[:, :-1]), d_cache, d_place)
  feed = [int(prompt[0, -1])]
  out, rounds, accepted_total = [], 0, 0
  while len(out) < max_new_tokens:
    f = len(feed)
    feed_row = np.zeros((1, k + 1), np.int32)
    feed_row[0, :f] = feed
    num_feed = jnp.full((1,), f, jnp.int32)
    proposals, d_cache = _draft(draft, jnp.asarray(feed_row), num_feed, d_cache, k, d_place)
    proposals = np.asarray(proposals)[0]
    row = np.zeros((1, width), np.int32)
    row[0, :f], row[0, f:f + k] = feed, proposals
    choice, t_cache = _verify(target, jnp.asarray(row), num_feed, t_cache, t_place)
    choice = np.asarray(choice)[0]
    n = 0
    while n < k and choice[f - 1 + n] == proposals[n]:
      n += 1
    feed = [*proposals[:n].tolist(), int(choice[f - 1 + n])]
    out.extend(feed)
    rounds, accepted_total = rounds + 1, accepted_total + n
  tokens = np.asarray(out[:max_new_tokens], np.int32)
  stats = {"rounds": rounds, "proposed": rounds * k, "accepted": accepted_total,
           "acceptance_rate": accepted_total / max(rounds * k, 1), "tokens_per_round": len(out) / max(rounds, 1)}
  return tokens, stats


@functools.partial(nnx.jit, static_argnames=("steps", "placement"))
def _greedy_steps(model, token_b, cache, steps: int, placement=None):
  def body(carry, _):
    token, cache = carry
    logits, cache = model.decode_step(token, cache)
    nxt = jnp.argmax(logits, -1).astype(jnp.int32)
    return (nxt, cache), nxt
  with _rules(placement):
    (_, cache), tokens = jax.lax.scan(body, (token_b, cache), None, length=steps)
  return tokens.T, cache


@functools.partial(nnx.jit, static_argnames="placement")
def _decode_one(model, token_b, cache, placement=None):
  with _rules(placement):
    logits, cache = model.decode_step(token_b, cache)
  return jnp.argmax(logits, -1).astype(jnp.int32), cache


def greedy(model, prompt_ids, max_new_tokens: int, *, max_len: int | None = None, fused: bool = False,
           mesh: jax.sharding.Mesh | None = None, rules=SERVING_RULES):
  """The model's own greedy continuation: one decode call per token (what serving does), or `fused` into one
  compiled loop. The reference speculative decoding must equal, and its speed baseline. `mesh` as for
  `generate`."""
  model, placement = on_mesh(model, mesh, rules)
  prompt = jnp.asarray(prompt_ids, jnp.int32)[None]
  cache = model.init_cache(1, max_len or prompt.shape[1] + max_new_tokens + 1)
  if prompt.shape[1] > 1:
    _, cache = _prefill(model, prompt[:, :-1], cache, placement)
  token = prompt[:, -1]
  if fused:
    return np.asarray(_greedy_steps(model, token, cache, max_new_tokens, placement)[0][0])
  out = []
  for _ in range(max_new_tokens):
    token, cache = _decode_one(model, token, cache, placement)
    out.append(int(token[0]))
  return np.asarray(out, np.int32)
