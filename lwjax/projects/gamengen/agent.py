"""GameNGen's PPO agent network and behaviour policy (arXiv 2408.14837, sec. 4.1 and appendix A.5).

The paper's agent sees the frame and the automap, both at 160x120, and the last 32 actions; a Nature-CNN
(Mnih et al. 2015) encodes each image to 512 features, the action history is embedded, and 2-layer MLP
heads give the actor's logits and the critic's value. `ActorCritic` is that network (two linear layers
per head: one hidden layer of `head_hidden` units, then the output).

Images are average-pooled on the host before they reach the network (`preprocess`): the 320x240 frame by
2 and the 160x120 automap not at all give the paper's 160x120 (`image_pool=1`); `image_pool=2` halves both
again (80x60) for CPU-sized runs.

Behaviour policy: the paper raises the chance of repeating the previous action. Here the action is the
previous one with probability `repeat_prob` and otherwise a sample of the network's policy pi; never a
repeat on an episode's first step. The behaviour distribution is the mixture
`(1 - repeat_prob) * pi(a) + repeat_prob * [a == previous]`, and that is the policy PPO optimises: its
log-probability is stored at acting time and recomputed with the new parameters for the ratio
(`behaviour_log_probs`).

The action history is int32 [N, HISTORY] of action ids, oldest first; `NO_ACTION` (= NUM_ACTIONS, an
embedding of its own) fills it at an episode's start (`ActionHistory`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lwjax.config import option, schema_of
from lwjax.projects.gamengen.env import AUTOMAP_SHAPE, FRAME_SHAPE, NUM_ACTIONS
from lwjax.training import checkpoint

NO_ACTION = NUM_ACTIONS  # history id before an episode's first action
IMAGE_POOLS = (1, 2)  # 160x120 (the paper) or 80x60; the Nature-CNN needs at least 36 pixels a side


def _check_channels(channels) -> str | None:
  if len(channels) != 3 or not all(isinstance(c, int) and c > 0 for c in channels):
    return f"{channels!r} is not three positive ints"
  return None


@dataclasses.dataclass(frozen=True)
class AgentConfig:
  """The network's shape. The defaults are the paper's (Nature-CNN widths, 512 features, 32 actions)."""
  image_pool: int = option(1, choices=IMAGE_POOLS, doc="1 = the paper's 160x120 frame and automap, 2 = 80x60")
  history: int = option(32, min=1, doc="past actions the agent sees (32 in the paper)")
  action_embed_dim: int = option(16, min=1)
  cnn_channels: tuple[int, int, int] = option((32, 64, 64), check=_check_channels,
                                              doc="the three convolutions' widths")
  features: int = option(512, min=1, doc="Nature-CNN output features per image")
  head_hidden: int = option(512, min=1, doc="hidden units of the actor and critic heads")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> AgentConfig:
    d = dict(d)
    return cls(**{**d, "cnn_channels": tuple(d["cnn_channels"])})

  @property
  def image_hw(self) -> tuple[int, int]:
    return AUTOMAP_SHAPE[0] // self.image_pool, AUTOMAP_SHAPE[1] // self.image_pool


SCHEMA = schema_of(AgentConfig)


def pool_images(x_bhwc: np.ndarray, factor: int) -> np.ndarray:
  """uint8 [B, H, W, C] -> [B, H/factor, W/factor, C] by a rounded mean over factor x factor blocks."""
  if factor == 1:
    return x_bhwc
  b, h, w, c = x_bhwc.shape
  blocks = x_bhwc.reshape(b, h // factor, factor, w // factor, factor, c).astype(np.uint16)
  return ((blocks.sum(axis=(2, 4)) + factor * factor // 2) // (factor * factor)).astype(np.uint8)


def preprocess(frame_bhwc: np.ndarray, automap_bhwc: np.ndarray, image_pool: int) -> tuple[np.ndarray, np.ndarray]:
  """The env's frame [B, 240, 320, 3] and automap [B, 120, 160, 3] at the network's size (uint8)."""
  return (pool_images(frame_bhwc, FRAME_SHAPE[0] // AUTOMAP_SHAPE[0] * image_pool),
          pool_images(automap_bhwc, image_pool))


def _dense(rngs: nnx.Rngs, d_in: int, d_out: int, scale: float, axes: tuple) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, kernel_init=nnx.initializers.orthogonal(scale), rngs=rngs,
                    kernel_metadata={"logical_axes": axes}, bias_metadata={"logical_axes": axes[1:]})


class NatureCNN(nnx.Module):
  """Mnih et al. (2015): 8x8/4, 4x4/2 and 3x3/1 valid convolutions with ReLU, then a dense ReLU layer.

  uint8 images [B, H, W, 3] -> features [B, features]. The agent is small: its convolutions stay replicated.
  """

  def __init__(self, image_hw: tuple[int, int], channels: tuple[int, int, int], features: int, *, rngs: nnx.Rngs):
    specs = ((8, 4), (4, 2), (3, 1))
    self.convs = nnx.List()
    c_in, (h, w) = 3, image_hw
    for c_out, (k, s) in zip(channels, specs, strict=False):
      self.convs.append(nnx.Conv(c_in, c_out, (k, k), (s, s), padding="VALID", rngs=rngs,
                                 kernel_init=nnx.initializers.orthogonal(np.sqrt(2)),
                                 kernel_metadata={"logical_axes": (None, None, None, None)},
                                 bias_metadata={"logical_axes": (None,)}))
      c_in, h, w = c_out, (h - k) // s + 1, (w - k) // s + 1
    self.dense = _dense(rngs, c_in * h * w, features, np.sqrt(2), (None, "mlp"))

  def __call__(self, images_bhwc: jax.Array) -> jax.Array:
    x = images_bhwc.astype(jnp.float32) / 255.0
    for conv in self.convs:
      x = jax.nn.relu(conv(x))
    return jax.nn.relu(self.dense(x.reshape(x.shape[0], -1)))


class ActorCritic(nnx.Module):
  """(frame [B, h, w, 3] uint8, automap [B, h, w, 3] uint8, history [B, K] int32) -> (logits [B, A], value [B])."""

  def __init__(self, cfg: AgentConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.frame_cnn = NatureCNN(cfg.image_hw, cfg.cnn_channels, cfg.features, rngs=rngs)
    self.automap_cnn = NatureCNN(cfg.image_hw, cfg.cnn_channels, cfg.features, rngs=rngs)
    self.action_embed = nnx.Embed(NUM_ACTIONS + 1, cfg.action_embed_dim, rngs=rngs,
                                  embedding_metadata={"logical_axes": (None, None)})
    d = 2 * cfg.features + cfg.history * cfg.action_embed_dim
    # SB3's initialisation: orthogonal, gain 0.01 on the policy output (near-uniform start), 1 on the value.
    self.actor_hidden = _dense(rngs, d, cfg.head_hidden, np.sqrt(2), ("mlp", None))
    self.actor_out = _dense(rngs, cfg.head_hidden, NUM_ACTIONS, 0.01, (None, None))
    self.critic_hidden = _dense(rngs, d, cfg.head_hidden, np.sqrt(2), ("mlp", None))
    self.critic_out = _dense(rngs, cfg.head_hidden, 1, 1.0, (None, None))

  def __call__(self, frame_bhwc, automap_bhwc, history_bk) -> tuple[jax.Array, jax.Array]:
    history = self.action_embed(history_bk).reshape(history_bk.shape[0], -1)
    x = jnp.concatenate([self.frame_cnn(frame_bhwc), self.automap_cnn(automap_bhwc), history], axis=-1)
    logits = self.actor_out(jax.nn.relu(self.actor_hidden(x)))
    value = self.critic_out(jax.nn.relu(self.critic_hidden(x)))[:, 0]
    return logits, value


def behaviour_log_probs(logits_ba: jax.Array, previous_b: jax.Array, repeat_prob: float) -> jax.Array:
  """log of the behaviour distribution [B, A]: (1 - p) * softmax(logits) + p * onehot(previous).

  p is `repeat_prob` where there is a previous action and 0 where `previous` is NO_ACTION.
  """
  has_previous = previous_b < NUM_ACTIONS
  p = jnp.where(has_previous, repeat_prob, 0.0)[:, None]
  is_previous = jax.nn.one_hot(previous_b, NUM_ACTIONS, dtype=bool)
  log_pi = jax.nn.log_softmax(logits_ba.astype(jnp.float32))
  repeat = jnp.where(is_previous & (p > 0), jnp.log(jnp.where(p > 0, p, 1.0)), -jnp.inf)
  return jnp.logaddexp(jnp.log1p(-p) + log_pi, repeat)


def sample_behaviour(rng: jax.Array, logits_ba: jax.Array, previous_b: jax.Array,
                     repeat_prob: float) -> tuple[jax.Array, jax.Array]:
  """Actions [B] of the behaviour policy and their behaviour log-probabilities [B]."""
  repeat_rng, pi_rng = jax.random.split(rng)
  repeat = (jax.random.uniform(repeat_rng, previous_b.shape) < repeat_prob) & (previous_b < NUM_ACTIONS)
  actions = jnp.where(repeat, previous_b, jax.random.categorical(pi_rng, logits_ba)).astype(jnp.int32)
  log_probs = behaviour_log_probs(logits_ba, previous_b, repeat_prob)
  return actions, jnp.take_along_axis(log_probs, actions[:, None], axis=1)[:, 0]


class ActionHistory:
  """The last `length` actions of each of `num_envs` games on the host (int32 [N, length], oldest first)."""

  def __init__(self, num_envs: int, length: int):
    self.actions_nk = np.full((num_envs, length), NO_ACTION, np.int32)

  def push(self, actions_n: np.ndarray) -> None:
    self.actions_nk = self.pushed(actions_n)

  def reset(self, first_n: np.ndarray) -> None:
    """Clears the games starting an episode (`obs["first"]`)."""
    self.actions_nk[np.asarray(first_n, bool)] = NO_ACTION

  def pushed(self, actions_n: np.ndarray) -> np.ndarray:
    """The history after `push(actions_n)`, without changing this one."""
    return np.concatenate([self.actions_nk[:, 1:], np.asarray(actions_n, np.int32)[:, None]], axis=1)


def act(graphdef: nnx.GraphDef, params, frame_bhwc, automap_bhwc, history_bk, rng: jax.Array, *,
        repeat_prob: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One acting step: behaviour actions [B], their behaviour log-probabilities [B], values [B]."""
  logits, values = nnx.merge(graphdef, params)(frame_bhwc, automap_bhwc, history_bk)
  actions, log_probs = sample_behaviour(rng, logits, history_bk[:, -1], repeat_prob)
  return actions, log_probs, values


def load_agent(workdir: str, step: int | None = None) -> tuple[ActorCritic, dict, int]:
  """The agent of a `gamengen_agent` run's checkpoint (default: latest): (model, run config, step)."""
  return checkpoint.load_model(os.path.join(workdir, "checkpoints"),
                               lambda config: ActorCritic(AgentConfig.from_dict(config["model"]), rngs=nnx.Rngs(0)),
                               step)


class AgentPolicy:
  """A trained agent as a policy for `record` (obs -> actions [N]), acting with its behaviour policy."""

  def __init__(self, model: ActorCritic, repeat_prob: float, seed: int = 0):
    self.cfg = model.cfg
    graphdef, self.params = nnx.split(model)
    self._act = jax.jit(functools.partial(act, graphdef, repeat_prob=repeat_prob))
    self.rng, self.history = jax.random.key(seed), None

  def __call__(self, obs: dict[str, np.ndarray]) -> np.ndarray:
    if self.history is None:
      self.history = ActionHistory(len(obs["first"]), self.cfg.history)
    self.history.reset(obs["first"])
    frame, automap = preprocess(obs["frame"], obs["automap"], self.cfg.image_pool)
    self.rng, rng = jax.random.split(self.rng)
    actions = np.asarray(self._act(self.params, frame, automap, self.history.actions_nk, rng)[0])
    self.history.push(actions)
    return actions
