"""Multi-controller JAX start-up: `jax.distributed.initialize` when asked, never swallowing its error."""

from __future__ import annotations

import logging

import jax

from lwjax.config import Field

SCHEMA = {
    "initialize": Field(bool, doc="call jax.distributed.initialize() before using devices"),
    "coordinator_address": Field(str, doc="host:port of process 0; empty = auto-detect (TPU, SLURM, GKE)"),
    "num_processes": Field(int, min=-1, doc="-1 = auto-detect"),
    "process_id": Field(int, min=-1, doc="-1 = auto-detect"),
    "cpu_collectives": Field(str, choices=("gloo", "mpi", "none"),
                             doc="CPU cross-process collectives implementation"),
}


def initialize(cfg=None) -> None:
  """Joins the multi-process runtime described by `cfg` (a `distributed` config group; None: detect all).

  Errors propagate: a process that cannot reach the coordinator must fail loudly, not train alone.
  """
  if cfg is None:
    jax.distributed.initialize()
    return
  if cfg.cpu_collectives != "none":
    jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
  kwargs = {}
  if cfg.coordinator_address:
    kwargs["coordinator_address"] = cfg.coordinator_address
  if cfg.num_processes >= 0:
    kwargs["num_processes"] = cfg.num_processes
  if cfg.process_id >= 0:
    kwargs["process_id"] = cfg.process_id
  logging.info("jax.distributed.initialize(%s)", kwargs)
  jax.distributed.initialize(**kwargs)


def log_topology() -> None:
  """Logs this process's place in the run and the devices it sees."""
  logging.info("process %d of %d; %d local / %d global devices: %s", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               ", ".join(sorted({d.device_kind for d in jax.devices()})))
