"""Autoencoder presets as ConfigDicts: `ae_tiny` (CPU tests), `ae_small` (GPU minutes), `sd14` (SD-v1.4's VAE).

Every preset downsamples 8x (four levels) into 4 latent channels, as the SD VAE GameNGen uses (arXiv 2408.14837).
"""

import ml_collections

from lwjax.models.autoencoder import AutoencoderConfig

PRESETS = {
    "ae_tiny": AutoencoderConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_groups=8),  # 316,695
    "ae_small": AutoencoderConfig(block_out_channels=(32, 64, 128, 128), layers_per_block=2),  # 5,252,487
    "sd14": AutoencoderConfig(),  # 83,653,863, as diffusers' `AutoencoderKL` of CompVis/stable-diffusion-v1-4
}


def get(name: str, **overrides) -> ml_collections.ConfigDict:
  """The named preset as a ConfigDict (every AutoencoderConfig field present), with `overrides` applied."""
  if name not in PRESETS:
    raise ValueError(f"unknown autoencoder preset {name!r} (valid: {', '.join(PRESETS)})")
  config = ml_collections.ConfigDict(PRESETS[name].to_dict())
  config.update(overrides)
  return config
