"""Mesh presets and the default logical-axis rules (logical name -> mesh axes)."""

import ml_collections

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
)


def get(data: int = -1, fsdp: int = 1, tensor: int = 1) -> ml_collections.ConfigDict:
  """Mesh config: axis sizes (one may be -1 = fill with the remaining devices) and the rules."""
  return ml_collections.ConfigDict({
      "shape": {"data": data, "fsdp": fsdp, "tensor": tensor},
      "rules": [[name, list(target) if isinstance(target, tuple) else target]
                for name, target in DEFAULT_RULES],
  })
