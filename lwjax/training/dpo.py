"""Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
Secretly a Reward Model", arXiv 2305.18290, Eq. 7).

For a prompt x with a chosen answer y_c and a rejected one y_r, the policy pi is trained against a frozen
reference pi_ref (the model DPO starts from) with

  L = -log sigmoid(beta * ((log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x))))

where log pi(y|x) sums the log-probabilities of the answer's tokens only. beta * (log pi - log pi_ref) is the
implicit reward of an answer (Sec. 5); the chosen and rejected rewards, their margin and the fraction of pairs
whose margin is positive (reward accuracy) are what DPO runs report.

A batch holds pairs as [batch, 2, seq_len] fields (chosen at index 0, rejected at 1): `inputs`, `targets`,
`loss_mask` (1 on the answer's targets), as `lwjax.data.chat_rows.preference_row` writes them. A pair whose mask
is empty (padding of an evaluation's last batch) has weight 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sequence_logprobs(logits_btv, targets_bt, mask_bt):
  """Summed log-probabilities [batch] of the masked targets; logits in float32."""
  logp_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32))
  token_bt = jnp.take_along_axis(logp_btv, targets_bt[..., None], axis=-1)[..., 0]
  return jnp.sum(token_bt * mask_bt, axis=-1)


def dpo_loss(policy_chosen_b, policy_rejected_b, reference_chosen_b, reference_rejected_b, beta: float):
  """(loss [batch], {metric: [batch]}) of the DPO objective on summed answer log-probs (module docstring)."""
  chosen_reward_b = beta * (policy_chosen_b - reference_chosen_b)
  rejected_reward_b = beta * (policy_rejected_b - reference_rejected_b)
  margin_b = chosen_reward_b - rejected_reward_b
  metrics = {"chosen_reward": chosen_reward_b, "rejected_reward": rejected_reward_b, "reward_margin": margin_b,
             "reward_accuracy": (margin_b > 0).astype(jnp.float32)}
  return -jax.nn.log_sigmoid(margin_b), metrics


def pair_logprobs(model, batch):
  """Summed answer log-probs [batch, 2] (chosen, rejected) of `model` on a batch of pairs."""
  b, two, t = batch["inputs"].shape
  logits = model(batch["inputs"].reshape(b * two, t))
  return sequence_logprobs(logits, batch["targets"].reshape(b * two, t),
                           batch["loss_mask"].reshape(b * two, t)).reshape(b, two)


def loss_fn(beta: float):
  """The trainer's loss (`loss_fn(model, batch, reference)` -> (loss sum, pairs, {metric: sum})) for DPO against
  the frozen `reference`."""
  def loss(model, batch, reference):
    policy_b2 = pair_logprobs(model, batch)
    reference_b2 = jax.lax.stop_gradient(pair_logprobs(reference, batch))
    loss_b, metrics = dpo_loss(policy_b2[:, 0], policy_b2[:, 1], reference_b2[:, 0], reference_b2[:, 1], beta)
    weight_b = jnp.all(jnp.sum(batch["loss_mask"], axis=-1) > 0, axis=-1).astype(jnp.float32)
    return (jnp.sum(loss_b * weight_b), jnp.sum(weight_b),
            {name: jnp.sum(value * weight_b) for name, value in metrics.items()})
  return loss
