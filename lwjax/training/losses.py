"""Losses: token-level cross-entropy returned as (sum, weight) so accumulation and sharding stay exact."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy_sum(logits_btv, targets_bt, weights_bt):
  """(sum of weighted token cross-entropies, sum of weights); logits in float32."""
  logz = jax.nn.logsumexp(logits_btv, axis=-1)
  target_logits = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
  return jnp.sum((logz - target_logits) * weights_bt), jnp.sum(weights_bt)


def lm_loss(model, batch):
  """Next-token loss of a GPT on a packed batch: (sum loss, sum weight, metrics)."""
  logits = model(batch["inputs"], positions_bt=batch["positions"], segment_ids_bt=batch["segment_ids"])
  loss_sum, weight = cross_entropy_sum(logits, batch["targets"], batch["loss_mask"])
  correct = jnp.sum((jnp.argmax(logits, -1) == batch["targets"]) * batch["loss_mask"])
  return loss_sum, weight, {"accuracy": correct}
