"""The serving engine on a device mesh, tensor parallel (Megatron-LM's split, Shoeybi et al. 2019, §3, as vLLM and
NanoFlow serve a 70B model on 8 GPUs): where the engine's arrays live and what a mesh must divide.

Weights are sharded by their logical axes under `SERVING_RULES` (`lwjax.training.mesh`: heads, kv heads, the MLP
hidden and the vocabulary over `tensor`); the paged KV pool over kv heads, so each shard holds the keys and values
of the query heads it computes (`GPT` attends per shard, `Attention._paged_attention`); a hybrid's recurrent-state
pools over heads (its Mamba kernels run per shard of heads, `mamba_hybrid._per_shard`); page tables, slots,
lengths, sampling arrays and the sampled tokens are replicated: the scheduler, the prefix cache, preemption and KV
offload work on global page ids, as on one device.

A serving mesh is the first devices its shape covers (`serving_mesh`), not every device as training's: one
machine may hold an engine of tensor=2 beside other work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lwjax.config import ConfigError
from lwjax.models import logical
from lwjax.models.logical import Rules, logical_to_spec
from lwjax.training import mesh as mesh_lib

# The model config key sized by each logical axis a rule may shard (checked to divide the mesh axes it maps to).
SIZED_BY = logical.SIZED_BY
KV_POOL_AXES = ("kv_heads", None, None, None)  # [kv_heads, num_pages, page_size, head_dim]
PARALLEL_AXIS = "tensor"  # the one mesh axis an engine splits over; the rest must be 1 (replicas: separate engines)


def serving_mesh(shape: Mapping[str, int]) -> Mesh:
  """The mesh (axes data, fsdp, tensor) over the first devices `shape` covers; a -1 fills every device.
  ConfigError naming `mesh.shape` when it asks for more devices than there are."""
  devices = jax.devices()
  sizes = [int(shape[axis]) for axis in mesh_lib.AXES]
  if -1 not in sizes:
    if math.prod(sizes) > len(devices):
      raise ConfigError("mesh.shape", f"{dict(shape)} needs {math.prod(sizes)} devices, {len(devices)} present",
                        f"sizes whose product is at most {len(devices)}")
    devices = devices[:math.prod(sizes)]
  return mesh_lib.make_mesh(shape, devices)


def tensor_mesh(shape: Mapping[str, int]) -> Mesh | None:
  """The engine's mesh in a job whose `mesh.shape` is training's (`data` and `fsdp` there fill the devices to train):
  tensor parallel over the first `mesh.shape.tensor` devices (`serving_mesh`), or None for tensor=1."""
  if int(shape[PARALLEL_AXIS]) == 1:
    return None
  return serving_mesh({**{axis: 1 for axis in mesh_lib.AXES}, PARALLEL_AXIS: shape[PARALLEL_AXIS]})


def check_mesh(sizes: Mapping[str, int]) -> None:
  """ConfigError unless a mesh of axis `sizes` (`mesh.shape`, or the config's before it is built) splits over
  `tensor` alone (data-parallel replicas are separate engines: `lwjax.serving.replicas`)."""
  for axis, size in sizes.items():
    if axis != PARALLEL_AXIS and size != 1:
      raise ConfigError(f"mesh.shape.{axis}", f"{size}: the engine runs tensor parallel only (one engine's rows "
                        "share one scheduler and KV pool)", f"1, with the devices on mesh.shape.{PARALLEL_AXIS}")


def check_shapes(cfg, sizes: Mapping[str, int], rules: Rules, section: str = "model") -> None:
  """`logical.check_divisible` of the model's sizes on the serving mesh (the engine, `serve`'s validation)."""
  logical.check_divisible(cfg, sizes, rules, section)


def param_shardings(state: nnx.State, mesh: Mesh, rules: Rules):
  """A NamedSharding in place of each parameter of a model's `state` (abstract or not), from its `logical_axes`."""
  def place(variable):
    axes = variable.get_metadata().get("logical_axes")
    if axes is None:
      raise ValueError(f"parameter of shape {variable.shape} has no logical_axes metadata")
    return NamedSharding(mesh, logical_to_spec(axes, rules, mesh, variable.shape))
  return jax.tree.map(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _is_axes(x) -> bool:
  """A tuple of logical axis names (a leaf of a tree of them), not a tuple of such tuples."""
  return isinstance(x, tuple) and any(isinstance(a, str) for a in x) and all(a is None or isinstance(a, str)
                                                                              for a in x)


@dataclasses.dataclass(frozen=True)
class EngineShardings:
  """Where an engine's arrays live on `mesh` under `rules`: the parameters (`params`, shaped like the model's
  `nnx.State`), the per-layer KV pools (`kv_pool`), a hybrid's recurrent-state pools (`states`, shaped like
  `HybridGPT.init_slot_states`: over heads; None for a GPT) and everything else (`replicated`). Hashable: the
  engine's jitted programs are cached per model structure and placement."""
  mesh: Mesh
  rules: tuple
  params_treedef: Any
  params_leaves: tuple[NamedSharding, ...]
  kv_pool: NamedSharding
  states: Any = None

  @classmethod
  def build(cls, state: nnx.State, kv_heads: int, mesh: Mesh, rules: Rules, slot_states=None,
            slot_state_axes=None) -> EngineShardings:
    """From a model's state (its parameters' `logical_axes` metadata) and the kv heads of its pools; for a hybrid,
    its state pools (arrays or shapes) and their logical axes (`HybridGPT.slot_state_axes`)."""
    rules = tuple((name, tuple(t) if isinstance(t, (list, tuple)) else t) for name, t in rules)
    leaves, treedef = jax.tree.flatten(param_shardings(state, mesh, rules))
    pool = NamedSharding(mesh, logical_to_spec(KV_POOL_AXES, rules, mesh, (kv_heads, 1, 1, 1)))
    states = None
    if slot_states is not None:
      states = jax.tree.map(lambda axes, a: NamedSharding(mesh, logical_to_spec(axes, rules, mesh, a.shape)),
                            slot_state_axes, slot_states, is_leaf=_is_axes)
    return cls(mesh, rules, treedef, tuple(leaves), pool, states)

  @property
  def params(self):
    return jax.tree.unflatten(self.params_treedef, self.params_leaves)

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def place_params(self, state: nnx.State) -> nnx.State:
    """`state` on the parameters' shardings (a no-op for parameters already there, e.g. loaded onto the mesh)."""
    return jax.tree.map(lambda v, s: v.replace(jax.device_put(v[...], s)), state, self.params,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))

  def axis_rules(self):
    """The context in which the model's `constrain` calls and per-shard attention see this mesh and rules."""
    return logical.axis_rules(self.mesh, self.rules)


def axis_rules(shardings: EngineShardings | None):
  """`shardings.axis_rules()`, or nothing to install on one device."""
  return contextlib.nullcontext() if shardings is None else shardings.axis_rules()
