"""Ahead-of-time compilation for TPU topologies on a machine without TPUs (libtpu from `jax[tpu]`).

`jax.jit(f).lower(...).compile()` against the devices of `tpu_devices("v5e:1x1")` builds the real TPU
program, Pallas (Mosaic) kernels included, and reports its memory use and XLA's cost estimate: how a CPU
host checks that a kernel lowers, or that a train step fits a pod slice, before any TPU is rented.
"""

from __future__ import annotations

import functools
import math
import os

import jax
from jax.experimental import topologies

from lwjax.config import ConfigError
from lwjax.launch import tpu_types

# Chip bounds of one host of a multi-host slice (every generation; see lwjax.launch.tpu_types).
_CHIPS_PER_HOST = (2, 2, 1)


def libtpu_available() -> tuple[bool, str]:
  """(True, "") when libtpu can be loaded, else (False, why): the reason AOT tests skip."""
  try:
    tpu_devices("v5e:1x1")
  except Exception as e:  # ImportError without libtpu, a runtime error for a broken install
    return False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
  return True, ""


@functools.cache
def tpu_devices(topology: str) -> tuple:
  """The devices of a TPU topology such as "v5e:1x1", "v5e:2x2" or "v5p:2x2x1", for lowering only."""
  generation, _, shape = topology.partition(":")
  dims = [int(d) for d in shape.split("x")]
  dims += [1] * (3 - len(dims))
  try:  # a single-host slice (v5e/v6e up to 2x4) is one host of all its chips; multi-host slices have 2x2x1
    single_host = tpu_types.parse(generation, shape).hosts == 1
  except ConfigError:
    single_host = math.prod(dims) <= 4
  per_host = dims if single_host else [min(d, h) for d, h in zip(dims, _CHIPS_PER_HOST, strict=True)]
  # Without these libtpu would query GCE metadata for the (absent) TPU VM.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  # Several processes (parallel test runs) may compile at once; libtpu's lock file would refuse them.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  desc = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                      chips_per_host_bounds=per_host, num_slices=1)
  return tuple(desc.devices)


def compile_for_tpu(fn, *abstract_args, topology: str = "v5e:1x1", **jit_kwargs):
  """Compiles `fn` for `topology` with replicated inputs; returns the `jax.stages.Compiled`."""
  devices = tpu_devices(topology)
  mesh = jax.sharding.Mesh(devices, ("x",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  jit_kwargs.setdefault("in_shardings", replicated)
  jit_kwargs.setdefault("out_shardings", replicated)
  return jax.jit(fn, **jit_kwargs).lower(*abstract_args).compile()
