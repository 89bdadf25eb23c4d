"""Mesh presets with the default logical-axis rules (logical name -> mesh axes, `lwjax.training.mesh`)."""

import ml_collections

from lwjax.training.mesh import DEFAULT_RULES


def get(data: int = -1, fsdp: int = 1, tensor: int = 1, rules=DEFAULT_RULES) -> ml_collections.ConfigDict:
  """Mesh config: axis sizes (one may be -1 = fill with the remaining devices) and the rules (serving's:
  `lwjax.training.mesh.SERVING_RULES`)."""
  return ml_collections.ConfigDict({
      "shape": {"data": data, "fsdp": fsdp, "tensor": tensor},
      "rules": [[name, list(target) if isinstance(target, tuple) else target]
                for name, target in rules],
  })
