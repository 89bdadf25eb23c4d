"""Logical-axis rules -> `NamedSharding`s for parameters, optimizer state and batches."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lwjax.models.logical import Rules, logical_to_spec


def rules_from_config(rules) -> tuple:
  """Config rules ([[name, axis | [axes] | None], ...]) as hashable tuples."""
  return tuple((name, tuple(t) if isinstance(t, (list, tuple)) else t) for name, t in rules)


def logical_axes(abstract_state: nnx.State) -> dict:
  """The `logical_axes` metadata of every Variable, as a pure dict shaped like the parameters."""
  def axes_of(variable):
    axes = variable.get_metadata().get("logical_axes")
    if axes is None:
      raise ValueError(f"parameter of shape {variable.shape} has no logical_axes metadata")
    return axes
  tree = jax.tree.map(axes_of, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return nnx.to_pure_dict(tree)


def param_shardings(abstract_params: Any, axes: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedSharding per parameter from its logical axes (a tree of tuples shaped like the params)."""
  return jax.tree.map(
      lambda a, names: NamedSharding(mesh, logical_to_spec(names, rules, mesh, a.shape)),
      abstract_params, axes, is_leaf=lambda x: isinstance(x, tuple))


def dict_path(path) -> tuple:
  """The dict keys of a pytree path (what `frozen` predicates and the shardings read)."""
  return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def opt_state_shardings(abstract_opt_state: Any, abstract_params: Any, params_shardings: Any,
                        mesh: Mesh) -> Any:
  """Shards each optimizer leaf like the parameter it mirrors (same dict path suffix and shape).

  Adam moments mirror parameters exactly; Adafactor's factored row/column statistics and scalars
  (counts) have other shapes and stay replicated.
  """
  by_path = {}
  flat_params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
  flat_shardings = jax.tree.leaves(params_shardings)
  for (path, leaf), sharding in zip(flat_params, flat_shardings, strict=False):
    by_path[dict_path(path)] = (leaf.shape, sharding)
  replicated = NamedSharding(mesh, PartitionSpec())

  def pick(path, leaf):
    keys = dict_path(path)
    for start in range(len(keys)):
      hit = by_path.get(keys[start:])
      if hit is not None and hit[0] == leaf.shape:
        return hit[1]
    return replicated
  return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 1) -> NamedSharding:
  """Sharding of a [batch, ...] input of any rank >= `ndim`: batch over the data-parallel axes, the rest
  replicated (a spec names only the leading dimensions)."""
  spec = logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh)
  return NamedSharding(mesh, spec)
