"""GPT model presets as ConfigDicts: `gpt_tiny` (tests) up to `llama2_70b` (shapes of the public models)."""

import ml_collections

from lwjax.models.presets import PRESETS


def get(name: str, **overrides) -> ml_collections.ConfigDict:
  """The named preset as a ConfigDict (every GPTConfig field present, and `pretrained`: a checkpoint to start
  from instead, `lwjax.models.pretrained`), with `overrides` applied."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r} (valid: {', '.join(PRESETS)})")
  config = ml_collections.ConfigDict({**PRESETS[name].to_dict(), "pretrained": ""})
  config.update(overrides)
  return config
