"""Mesh from config and logical-axis resolution."""

import jax
import pytest
from jax.sharding import PartitionSpec

import configs.mesh
from lwjax.config import ConfigError
from lwjax.models.logical import logical_to_spec
from lwjax.training import mesh as mesh_lib
from lwjax.training.sharding import rules_from_config


def test_minus_one_fills_the_remaining_devices():
  assert mesh_lib.resolve_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": -1, "tensor": 1})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}


@pytest.mark.parametrize("shape,why", [
    ({"data": -1, "fsdp": -1, "tensor": 1}, "at most one axis may be -1"),
    ({"data": -1, "fsdp": 3, "tensor": 1}, "8 devices are not divisible by 3"),
    ({"data": 2, "fsdp": 2, "tensor": 1}, "product 4 != 8 devices"),
])
def test_impossible_shapes_name_mesh_shape(shape, why):
  with pytest.raises(ConfigError, match=f"^mesh.shape: {why}"):
    mesh_lib.resolve_shape(shape, 8)


def test_logical_axes_resolve_with_divisibility_and_reuse_rules():
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = rules_from_config(configs.mesh.get().rules)
  assert logical_to_spec(("batch", "length", "embed"), rules, mesh) == PartitionSpec(("data", "fsdp"), None, None)
  assert logical_to_spec(("embed", "mlp"), rules, mesh, (64, 128)) == PartitionSpec("fsdp", "tensor")
  # kv_heads of size 1 cannot be split over tensor=2: replicated rather than a compile error.
  assert (logical_to_spec(("embed", "kv_heads", "head_dim"), rules, mesh, (64, 1, 16))
          == PartitionSpec("fsdp", None, None))
  # A mesh axis is used once per array even if two logical names map to it.
  assert logical_to_spec(("heads", "mlp"), rules, mesh, (4, 4)) == PartitionSpec("tensor", None)
  # Axes of size 1 are dropped.
  flat = mesh_lib.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  assert logical_to_spec(("batch", "embed"), rules, flat) == PartitionSpec("data", None)


def test_mesh_uses_all_devices_in_order_when_given():
  devices = jax.devices()[:4]
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, devices)
  assert list(mesh.devices.flat) == devices
