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
import threading
from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalAxes = tuple[str | None, ...]
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
