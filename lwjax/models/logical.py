"""Logical axis names for parameters and activations, resolved to mesh axes by rules set from outside.

Models name axes logically (`"batch"`, `"embed"`, `"heads"`, ...). Parameters carry their names as the
`logical_axes` metadata of their `nnx.Variable`; activations call `constrain(x, axes)`. The mapping from
logical names to mesh axes (`rules`) and the mesh are installed by the caller with `axis_rules(...)`,
so model code never names a mesh axis (the MaxText / big_vision convention).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import threading
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lwjax.config import ConfigError

LogicalAxes = tuple[str | None, ...]
# The GPTConfig size behind each logical name, for `check_divisible`.
SIZED_BY = (("vocab", "vocab_size"), ("embed", "d_model"), ("heads", "n_heads"), ("kv_heads", "n_kv_heads"),
            ("head_dim", "head_dim"), ("mlp", "d_ff"))
MAX_LISTED_EXTENT = 64  # an error lists the extents up to this that would divide (no jax.devices(): checked early)
# A rule maps one logical name to a mesh axis, a tuple of mesh axes, or None (replicated).
Rules = Sequence[tuple[str, str | Sequence[str] | None]]


@dataclasses.dataclass
class _Context(threading.local):
  mesh: Mesh | None = None
  rules: tuple = ()


_CONTEXT = _Context()


@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules: Rules):
  """Installs `mesh` and `rules` for `constrain` (and sharding helpers) inside the block."""
  old = (_CONTEXT.mesh, _CONTEXT.rules)
  _CONTEXT.mesh, _CONTEXT.rules = mesh, tuple(rules)
  try:
    yield
  finally:
    _CONTEXT.mesh, _CONTEXT.rules = old


def logical_to_spec(axes: LogicalAxes, rules: Rules, mesh: Mesh, shape: Sequence[int] | None = None
                    ) -> PartitionSpec:
  """Resolves logical axis names to a `PartitionSpec` on `mesh`.

  Each logical name takes the mesh axes its rule gives, skipping mesh axes of size 1, mesh axes
  already used by an earlier dimension, and (when `shape` is given) mesh axes whose size does not
  divide the dimension: those dimensions stay replicated over that axis instead of failing to compile.
  """
  table = {}
  for name, target in rules:
    table.setdefault(name, target)
  used: set[str] = set()
  spec = []
  for dim, name in enumerate(axes):
    target = table.get(name) if name is not None else None
    if target is None:
      spec.append(None)
      continue
    targets = (target,) if isinstance(target, str) else tuple(target)
    chosen, extent = [], 1
    for axis in targets:
      size = mesh.shape[axis]
      if size == 1 or axis in used:
        continue
      if shape is not None and shape[dim] % (extent * size):
        logging.debug("logical axis %s (dim %d, size %d) not divisible by mesh axis %s=%d; replicated",
                      name, dim, shape[dim], axis, size)
        continue
      chosen.append(axis)
      extent *= size
    used.update(chosen)
    spec.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
  return PartitionSpec(*spec)


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
  """Constrains an activation's sharding by logical axes; a no-op when no rules are installed."""
  if _CONTEXT.mesh is None:
    return x
  if len(axes) != x.ndim:
    raise ValueError(f"logical axes {axes} do not match activation of shape {x.shape}")
  spec = logical_to_spec(axes, _CONTEXT.rules, _CONTEXT.mesh, x.shape)
  return jax.lax.with_sharding_constraint(x, NamedSharding(_CONTEXT.mesh, spec))


def current_mesh() -> Mesh | None:
  """The mesh installed by `axis_rules`, or None outside it."""
  return _CONTEXT.mesh


def spec_for(axes: LogicalAxes, shape: Sequence[int]) -> PartitionSpec:
  """The PartitionSpec the installed rules give an array of `shape` with logical `axes`."""
  return logical_to_spec(axes, _CONTEXT.rules, _CONTEXT.mesh, shape)


def check_divisible(cfg, sizes: Mapping[str, int], rules: Rules, section: str = "model") -> None:
  """ConfigError naming `<section>.<key>` for the first size of `cfg` (a GPTConfig) that the mesh axes it is
  sharded over by `rules` do not divide (heads, kv heads, the MLP hidden, the vocabulary, ...), on a mesh of axis
  `sizes` (`mesh.shape`, or the config's; a -1 is not checked): before anything is lowered, where XLA would fail
  with an IndivisibleError or `logical_to_spec` would replicate the dimension silently."""
  table = {}
  for name, target in rules:
    table.setdefault(name, target)
  for axis_name, key in SIZED_BY:
    target = table.get(axis_name)
    targets = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    split = [(axis, sizes[axis]) for axis in targets if sizes.get(axis, 1) > 1]
    extent = math.prod(size for _, size in split)
    value = getattr(cfg, key)
    if value % extent:
      axes = " x ".join(f"{axis}={size}" for axis, size in split)
      fits = ", ".join(str(d) for d in range(1, max(extent, MAX_LISTED_EXTENT) + 1) if value % d == 0)
      where = f"mesh.shape.{split[0][0]}" if len(split) == 1 else "the product " + " x ".join(a for a, _ in split)
      raise ConfigError(f"{section}.{key}", f"{value} is not divisible by mesh axis {axes}",
                        f"{where} in {fits}; or the rule [{axis_name!r}, None] in mesh.rules")
