"""DPO (arXiv 2305.18290): the loss against hand-worked numbers, finite gradients, and a tiny GPT that learns to
prefer the chosen answers of a preference fixture (UltraFeedback's schema, invented rows) on held-out pairs."""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import common, mesh as mesh_presets
from lwjax.data import chat_rows, chat_sets, hf_tokenizer, pipeline, rows as rows_lib
from lwjax.models.gpt import GPT, GPTConfig
from lwjax.training import dpo, mesh as mesh_lib
from lwjax.training.trainer import Trainer

TOKENIZER = pathlib.Path(__file__).parents[1] / "fixtures" / "hf" / "tokenizers" / "llama3_style"


def test_dpo_loss_against_hand_worked_numbers():
  # beta 0.5; chosen: policy -2, reference -3 -> reward 0.5 * 1 = 0.5; rejected: policy -4, reference -3 ->
  # reward 0.5 * -1 = -0.5; margin 1; loss -log sigmoid(1) = log(1 + e^-1) = 0.313262.
  # beta 0.1; chosen -5 vs -4 -> -0.1; rejected -2 vs -3 -> 0.1; margin -0.2; loss log(1 + e^0.2) = 0.798139.
  loss, metrics = dpo.dpo_loss(jnp.array([-2.0, -5.0]), jnp.array([-4.0, -2.0]), jnp.array([-3.0, -4.0]),
                               jnp.array([-3.0, -3.0]), beta=jnp.array([0.5, 0.1]))
  np.testing.assert_allclose(loss, [0.313262, 0.798139], atol=1e-6)
  np.testing.assert_allclose(metrics["chosen_reward"], [0.5, -0.1], atol=1e-6)
  np.testing.assert_allclose(metrics["rejected_reward"], [-0.5, 0.1], atol=1e-6)
  np.testing.assert_allclose(metrics["reward_margin"], [1.0, -0.2], atol=1e-6)
  np.testing.assert_array_equal(metrics["reward_accuracy"], [1.0, 0.0])


def test_trainer_loss_sums_answer_tokens_only_and_skips_empty_pairs():
  # Vocabulary of 2. The policy gives token 0 probability 3/4 at every position, the reference 1/2. Chosen answer:
  # tokens 0, 0 (masked), rejected: token 1; the prompt token (unmasked) must not count. beta 1:
  # chosen reward 2 log(3/4) - 2 log(1/2) = 2 log 1.5; rejected log(1/4) - log(1/2) = -log 2;
  # margin 2 log 1.5 + log 2 = log 4.5; loss -log(4.5 / 5.5) = log(11 / 9) = 0.200671.
  def policy(inputs_bt):
    return jnp.broadcast_to(jnp.array([math.log(3.0), 0.0]), (*inputs_bt.shape, 2))

  def reference(inputs_bt):
    return jnp.zeros((*inputs_bt.shape, 2))
  targets = jnp.array([[[1, 0, 0], [1, 1, 0]], [[0, 0, 0], [0, 0, 0]]])  # pair 2: padding
  mask = jnp.array([[[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]], [[0.0] * 3, [0.0] * 3]])
  batch = {"inputs": jnp.zeros_like(targets), "targets": targets, "loss_mask": mask}
  loss_sum, pairs, sums = dpo.loss_fn(1.0)(policy, batch, reference)
  assert float(pairs) == 1.0
  np.testing.assert_allclose(float(loss_sum), math.log(11 / 9), atol=1e-6)
  np.testing.assert_allclose(float(sums["reward_margin"]), math.log(4.5), atol=1e-6)
  np.testing.assert_allclose(float(sums["chosen_reward"]), 2 * math.log(1.5), atol=1e-6)
  assert float(sums["reward_accuracy"]) == 1.0


@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_gradients_are_finite_and_the_loss_starts_at_log_two(scale):
  """Through the trainer's loss of a bigram model (logits = table[token]), at ordinary and extreme logits (margins
  of thousands of nats, where a naive log(sigmoid) underflows)."""
  rng = np.random.default_rng(0)
  reference_table = jnp.asarray(rng.normal(size=(8, 8)) * scale, jnp.float32)
  batch = {"inputs": jnp.asarray(rng.integers(0, 8, (3, 2, 6))), "targets": jnp.asarray(rng.integers(0, 8, (3, 2, 6))),
           "loss_mask": jnp.asarray((rng.random((3, 2, 6)) > 0.3).astype(np.float32))}

  def loss(table):
    loss_sum, pairs, _ = dpo.loss_fn(0.5)(lambda x: table[x], batch, lambda x: reference_table[x])
    return loss_sum / pairs
  value_and_grad = jax.jit(jax.value_and_grad(loss))
  start, grads = value_and_grad(reference_table)
  # policy == reference: margin 0 (up to float32 rounding of log-probs of thousands of nats at the extreme scale)
  np.testing.assert_allclose(float(start), math.log(2.0), atol=1e-6 * scale)
  assert np.isfinite(grads).all() and float(jnp.abs(grads).sum()) > 0
  moved = reference_table + jnp.asarray(rng.normal(size=(8, 8)) * scale, jnp.float32)
  value, grads = value_and_grad(moved)
  assert np.isfinite(float(value)) and np.isfinite(grads).all()


FIRST, SECOND = ("A", "B", "C", "D"), ("E", "F", "G", "H")  # each " X" is two tokens: no length cue


def _pairs(path, split, numbers, seed):
  """UltraFeedback rows: a prompt asks for a letter of the "first" or the "second" group (at random); the chosen
  answer says a letter of that group, the rejected one a letter of the other. A model's fixed liking for some
  letters then agrees with the labels on about half the pairs: the preference to learn depends on the prompt."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in numbers:
    cue = ("first", "second")[rng.integers(2)]
    question = f"{cue} {i}"
    prompt = [{"role": "user", "content": question}]
    good, bad = (FIRST, SECOND) if cue == "first" else (SECOND, FIRST)
    rows.append({"prompt": question, "prompt_id": str(i),
                 "chosen": prompt + [{"role": "assistant", "content": f"{good[rng.integers(4)]}, {i}."}],
                 "rejected": prompt + [{"role": "assistant", "content": f"{bad[rng.integers(4)]}, {i}."}],
                 "score_chosen": 9.0, "score_rejected": 1.0})
  (path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.slow
def test_a_tiny_gpt_learns_to_prefer_the_chosen_answers_of_held_out_pairs(tmp_path):
  numbers = np.random.default_rng(0).permutation(1000)
  _pairs(tmp_path, "train_prefs", numbers[:200], seed=0)
  _pairs(tmp_path, "test_prefs", numbers[200:264], seed=1)  # other numbers, other letter draws
  tok = hf_tokenizer.load(str(TOKENIZER))
  seq_len = 40

  def pairs(split):
    rows = [chat_rows.preference_row(tok, r["chosen"], r["rejected"], seq_len)
            for r in chat_sets.ultrafeedback(tmp_path, split)]
    return [r for r in rows if r is not None]
  train, held_out = pairs("train_prefs"), rows_lib.stack(pairs("test_prefs"))
  assert len(train) == 200 and len(held_out["inputs"]) == 64
  cfg = GPTConfig(vocab_size=448, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64,
                  max_seq_len=seq_len)
  config = ml_collections.ConfigDict({
      "train": common.train(steps=40, global_batch_size=16, log_every=1000, eval_every=0),
      "optim": common.optim(learning_rate=3e-3, warmup_steps=5, weight_decay=0.0), "mesh": mesh_presets.get()})
  mesh = mesh_lib.make_mesh(config.mesh.shape, jax.devices()[:1])
  reference = GPT(cfg, rngs=nnx.Rngs(0))  # stands in for the SFT'd model DPO starts from
  trainer = Trainer(config, str(tmp_path / "run"), model_fn=lambda rngs: GPT(cfg, rngs=rngs),
                    loss_fn=dpo.loss_fn(beta=0.1), mesh=mesh, reference=reference)
  state = trainer.state_from_params(nnx.to_pure_dict(nnx.state(reference)))

  def held_out_metrics(params):
    return trainer.evaluate(params, iter([{k: v[i:i + 16] for k, v in held_out.items()} for i in range(0, 64, 16)]))

  before = held_out_metrics(state["params"])
  # The reference's own preference (which answer it gives the higher log-probability): the chance level here.
  logp = np.asarray(nnx.jit(dpo.pair_logprobs)(reference, {k: jnp.asarray(v) for k, v in held_out.items()}))
  reference_prefers_chosen = float(np.mean(logp[:, 0] > logp[:, 1]))
  batches = iter(rows_lib.shuffled_batches(train, batch_size=16, seed=0))
  for _ in range(config.train.steps):
    state, _ = trainer.train_step(state, pipeline.global_batch(next(batches), trainer.batch_sharding))
  after = held_out_metrics(state["params"])
  print(f"held-out before: {before}\nafter: {after}\nreference prefers chosen: {reference_prefers_chosen:.3f}")
  assert before["loss"] == pytest.approx(math.log(2.0), rel=1e-5) and before["reward_accuracy"] == 0.0
  assert after["reward_accuracy"] >= 0.9 and after["reward_accuracy"] > reference_prefers_chosen + 0.25
  assert after["loss"] < 0.6 * math.log(2.0) and after["reward_margin"] > 0
  assert after["chosen_reward"] > after["rejected_reward"]
