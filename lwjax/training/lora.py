"""LoRA adapters over a params pytree (Hu et al. 2021, arXiv 2106.09685; the LoRA arm of Physics of LMs 2.2, Result 7).

A pure transform: the base params stay frozen and outside the optimizer; the trainable pytree holds one
(a, b) pair per adapted weight, nested like the params ({"layers": {0: {"attn": {"wq": {"a", "b"}}}}}), and the
forward uses `merge(base, adapters)`, i.e. W + (alpha / rank) a b:

  adapters = lora.init(base, config, key)              # b = 0: the model is unchanged at the start
  loss = lambda ad: loss_fn(nnx.merge(graphdef, lora.merge(base, ad, config)), batch)
  grads = jax.grad(loss)(adapters)                      # gradients (and optimizer state) for a, b only
  serving_params = lora.merge(base, adapters, config)   # one plain pytree, same shapes as `base`

The GPT's weights keep their head axes (wq [d, h, k], wo [h, k, d]), so `a` covers a weight's input axes
and `b` its output axes: wq/wk/wv and the MLP take one input axis, wo two ([h, k] is its input). Each factor
takes the logical axes of the axes it covers (the rank axis is replicated), so `a b` comes out sharded like W.
Materialising W + s a b costs d_in * d_out * rank per weight and step, small next to the matmuls over a
batch of tokens, and keeps the model code free of adapter logic; the price is that the backward still forms
the weight gradient of each adapted W (x^T dy) before projecting it onto a and b, where a factored forward
(x a) b would not. No LoRA dropout: it acts on the input of `a`, which the merged form has no place for.

A scanned GPT's weights (`GPTConfig.scan_layers`) carry a leading `layers` axis: each layer gets its own pair,
stacked the same way (a [layers, *in, r], b [layers, r, *out]).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import traverse_util

from lwjax.config import Field, non_negative_int

TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
_INPUT_AXES = {"wo": 2}  # input axes of a weight when not 1
_NDIM = {"wq": 3, "wk": 3, "wv": 3, "wo": 3, "w_gate": 2, "w_up": 2, "w_down": 2}  # one layer's weight


def _check_targets(value: str) -> str | None:
  names = value.split(",")
  if not value or not set(names) <= set(TARGETS) or len(set(names)) != len(names):
    return f"{value!r} is not a comma-separated list of distinct weights of {TARGETS}"
  return None


SCHEMA = {
    "rank": non_negative_int("adapter rank r; 0 = off (all weights train)"),
    "alpha": Field(float, min=0.0, doc="the update is scaled by alpha / rank"),
    "targets": Field(str, check=_check_targets, doc="comma-separated: " + ",".join(TARGETS)),
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


def from_section(section) -> LoRAConfig | None:
  """The LoRA of a config group with `SCHEMA`'s keys (e.g. `train.lora`); None when absent or rank 0."""
  if section is None or not section["rank"]:
    return None
  return LoRAConfig.from_dict(section)


def _targeted(params, config: LoRAConfig) -> list[tuple]:
  """Paths (tuples of dict keys) of the weights of `params` that `config` adapts, in flatten order."""
  targeted = [path for path in traverse_util.flatten_dict(params) if path[-1] in config.targets]
  if not targeted:
    raise ValueError(f"no weight of the params is named one of {config.targets}")
  return targeted


def _split(path: tuple, shape: tuple) -> tuple[tuple, tuple, tuple]:
  """(leading axes (a stacked weight's `layers`), input axes, output axes) of the weight at `path`."""
  lead = len(shape) - _NDIM[path[-1]]
  n_in = _INPUT_AXES.get(path[-1], 1)
  return shape[:lead], shape[lead:lead + n_in], shape[lead + n_in:]


def init(params, config: LoRAConfig, key: jax.Array) -> dict:
  """Adapters {"a": [*in, r], "b": [r, *out]} at the path of every targeted weight of `params` (only the shapes
  are read: abstract params do); `a` ~ N(0, 1 / fan_in) and `b` = 0, in float32."""
  flat = traverse_util.flatten_dict(params)
  targeted = _targeted(params, config)
  adapters = {}
  for path, k in zip(targeted, jax.random.split(key, len(targeted)), strict=True):
    lead, in_shape, out_shape = _split(path, flat[path].shape)
    adapters[path + ("a",)] = (jax.random.normal(k, (*lead, *in_shape, config.rank), jnp.float32)
                               * math.prod(in_shape) ** -0.5)
    adapters[path + ("b",)] = jnp.zeros((*lead, config.rank, *out_shape), jnp.float32)
  return traverse_util.unflatten_dict(adapters)


def logical_axes(param_axes, config: LoRAConfig) -> dict:
  """The adapters' logical axes from the params' (a tree of axis-name tuples shaped like the params): `a` takes
  the weight's input axes, `b` its output axes (both the leading ones too), the rank axis none (replicated)."""
  flat = traverse_util.flatten_dict(param_axes)
  axes = {}
  for path in _targeted(param_axes, config):
    lead, in_axes, out_axes = _split(path, tuple(flat[path]))
    axes[path + ("a",)], axes[path + ("b",)] = (*lead, *in_axes, None), (*lead, None, *out_axes)
  return traverse_util.unflatten_dict(axes)


def delta(adapter: dict[str, jax.Array], config: LoRAConfig, lead: int = 0) -> jax.Array:
  """The weight update (alpha / rank) a b, shaped like the adapted weight; per slice of the first `lead` axes
  (a stacked weight's layers)."""
  product = functools.partial(jnp.tensordot, axes=1)
  for _ in range(lead):
    product = jax.vmap(product)
  return config.scale * product(adapter["a"], adapter["b"])


def merge(params, adapters: dict, config: LoRAConfig):
  """`params` with each adapted weight replaced by W + (alpha / rank) a b (in W's dtype); the whole base is a
  constant (stop_gradient), so gradients flow to the adapters only."""
  flat = {path: jax.lax.stop_gradient(w) for path, w in traverse_util.flatten_dict(params).items()}
  pairs = traverse_util.flatten_dict(adapters, is_leaf=lambda _, node: set(node) == {"a", "b"})
  if missing := set(pairs) - set(flat):
    raise ValueError(f"adapters for weights the params lack: {sorted(map(str, missing))}")
  for path, adapter in pairs.items():
    w = flat[path]
    lead = len(_split(path, w.shape)[0])
    flat[path] = (w.astype(jnp.float32) + delta(adapter, config, lead)).astype(w.dtype)
  return traverse_util.unflatten_dict(flat)


def num_params(adapters: dict) -> int:
  """Trainable parameter count of `adapters`."""
  return sum(x.size for x in jax.tree.leaves(adapters))
