"""Cloud TPU slice types: what `--tpu v5p-32 [--topology 2x2x4]` means in chips, hosts, labels and memory.

One table for every launcher (XManager, GKE JobSet). Numbers are those of the Cloud TPU and GKE docs:
multi-host slices have 4 chips per host; v5e and v6e also come as single hosts of 1, 4 or 8 chips. Cloud
names count TensorCores for v4/v5p (2 per chip: v5p-32 = 16 chips) and chips for v5e/v6e (v5litepod-16 =
16 chips). 3D topologies (v4, v5p) are written A<=B<=C; beyond 4x4x4 each side is a multiple of 4.
"""

from __future__ import annotations

import dataclasses
import math
import re

from lwjax.config import ConfigError

_MULTI_HOST_CHIPS_PER_HOST = 4
_SMALL_3D = ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4")
_2D = ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16")


@dataclasses.dataclass(frozen=True)
class Generation:
  """One TPU generation: its names, the GKE node label and the largest single-host slice."""
  name: str  # as in AOT topology names ("v5p:2x2x4") and xm resource names ("tpu_v5p")
  cloud_prefix: str  # Cloud accelerator type prefix: v5litepod-16, v5p-32
  cores_per_chip: int  # TensorCores counted by the Cloud name
  gke_accelerator: str  # node label cloud.google.com/gke-tpu-accelerator
  hbm_gib: int  # HBM per chip
  dims: int  # 2 (v5e, v6e) or 3 (v4, v5p)
  max_single_host_chips: int

  def valid_topology(self, topology: str) -> bool:
    if self.dims == 2:
      return topology in _2D
    if topology in _SMALL_3D:
      return True
    sides = _sides(topology)
    return len(sides) == 3 and sides == sorted(sides) and all(s % 4 == 0 for s in sides)

  def default_topology(self, chips: int) -> str | None:
    """The most cubic valid topology of `chips` chips, or None when there is none."""
    if self.dims == 2:
      return next((t for t in _2D if math.prod(_sides(t)) == chips), None)
    candidates = [t for t in _SMALL_3D if math.prod(_sides(t)) == chips]
    for a in range(4, math.isqrt(chips) + 1, 4):
      for b in range(a, math.isqrt(chips // a) + 1, 4):
        c, rest = divmod(chips, a * b)
        if not rest and c % 4 == 0:
          candidates.append(f"{a}x{b}x{c}")
    return min(candidates, key=lambda t: max(_sides(t)), default=None)

  def examples(self) -> str:
    sizes = [math.prod(_sides(t)) for t in (_2D if self.dims == 2 else _SMALL_3D)][:5]
    return ", ".join(f"{self.cloud_prefix}-{c * self.cores_per_chip}" for c in sizes)


GENERATIONS = {
    "v4": Generation("v4", "v4", 2, "tpu-v4-podslice", 32, 3, 4),
    "v5e": Generation("v5e", "v5litepod", 1, "tpu-v5-lite-podslice", 16, 2, 8),
    "v5p": Generation("v5p", "v5p", 2, "tpu-v5p-slice", 95, 3, 4),
    "v6e": Generation("v6e", "v6e", 1, "tpu-v6e-slice", 32, 2, 8),
}
_ALIASES = {g.cloud_prefix: g for g in GENERATIONS.values()} | GENERATIONS


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  """One TPU slice: generation and topology, and what follows from them."""
  generation: Generation
  topology: str

  @property
  def chips(self) -> int:
    return math.prod(_sides(self.topology))

  @property
  def hosts(self) -> int:
    return 1 if self.chips <= self.generation.max_single_host_chips else self.chips // _MULTI_HOST_CHIPS_PER_HOST

  @property
  def chips_per_host(self) -> int:
    return self.chips // self.hosts

  @property
  def accelerator_type(self) -> str:
    """The Cloud TPU name, e.g. v5p-32 or v5litepod-16."""
    return f"{self.generation.cloud_prefix}-{self.chips * self.generation.cores_per_chip}"

  @property
  def xm_resource(self) -> str:
    """The XManager resource name: `xm.JobRequirements(**{slice.xm_resource: slice.topology})`."""
    return f"tpu_{self.generation.name}"

  def describe(self) -> str:
    g = self.generation
    return (f"{self.accelerator_type} ({g.name} {self.topology}): {self.chips} chips = {self.hosts} host(s) x "
            f"{self.chips_per_host} chips, {g.hbm_gib} GiB HBM per chip ({g.hbm_gib * self.chips} GiB in all)")


def parse(tpu: str, topology: str = "") -> TpuSlice:
  """`--tpu v5p-32` (Cloud name) or `--tpu v5p --topology 2x2x4` -> TpuSlice; ConfigError naming the flag."""
  prefix, dash, size = tpu.strip().rpartition("-")
  if not dash:
    prefix, size = size, ""
  generation = _ALIASES.get(prefix)
  if generation is None:
    raise ConfigError("--tpu", f"unknown TPU type {tpu!r}",
                      "a Cloud TPU name such as " + ", ".join(f"{g.cloud_prefix}-N" for g in GENERATIONS.values())
                      + ", e.g. v5p-32 or v5litepod-16")
  chips = None
  if size:
    cores = int(size) if size.isdigit() else 0
    if cores < 1 or cores % generation.cores_per_chip:
      raise ConfigError("--tpu", f"{tpu!r} is not a {generation.name} slice size", generation.examples())
    chips = cores // generation.cores_per_chip
  if topology:
    if not generation.valid_topology(topology):
      allowed = ", ".join(_2D if generation.dims == 2 else _SMALL_3D + ("AxBxC, sides multiples of 4",))
      raise ConfigError("--topology", f"{topology!r} is not a {generation.name} topology", allowed)
    if chips is not None and math.prod(_sides(topology)) != chips:
      raise ConfigError("--topology", f"{topology} has {math.prod(_sides(topology))} chips but --tpu {tpu} has "
                        f"{chips}", f"a {chips}-chip topology, or drop --topology")
    return TpuSlice(generation, topology)
  if chips is None:
    raise ConfigError("--tpu", f"{tpu!r} names no slice size", f"{generation.examples()}, or add --topology")
  default = generation.default_topology(chips)
  if default is None:
    raise ConfigError("--tpu", f"{tpu!r} has no standard {generation.name} topology",
                      f"{generation.examples()}, or add --topology")
  return TpuSlice(generation, default)


def _sides(topology: str) -> list[int]:
  return [int(s) for s in topology.split("x")] if re.fullmatch(r"\d+(x\d+)+", topology) else [0]
