"""Baselines AttnLRP is compared with (Achtibat et al. 2024, Sec. 4; LRP4RAG, arXiv 2408.15533): gradient x input
and attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers", Sec. 3), with the
inputs and output of `lwjax.relevance.attnlrp.relevance`: (model, tokens [b, t], target position, target token)
-> per-input-token scores [b, t].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lwjax.models import gpt
from lwjax.relevance import attnlrp


def gradient_x_input(model, tokens_bt, target_position, target_token, target_weight=None):
  """Gradient x input of logits[b, target_position, target_token], summed over the embedding dim: [b, t].

  The plain gradient of the model's own forward (its blocks and head, the configured attention kernel), one
  backward pass for the batch. Targets are ints, int arrays [b], or [b, n] for n targets per example: then the
  result is the sum of their n explanations weighted by `target_weight` [b, n] (default 1), still one backward
  pass (gradient x input is linear in the explained output).
  """
  attnlrp.check_supported(model)
  batch, length = tokens_bt.shape
  if jnp.ndim(target_position) == 2 or jnp.ndim(target_token) == 2:
    pos, tok = jnp.broadcast_arrays(jnp.asarray(target_position, jnp.int32), jnp.asarray(target_token, jnp.int32))
  else:
    pos, tok = (a[:, None] for a in attnlrp._targets(tokens_bt, target_position, target_token))
  weight = jnp.ones(pos.shape, jnp.float32) if target_weight is None else target_weight
  positions = jnp.broadcast_to(jnp.arange(length), tokens_bt.shape)
  inv_freq = gpt.rope_frequencies(model.cfg)

  def logit(x_btd):  # GPT.hidden from embeddings rather than tokens: the GPT has no such entry point
    for block in model.layers:
      x_btd = block(x_btd, positions, inv_freq)[0]
    return jnp.sum(weight * model._logits(x_btd)[jnp.arange(batch)[:, None], pos, tok], axis=1)

  x_btd = model._embed(tokens_bt)
  value, vjp = jax.vjp(logit, x_btd)
  (g_x,) = vjp(jnp.ones_like(value))
  return attnlrp._per_token(x_btd, g_x)


def attention_rollout(model, tokens_bt, target_position, target_token=None):
  """Attention rollout (Abnar & Zuidema 2020, Sec. 3) read at the target position: [b, t], each row sums to 1.

  Per layer the attention weights averaged over heads, A_l [b, t, t], with the residual connection as
  0.5 A_l + 0.5 I; rollout = (0.5 A_L + 0.5 I) ... (0.5 A_1 + 0.5 I). It is class-agnostic: `target_token` is
  accepted for the common signature and ignored. The weights come from the LRP forward, whose values are the
  GPT's.
  """
  del target_token
  _, acts = attnlrp.lrp_forward(model, tokens_bt)
  pos, _ = attnlrp._targets(tokens_bt, target_position, 0)
  eye = jnp.eye(tokens_bt.shape[1], dtype=jnp.float32)
  rollout = jnp.broadcast_to(eye, (tokens_bt.shape[0], *eye.shape))
  for probs in acts["probs"]:  # [b, kv_heads, groups, q, s]
    mixed = 0.5 * jnp.mean(probs.astype(jnp.float32), axis=(1, 2)) + 0.5 * eye
    rollout = jnp.einsum("bqs,bsk->bqk", mixed, rollout)
  return jnp.take_along_axis(rollout, pos[:, None, None], axis=1)[:, 0]
