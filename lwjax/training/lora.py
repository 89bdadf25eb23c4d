"""LoRA adapters over a params pytree (Hu et al. 2021, arXiv 2106.09685; the LoRA arm of Physics of LMs 2.2, Result 7).

A pure transform: the base params stay frozen and outside the optimizer; the trainable pytree holds one
(a, b) pair per adapted weight, and the forward uses `merge(base, adapters)`, i.e. W + (alpha / rank) a b:

  adapters = lora.init(base, config, key)              # b = 0: the model is unchanged at the start
  loss = lambda ad: loss_fn(nnx.merge(graphdef, lora.merge(base, ad, config)), batch)
  grads = jax.grad(loss)(adapters)                      # gradients (and optimizer state) for a, b only
  serving_params = lora.merge(base, adapters, config)   # one plain pytree, same shapes as `base`

The GPT's weights keep their head axes (wq [d, h, k], wo [h, k, d]), so `a` covers a weight's input axes
and `b` its output axes: wq/wk/wv and the MLP take one input axis, wo two ([h, k] is its input).
Materialising W + s a b costs d_in * d_out * rank per weight and step, small next to the matmuls over a
batch of tokens, and keeps the model code free of adapter logic.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import traverse_util

from lwjax.config import Field, positive_int

TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
_INPUT_AXES = {"wo": 2}  # input axes of a weight when not 1

SCHEMA = {
    "rank": positive_int(),
    "alpha": Field(float, min=0.0, doc="the update is scaled by alpha / rank"),
    "targets": Field(str, check=lambda v: None if v and set(v.split(",")) <= set(TARGETS) else
                     f"{v!r} names a weight outside the targets", doc="comma-separated: " + ",".join(TARGETS)),
}


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = TARGETS

  def __post_init__(self):
    unknown = set(self.targets) - set(TARGETS)
    if unknown or not self.targets or self.rank < 1:
      raise ValueError(f"LoRA rank {self.rank} (>= 1), targets {self.targets} (a subset of {TARGETS})")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @classmethod
  def from_dict(cls, d) -> LoRAConfig:
    return cls(rank=d["rank"], alpha=float(d["alpha"]), targets=tuple(d["targets"].split(",")))


def _key(path: tuple) -> str:
  return "/".join(str(k) for k in path)


def init(params, config: LoRAConfig, key: jax.Array) -> dict[str, dict[str, jax.Array]]:
  """Adapters {"layers/0/attn/wq": {"a": [*in, r], "b": [r, *out]}} for every targeted weight of `params`;
  `a` ~ N(0, 1 / fan_in) and `b` = 0, in float32."""
  adapters = {}
  flat = traverse_util.flatten_dict(params)
  targeted = [path for path in flat if path[-1] in config.targets]
  if not targeted:
    raise ValueError(f"no weight of the params is named one of {config.targets}")
  for path, k in zip(targeted, jax.random.split(key, len(targeted)), strict=False):
    w = flat[path]
    n_in = _INPUT_AXES.get(path[-1], 1)
    in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
    fan_in = math.prod(in_shape)
    adapters[_key(path)] = {
        "a": jax.random.normal(k, (*in_shape, config.rank), jnp.float32) * fan_in ** -0.5,
        "b": jnp.zeros((config.rank, *out_shape), jnp.float32),
    }
  return adapters


def delta(adapter: dict[str, jax.Array], config: LoRAConfig) -> jax.Array:
  """The weight update (alpha / rank) a b, shaped like the adapted weight."""
  return config.scale * jnp.tensordot(adapter["a"], adapter["b"], axes=1)


def merge(params, adapters: dict, config: LoRAConfig):
  """`params` with each adapted weight replaced by W + (alpha / rank) a b (in W's dtype); the whole base is a
  constant (stop_gradient), so gradients flow to the adapters only."""
  flat = {path: jax.lax.stop_gradient(w) for path, w in traverse_util.flatten_dict(params).items()}
  names = {_key(path): path for path in flat}
  missing = set(adapters) - set(names)
  if missing:
    raise ValueError(f"adapters for weights the params lack: {sorted(missing)}")
  for name, adapter in adapters.items():
    w = flat[names[name]]
    flat[names[name]] = (w.astype(jnp.float32) + delta(adapter, config)).astype(w.dtype)
  return traverse_util.unflatten_dict(flat)


def num_params(adapters: dict) -> int:
  """Trainable parameter count of `adapters`."""
  return sum(x.size for x in jax.tree.leaves(adapters))
