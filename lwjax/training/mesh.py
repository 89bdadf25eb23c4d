"""Device mesh from config: named axes `data`, `fsdp`, `tensor`; one size may be -1 (fill)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from lwjax.config import ConfigError, Field

AXES = ("data", "fsdp", "tensor")
# FSDP shards the embed dimension of weights; tensor parallelism shards heads and the MLP hidden
# dimension; the batch is split over every data-parallel axis.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),  # a scanned GPT's stacked layers axis (`lwjax.models.layer_stack`): a scan step takes one
)
# Serving (`lwjax.serving.tensor_parallel`): weights over `tensor` only (heads, kv heads, the MLP hidden and the
# vocabulary), the paged KV pool over kv heads. No fsdp split: a decode step would all-gather every layer's
# weights, the whole model over the links per token. No data split: one engine's rows share one scheduler and one
# KV pool (data-parallel replicas are separate engines).
SERVING_RULES = (
    ("batch", None),
    ("length", None),
    ("embed", None),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("layers", None),
)
SCHEMA = {
    "shape": {axis: Field(int, check=lambda v: None if v == -1 or v >= 1 else "must be >= 1 or -1 (fill)",
                          doc="-1 fills with the remaining devices") for axis in AXES},
    "rules": Field((list, tuple), doc="[[logical_name, mesh_axis | [mesh_axes] | None], ...]",
                   check=lambda rules: _check_rules(rules)),
}


def _check_rules(rules) -> str | None:
  for rule in rules:
    if len(rule) != 2 or not isinstance(rule[0], str):
      return f"rule {rule!r} is not [logical_name, mesh_axes]"
    targets = [] if rule[1] is None else ([rule[1]] if isinstance(rule[1], str) else list(rule[1]))
    if unknown := [t for t in targets if t not in AXES]:
      return f"rule {rule!r} names unknown mesh axes {unknown} (mesh axes: {', '.join(AXES)})"
  return None


def resolve_shape(shape: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Axis sizes in AXES order with a -1 filled; raises ConfigError when they cannot cover the devices."""
  sizes = [int(shape[axis]) for axis in AXES]
  if sizes.count(-1) > 1:
    raise ConfigError("mesh.shape", "at most one axis may be -1", "one -1, the rest >= 1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError("mesh.shape", f"{num_devices} devices are not divisible by {known}",
                        f"sizes whose product divides {num_devices}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError("mesh.shape", f"product {math.prod(sizes)} != {num_devices} devices",
                      f"sizes whose product is {num_devices}, or -1 on one axis")
  return tuple(sizes)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh over `devices` (default: all) with axes (data, fsdp, tensor).

  With the default devices, `jax.make_mesh` orders them for the physical topology (ICI rings on TPU)
  so that the innermost axis (tensor) gets the fastest links.
  """
  if devices is None:
    sizes = resolve_shape(shape, jax.device_count())
    return jax.make_mesh(sizes, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))
  sizes = resolve_shape(shape, len(devices))
  return Mesh(np.asarray(devices).reshape(sizes), AXES)
