"""GameNGen's PPO agent: GAE, the loss pieces, the repeat-action mixture, the sharded update, rollout bootstrap."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import common, mesh as mesh_presets
from lwjax.projects.gamengen import agent as agent_lib, ppo
from lwjax.projects.gamengen.env import AUTOMAP_SHAPE, FRAME_SHAPE, NUM_ACTIONS
from lwjax.projects.gamengen.reward import REWARD_TERMS
from lwjax.projects.gamengen.rollout import RolloutCollector, evaluate
from lwjax.training import mesh as mesh_lib, sharding

TINY = agent_lib.AgentConfig(image_pool=2, history=4, action_embed_dim=4, cnn_channels=(4, 8, 8), features=16,
                             head_hidden=16)


def gae_loop(reward, value, next_value, terminal, done, gamma, lam):
  """GAE the textbook way, one step at a time."""
  advantage, running = np.zeros_like(reward), np.zeros(reward.shape[1])
  for t in reversed(range(len(reward))):
    delta = reward[t] + gamma * (1 - terminal[t]) * next_value[t] - value[t]
    running = delta + gamma * lam * (1 - done[t]) * running
    advantage[t] = running
  return advantage


def test_gae_by_hand_with_a_terminal_and_a_truncation():
  reward, value = np.array([[1.0], [2.0], [3.0]]), np.array([[0.5], [1.0], [1.5]])
  next_value = np.array([[1.0], [1.5], [2.0]])
  terminal = done = np.array([[0], [0], [1]])
  advantage, returns = ppo.gae(reward, value, next_value, terminal, done, gamma=0.9, lam=0.8)
  # delta = 1.5, 2.35, 1.4 from the end; A_1 = 2.35 + 0.72 * 1.5; A_0 = 1.4 + 0.72 * A_1
  np.testing.assert_allclose(advantage[:, 0], [1.4 + 0.72 * 3.43, 3.43, 1.5], rtol=1e-6)
  np.testing.assert_allclose(returns, advantage + value, rtol=1e-6)
  # Truncated at t=1 (done, not terminal): bootstrap from that episode's last state (4.0), cut the trace.
  next_value = np.array([[1.0], [4.0], [2.0]])
  advantage, _ = ppo.gae(reward, value, next_value, np.zeros((3, 1)), np.array([[0], [1], [0]]), gamma=0.9, lam=0.8)
  np.testing.assert_allclose(advantage[:, 0], [1.4 + 0.72 * 4.6, 4.6, 3.3], rtol=1e-6)


def test_gae_matches_a_numpy_loop_on_random_rollouts():
  rng = np.random.default_rng(0)
  t, n = 37, 5
  reward, value, next_value = (rng.normal(size=(t, n)).astype(np.float32) for _ in range(3))
  done = rng.random((t, n)) < 0.15
  terminal = done & (rng.random((t, n)) < 0.5)
  for gamma, lam in ((0.99, 0.95), (0.9, 1.0), (0.5, 0.0)):
    advantage, _ = ppo.gae(reward, value, next_value, terminal, done, gamma=gamma, lam=lam)
    np.testing.assert_allclose(advantage, gae_loop(reward, value, next_value, terminal, done, gamma, lam),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ratio,advantage,loss,grad", [
    (1.5, 2.0, -1.2 * 2.0, 0.0),  # better and already pushed past 1 + eps: clipped, no gradient
    (0.5, 2.0, -0.5 * 2.0, -2.0),  # better but made less likely: unclipped, pulled back
    (0.5, -2.0, 0.8 * 2.0, 0.0),  # worse and already below 1 - eps: clipped
    (1.5, -2.0, 1.5 * 2.0, 2.0),  # worse but made more likely: unclipped, pushed down
    (1.1, 2.0, -1.1 * 2.0, -2.0),  # inside the clip range
])
def test_clipped_surrogate(ratio, advantage, loss, grad):
  def f(r):
    return ppo.clipped_surrogate(r[None], jnp.asarray([advantage]), 0.2)
  assert float(f(jnp.asarray(ratio))) == pytest.approx(loss)
  assert float(jax.grad(f)(jnp.asarray(ratio))) == pytest.approx(grad)


def test_entropy():
  assert float(ppo.entropy(jnp.zeros((1, NUM_ACTIONS)))[0]) == pytest.approx(np.log(NUM_ACTIONS), rel=1e-6)
  assert float(ppo.entropy(jnp.asarray([[50.0, 0.0, 0.0]]))[0]) < 1e-18
  logits = np.random.default_rng(1).normal(size=(4, 6))
  p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  np.testing.assert_allclose(ppo.entropy(jnp.asarray(logits)), -(p * np.log(p)).sum(-1), rtol=1e-5)


def test_ppo_loss_at_the_acting_parameters(learner, params):
  """Ratio 1 everywhere: no clipping, no KL, policy loss 0 (normalised advantages), the pieces add up."""
  model = nnx.merge(learner.graphdef, params)
  rng = np.random.default_rng(2)
  b = 16
  batch = {"frame": rng.integers(0, 256, (b, 60, 80, 3), np.uint8),
           "automap": rng.integers(0, 256, (b, 60, 80, 3), np.uint8),
           "history": rng.integers(0, NUM_ACTIONS + 1, (b, 4)).astype(np.int32),
           "action": rng.integers(0, NUM_ACTIONS, b).astype(np.int32),
           "advantage": rng.normal(size=b).astype(np.float32), "return": rng.normal(size=b).astype(np.float32)}
  logits, value = nnx.jit(lambda m, *x: m(*x))(model, batch["frame"], batch["automap"], batch["history"])
  log_probs = agent_lib.behaviour_log_probs(logits, batch["history"][:, -1], 0.3)
  batch["log_prob"] = np.take_along_axis(np.asarray(log_probs), batch["action"][:, None], 1)[:, 0]
  loss_fn = functools.partial(ppo.ppo_loss, clip_eps=0.2, value_coef=0.5, entropy_coef=0.1, repeat_prob=0.3,
                              normalize_advantages=True)
  loss, m = nnx.jit(loss_fn)(model, batch)
  assert abs(float(m["policy_loss"])) < 1e-5 and abs(float(m["approx_kl"])) < 1e-6 and float(m["clip_fraction"]) == 0
  assert float(m["value_loss"]) == pytest.approx(float(np.mean((batch["return"] - np.asarray(value)) ** 2)), rel=1e-5)
  assert float(m["entropy"]) == pytest.approx(float(ppo.entropy(logits).mean()), rel=1e-6)
  assert float(loss) == pytest.approx(float(m["policy_loss"] + 0.5 * m["value_loss"] - 0.1 * m["entropy"]), rel=1e-5)


def test_behaviour_mixture_probabilities_and_samples():
  rng = jax.random.key(3)
  logits = jax.random.normal(rng, (3, NUM_ACTIONS))
  previous = jnp.asarray([agent_lib.NO_ACTION, 2, 5])
  p_b = np.exp(np.asarray(agent_lib.behaviour_log_probs(logits, previous, 0.3)))
  pi = np.asarray(jax.nn.softmax(logits))
  np.testing.assert_allclose(p_b.sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(p_b[0], pi[0], rtol=1e-5)  # no previous action: the network's policy
  expected = 0.7 * pi[1:]
  expected[[0, 1], [2, 5]] += 0.3
  np.testing.assert_allclose(p_b[1:], expected, rtol=1e-5)
  # Sampled actions follow the mixture; their log-probabilities are the mixture's.
  num = 40000
  tiled_logits, tiled_previous = jnp.repeat(logits, num, axis=0), jnp.repeat(previous, num)
  actions, log_probs = jax.jit(agent_lib.sample_behaviour, static_argnums=3)(jax.random.key(4), tiled_logits,
                                                                            tiled_previous, 0.3)
  actions = np.asarray(actions).reshape(3, num)
  counts = np.stack([np.bincount(a, minlength=NUM_ACTIONS) / num for a in actions])
  np.testing.assert_allclose(counts, p_b, atol=0.012)
  np.testing.assert_allclose(np.asarray(log_probs).reshape(3, num),
                             np.log(np.take_along_axis(p_b, actions, 1)), rtol=1e-4, atol=1e-5)


def test_behaviour_log_probs_have_finite_gradients():
  logits = jnp.asarray([[30.0] + [-30.0] * (NUM_ACTIONS - 1)] * 2)
  previous = jnp.asarray([agent_lib.NO_ACTION, 0])
  for repeat_prob in (0.0, 0.5):
    grad = jax.grad(lambda x, p=repeat_prob: agent_lib.behaviour_log_probs(x, previous, p)[:, 3].sum())(logits)
    assert np.isfinite(np.asarray(grad)).all()


def test_action_history_and_preprocess():
  history = agent_lib.ActionHistory(2, 3)
  history.push(np.array([1, 2]))
  history.push(np.array([3, 4]))
  np.testing.assert_array_equal(history.actions_nk, [[17, 1, 3], [17, 2, 4]])
  np.testing.assert_array_equal(history.pushed(np.array([5, 6]))[:, -1], [5, 6])
  history.reset(np.array([False, True]))
  np.testing.assert_array_equal(history.actions_nk, [[17, 1, 3], [17, 17, 17]])
  frame = np.zeros((1, *FRAME_SHAPE), np.uint8)
  frame[0, :4, :4] = 200  # one 4x4 block
  small_frame, automap = agent_lib.preprocess(frame, np.zeros((1, *AUTOMAP_SHAPE), np.uint8), image_pool=2)
  assert small_frame.shape == automap.shape == (1, 60, 80, 3)
  assert small_frame[0, 0, 0, 0] == 200 and small_frame[0, 0, 1, 0] == 0
  assert agent_lib.preprocess(frame, automap, image_pool=1)[0].shape == (1, 120, 160, 3)


@pytest.fixture(scope="module")
def learner():
  """8 games of 6 steps, minibatches of 16, on the tests' 8 fake CPU devices."""
  ppo_cfg = ml_collections.ConfigDict({
      "num_envs": 8, "rollout_steps": 6, "total_env_steps": 480, "gamma": 0.99, "gae_lambda": 0.95,
      "clip_eps": 0.2, "entropy_coef": 0.01, "value_coef": 0.5, "batch_size": 16, "epochs": 2,
      "normalize_advantages": True, "repeat_prob": 0.25, "reward_scale": 0.01})
  optim_cfg = common.optim(learning_rate=1e-3, schedule="constant", warmup_steps=0, weight_decay=0.0)
  config = mesh_presets.get()
  return ppo.Learner(TINY, ppo_cfg, optim_cfg, mesh_lib.make_mesh(config.shape),
                     sharding.rules_from_config(config.rules))


@pytest.fixture(scope="module")
def params(learner):
  return learner.init_state(jax.random.key(0))["params"]


def test_sharded_update_over_8_devices(learner):
  assert learner.mesh.shape["data"] == 8  # tests run on 8 fake CPU devices
  state = learner.init_state(jax.random.key(0))
  t, n = 6, 8
  rng = np.random.default_rng(5)
  rollout = {"frame": rng.integers(0, 256, (t, n, 60, 80, 3), np.uint8),
             "automap": rng.integers(0, 256, (t, n, 60, 80, 3), np.uint8),
             "history": rng.integers(0, NUM_ACTIONS + 1, (t, n, 4)).astype(np.int32),
             "action": rng.integers(0, NUM_ACTIONS, (t, n)).astype(np.int32),
             "log_prob": np.full((t, n), -np.log(NUM_ACTIONS), np.float32),
             "value": np.zeros((t, n), np.float32), "reward": rng.normal(size=(t, n)).astype(np.float32),
             "next_value": np.zeros((t, n), np.float32), "terminal": np.zeros((t, n), bool),
             "done": rng.random((t, n)) < 0.2}
  samples, _ = learner._samples({k: jax.device_put(v, learner.rollout_shardings[k]) for k, v in rollout.items()})
  assert samples["frame"].shape == (t * n, 60, 80, 3) and len(samples["frame"].sharding.device_set) == 8
  assert samples["frame"].sharding.spec[0] == "data"
  before = jax.device_get(state["params"])
  state, metrics = learner.update(state, rollout, jax.random.key(1))
  assert int(state["step"]) == 2 * (t * n // 16)  # epochs x minibatches
  assert all(np.isfinite(v) for v in metrics.values()) and metrics["value_loss"] > 0
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), before, jax.device_get(state["params"]))
  assert all(jax.tree.leaves(changed))


class FakeVectorEnv:
  """Random frames in VectorDoomEnv's layout; game 0's episodes end at the time limit every 3 steps, game 1's
  by a terminal state every 4 steps, the others' never."""

  def __init__(self, num_envs):
    self.num_envs, self.rng, self.t = num_envs, np.random.default_rng(6), 0

  def _obs(self, first):
    n = self.num_envs
    return {"frame": self.rng.integers(0, 256, (n, *FRAME_SHAPE), np.uint8),
            "automap": self.rng.integers(0, 256, (n, *AUTOMAP_SHAPE), np.uint8), "first": first}

  def reset(self):
    return self._obs(np.ones(self.num_envs, bool))

  def step(self, actions):
    self.t, n = self.t + 1, self.num_envs
    done = np.zeros(n, bool)
    done[:2] = self.t % 3 == 0, self.t % 4 == 0
    timeout = np.zeros(n, bool)
    timeout[0] = done[0]
    info = {"frames": self.rng.integers(0, 256, (n, 4, *FRAME_SHAPE), np.uint8), "num_frames": np.full(n, 4),
            "timeout": timeout, "restarted": np.zeros(n, bool),
            "terms": {t: np.ones(n, np.float32) for t in REWARD_TERMS}, "kills": np.zeros(n), "cells": np.ones(n)}
    return self._obs(done.copy()), np.full(n, 10.0, np.float32), done, info


def test_rollout_bootstraps_truncations_from_the_episodes_last_state(learner, params):
  env = FakeVectorEnv(8)
  steps = []  # (obs, history after the action, info) of each step, to rebuild the states

  def step(actions, original=env.step):
    obs_before = collector.obs
    out = original(actions)
    steps.append((obs_before, collector.history.pushed(actions), out[3]))
    return out
  env.step = step
  collector = RolloutCollector(env, learner, reward_scale=0.5)
  rollout = collector.collect(params, jax.random.key(1))

  def value(frame, automap, history):
    return learner.act(params, frame, automap, history, jax.random.key(0))[2]
  np.testing.assert_array_equal(rollout["reward"], 5.0)
  np.testing.assert_array_equal(rollout["done"][:, 0], [0, 0, 1, 0, 0, 1])
  np.testing.assert_array_equal(rollout["terminal"][:, 0], 0)  # time limits are not terminal
  np.testing.assert_array_equal(rollout["terminal"][:, 1], [0, 0, 0, 1, 0, 0])
  final_values = value(*agent_lib.preprocess(collector.obs["frame"], collector.obs["automap"], TINY.image_pool),
                       collector.history.actions_nk)
  for t in range(6):
    if t in (2, 5):  # game 0 truncated: its last state is the step's last frame, the automap, the new history
      obs, history, info = steps[t]
      frame, automap = agent_lib.preprocess(info["frames"][:, 3], obs["automap"], TINY.image_pool)
      assert rollout["next_value"][t, 0] == pytest.approx(value(frame, automap, history)[0], rel=1e-5)
    else:
      assert rollout["next_value"][t, 0] == rollout["value"][t + 1, 0]
    expected = rollout["value"][t + 1, 1:] if t < 5 else final_values[1:]
    np.testing.assert_allclose(rollout["next_value"][t, 1:], expected, rtol=1e-5)
  # Histories restart with each episode and hold the actions taken since.
  assert (rollout["history"][3, 0] == agent_lib.NO_ACTION).all()
  assert rollout["history"][4, 0, -1] == rollout["action"][3, 0]
  episodes = collector.stats.pop_means()
  assert episodes["episodes"] == 3 and episodes["term/kill"] == pytest.approx(episodes["length"])


def test_evaluate_takes_the_first_episodes_of_each_game():
  env = FakeVectorEnv(2)
  result = evaluate(env, lambda obs: np.zeros(2, np.int64), episodes_per_env=2)
  assert result["episodes"] == 4 and result["length"] == pytest.approx((3 + 3 + 4 + 4) / 4)
  assert result["length_se"] == pytest.approx(np.std([3, 3, 4, 4], ddof=1) / 2)
  assert result["return"] == pytest.approx(10.0 * result["length"]) and result["timeout"] == 0.5
