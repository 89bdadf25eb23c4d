"""PPO (Schulman et al. 2017) for GameNGen's agent (arXiv 2408.14837, sec. 4.1): GAE, clipped loss, sharded update.

The paper trains with Stable-Baselines3's PPO; the defaults follow it where the paper is silent (GAE
lambda 0.95, clip 0.2, value coefficient 0.5, gradient clipping 0.5, advantages normalised per minibatch,
Adam eps 1e-5) and the paper where it speaks (8 games, 512 steps per game per rollout, gamma 0.99,
entropy 0.1, batch 64, 10 epochs, lr 1e-4).

Rollouts are time-major numpy dicts [T, N, ...] (T steps of N games):
  frame, automap uint8 [T, N, h, w, 3]; history int32 [T, N, K]; action int32 [T, N];
  log_prob [T, N] (of the behaviour policy, the repeat mixture of `agent.py`); value [T, N];
  reward [T, N] (scaled); next_value [T, N] (V of the state after each step: the next step's value,
  V(s_T) after the last, V of the last state of an episode cut by the time limit, anything at a terminal);
  terminal [T, N] (a true end: no bootstrap); done [T, N] (terminal or truncated: the advantage trace stops).

`Learner` builds the state as `eval_shape -> shardings -> jit(init)` and jits acting, GAE and the
optimizer step with explicit shardings: parameters by their logical axes (replicated on the default mesh:
the net is small), the games, samples and minibatches over the data-parallel axes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lwjax.config import Field, positive_int
from lwjax.models.logical import logical_to_spec
from lwjax.projects.gamengen import agent as agent_lib
from lwjax.training import optim, sharding

SCHEMA = {
    "num_envs": positive_int("games played in parallel (8 in the paper)"),
    "rollout_steps": positive_int("agent steps per game per rollout (512 in the paper)"),
    "total_env_steps": positive_int("agent steps over all games for the whole run"),
    "gamma": Field(float, min=0.0, max=1.0),
    "gae_lambda": Field(float, min=0.0, max=1.0),
    "clip_eps": Field(float, min=0.0),
    "entropy_coef": Field(float, min=0.0),
    "value_coef": Field(float, min=0.0),
    "batch_size": positive_int("minibatch size (64 in the paper)"),
    "epochs": positive_int("passes over each rollout (10 in the paper)"),
    "normalize_advantages": Field(bool),
    "repeat_prob": Field(float, min=0.0, max=0.99, doc="behaviour policy's chance to repeat the previous action"),
    "reward_scale": Field(float, min=0.0, doc="learning sees reward * reward_scale; logs show the paper's points"),
}
ROLLOUT_KEYS = ("frame", "automap", "history", "action", "log_prob", "value", "reward", "next_value",
                "terminal", "done")
SAMPLE_KEYS = ("frame", "automap", "history", "action", "log_prob", "advantage", "return")


def gae(reward_tn, value_tn, next_value_tn, terminal_tn, done_tn, *, gamma: float, lam: float):
  """Generalised advantage estimation over time-major [T, N] arrays -> (advantage, return) [T, N].

  delta_t = r_t + gamma * (1 - terminal_t) * next_value_t - value_t;
  A_t = delta_t + gamma * lam * (1 - done_t) * A_{t+1}; return_t = A_t + value_t.
  """
  not_terminal = 1.0 - jnp.asarray(terminal_tn, jnp.float32)
  delta_tn = reward_tn + gamma * not_terminal * next_value_tn - value_tn
  decay_tn = gamma * lam * (1.0 - jnp.asarray(done_tn, jnp.float32))

  def step(next_advantage, xs):
    delta, decay = xs
    advantage = delta + decay * next_advantage
    return advantage, advantage
  _, advantage_tn = jax.lax.scan(step, jnp.zeros_like(delta_tn[0]), (delta_tn, decay_tn), reverse=True)
  return advantage_tn, advantage_tn + value_tn


def clipped_surrogate(ratio_b: jax.Array, advantage_b: jax.Array, clip_eps: float) -> jax.Array:
  """PPO's policy loss: -mean(min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A))."""
  clipped = jnp.clip(ratio_b, 1.0 - clip_eps, 1.0 + clip_eps)
  return -jnp.mean(jnp.minimum(ratio_b * advantage_b, clipped * advantage_b))


def entropy(logits_ba: jax.Array) -> jax.Array:
  """Entropy of each categorical [B] (nats)."""
  log_p = jax.nn.log_softmax(logits_ba)
  return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def ppo_loss(model: agent_lib.ActorCritic, batch: dict, *, clip_eps: float, value_coef: float,
             entropy_coef: float, repeat_prob: float, normalize_advantages: bool) -> tuple[jax.Array, dict]:
  """The PPO loss of one minibatch {frame, automap, history, action, log_prob, advantage, return} [B, ...].

  The ratio is behaviour(new params) / behaviour(acting params): both are the repeat mixture. The entropy
  bonus is the network policy's (the mixture's repeat part is fixed).
  """
  logits, value = model(batch["frame"], batch["automap"], batch["history"])
  log_probs = agent_lib.behaviour_log_probs(logits, batch["history"][:, -1], repeat_prob)
  log_prob = jnp.take_along_axis(log_probs, batch["action"][:, None], axis=1)[:, 0]
  log_ratio = log_prob - batch["log_prob"]
  ratio = jnp.exp(log_ratio)
  advantage = batch["advantage"]
  if normalize_advantages:
    advantage = (advantage - advantage.mean()) / (advantage.std() + 1e-8)
  policy_loss = clipped_surrogate(ratio, advantage, clip_eps)
  value_loss = jnp.mean((batch["return"] - value) ** 2)
  mean_entropy = jnp.mean(entropy(logits))
  loss = policy_loss + value_coef * value_loss - entropy_coef * mean_entropy
  return loss, {"loss": loss, "policy_loss": policy_loss, "value_loss": value_loss, "entropy": mean_entropy,
                "approx_kl": jnp.mean(ratio - 1.0 - log_ratio),
                "clip_fraction": jnp.mean((jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32))}


class Learner:
  """PPO state {"step" (optimizer steps), "params", "opt_state"} with jitted, sharded `act` and `update`."""

  def __init__(self, model_cfg: agent_lib.AgentConfig, ppo_cfg, optim_cfg, mesh, rules):
    self.model_cfg, self.ppo, self.mesh = model_cfg, ppo_cfg, mesh
    n, t = ppo_cfg.num_envs, ppo_cfg.rollout_steps
    self.num_minibatches = n * t // ppo_cfg.batch_size
    self.num_updates = ppo_cfg.total_env_steps // (n * t)
    self.tx, self.schedule = optim.make_optimizer(
        optim_cfg, self.num_updates * ppo_cfg.epochs * self.num_minibatches)

    def model_fn(rngs):
      return agent_lib.ActorCritic(model_cfg, rngs=rngs)
    self.graphdef, abstract_variables = nnx.split(nnx.eval_shape(lambda: model_fn(nnx.Rngs(0))))
    axes = sharding.logical_axes(abstract_variables)

    def init(rng):
      params = nnx.to_pure_dict(nnx.state(model_fn(nnx.Rngs(rng))))
      return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": self.tx.init(params)}

    abstract_state = jax.eval_shape(init, jax.random.key(0))
    replicated = NamedSharding(mesh, PartitionSpec())
    params_sh = sharding.param_shardings(abstract_state["params"], axes, mesh, rules)
    self.state_shardings = {
        "step": replicated, "params": params_sh,
        "opt_state": sharding.opt_state_shardings(abstract_state["opt_state"], abstract_state["params"],
                                                  params_sh, mesh)}
    self.abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                       abstract_state, self.state_shardings)
    self.init_state = jax.jit(init, out_shardings=self.state_shardings)

    def split_dim(ndim: int, dim: int, size: int) -> NamedSharding:
      """Dimension `dim` (of `size`) over the data-parallel axes where they divide it, the rest replicated."""
      names = tuple("batch" if d == dim else None for d in range(ndim))
      return NamedSharding(mesh, logical_to_spec(names, rules, mesh, tuple(size if d == dim else 1
                                                                             for d in range(ndim))))
    ndims = {"frame": 5, "automap": 5, "history": 3}
    self.obs_shardings = (split_dim(4, 0, n), split_dim(4, 0, n), split_dim(2, 0, n))
    self.rollout_shardings = {k: split_dim(ndims.get(k, 2), 1, n) for k in ROLLOUT_KEYS}
    sample_shardings = {k: split_dim(ndims.get(k, 2) - 1, 0, n * t) for k in SAMPLE_KEYS}
    self._minibatch_shardings = {k: split_dim(ndims.get(k, 2) - 1, 0, ppo_cfg.batch_size) for k in SAMPLE_KEYS}
    act = functools.partial(agent_lib.act, self.graphdef, repeat_prob=ppo_cfg.repeat_prob)
    self._act = jax.jit(act, in_shardings=(params_sh, *self.obs_shardings, replicated), out_shardings=replicated)
    self._samples = jax.jit(self._rollout_samples, in_shardings=(self.rollout_shardings,),
                            out_shardings=(sample_shardings, replicated))
    # The minibatch loop runs on the host: XLA:CPU runs convolutions inside a while loop (lax.scan) an
    # order of magnitude slower than at the top level, and one step per call costs little elsewhere.
    self._minibatch_step = jax.jit(self._step, in_shardings=(self.state_shardings, sample_shardings, replicated),
                                   out_shardings=(self.state_shardings, replicated), donate_argnums=0)

  def act(self, params, frame_nhwc, automap_nhwc, history_nk, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Behaviour actions, their log-probabilities and values [N] for host observations, as numpy."""
    observations = (frame_nhwc, automap_nhwc, history_nk)
    placed = [jax.device_put(x, s) for x, s in zip(observations, self.obs_shardings, strict=True)]
    return tuple(np.asarray(x) for x in self._act(params, *placed, rng))

  def update(self, state, rollout: dict[str, np.ndarray], rng: jax.Array) -> tuple[dict, dict[str, float]]:
    """`epochs` passes of shuffled minibatches over one host rollout; metrics averaged over all minibatches."""
    samples, metrics = self._samples({k: jax.device_put(rollout[k], self.rollout_shardings[k]) for k in ROLLOUT_KEYS})
    size, step_metrics = self.num_minibatches * self.ppo.batch_size, []
    for epoch_rng in jax.random.split(rng, self.ppo.epochs):
      for indices_b in np.asarray(jax.random.permutation(epoch_rng, size)).reshape(self.num_minibatches, -1):
        state, m = self._minibatch_step(state, samples, indices_b)
        step_metrics.append(m)
    step_metrics = jax.device_get(step_metrics)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    metrics.update({k: float(np.mean([m[k] for m in step_metrics])) for k in step_metrics[0]})
    return state, metrics

  def _rollout_samples(self, rollout):
    """GAE over the [T, N] rollout, then its samples flattened game-major (each device keeps its games)."""
    ppo = self.ppo
    advantage_tn, return_tn = gae(rollout["reward"], rollout["value"], rollout["next_value"],
                                  rollout["terminal"], rollout["done"], gamma=ppo.gamma, lam=ppo.gae_lambda)
    samples = {k: rollout[k] for k in ("frame", "automap", "history", "action", "log_prob")}
    samples.update(advantage=advantage_tn, **{"return": return_tn})
    residual = return_tn - rollout["value"]
    explained_variance = 1.0 - jnp.var(residual) / jnp.maximum(jnp.var(return_tn), 1e-8)
    return (jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(-1, *x.shape[2:]), samples),
            {"explained_variance": explained_variance, "mean_return_target": jnp.mean(return_tn)})

  def _step(self, state, samples, indices_b):
    """One optimizer step on the minibatch `indices_b` of the samples."""
    ppo = self.ppo
    batch = {k: jax.lax.with_sharding_constraint(v[indices_b], self._minibatch_shardings[k])
             for k, v in samples.items()}
    loss_fn = functools.partial(ppo_loss, clip_eps=ppo.clip_eps, value_coef=ppo.value_coef,
                                entropy_coef=ppo.entropy_coef, repeat_prob=ppo.repeat_prob,
                                normalize_advantages=ppo.normalize_advantages)
    params = state["params"]
    grads, metrics = jax.grad(lambda p: loss_fn(nnx.merge(self.graphdef, p), batch), has_aux=True)(params)
    updates, opt_state = self.tx.update(grads, state["opt_state"], params)
    metrics.update(grad_norm=optax.tree.norm(grads), learning_rate=self.schedule(state["step"]))
    return {"step": state["step"] + 1, "params": optax.apply_updates(params, updates), "opt_state": opt_state}, metrics
