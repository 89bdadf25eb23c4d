"""UNet presets as ConfigDicts: `unet_tiny` (CPU tests), `unet_cpu` (the `make demo` denoiser), `unet_cpu_wide`
(the cpu_long scale's), `unet_small` (GPU minutes), `sd14` (SD-v1.4 topology).

`sd14` is GameNGen's model (arXiv 2408.14837, §3.2): SD-v1.4's UNet with a 64-frame context (260 input
channels) and 64 action tokens. `num_actions` defaults to the 17 actions of `lwjax.projects.gamengen.env`.
"""

import ml_collections

from lwjax.models.unet_diffusion import UNetConfig

PRESETS = {
    "unet_tiny": UNetConfig(context_frames=4, block_out_channels=(16, 32), attention_levels=(True, False),
                            layers_per_block=1, num_heads=2, cross_attention_dim=32, norm_groups=8),  # 206,820
    "unet_cpu": UNetConfig(context_frames=4, block_out_channels=(32, 64), attention_levels=(True, False),
                           layers_per_block=1, num_heads=2, cross_attention_dim=32, norm_groups=8),  # 799,524
    "unet_cpu_wide": UNetConfig(context_frames=4, block_out_channels=(64, 128), attention_levels=(True, False),
                                layers_per_block=1, num_heads=2, cross_attention_dim=32, norm_groups=8),  # 3,144,612
    "unet_small": UNetConfig(context_frames=16, block_out_channels=(64, 128, 256, 256), num_heads=4,
                             cross_attention_dim=256),  # 35,014,596
    "sd14": UNetConfig(),  # 860,333,252: diffusers' 859,520,964 + wider conv_in + action/slot/bucket embeddings
}


def get(name: str, **overrides) -> ml_collections.ConfigDict:
  """The named preset as a ConfigDict (every UNetConfig field present), with `overrides` applied."""
  if name not in PRESETS:
    raise ValueError(f"unknown UNet preset {name!r} (valid: {', '.join(PRESETS)})")
  config = ml_collections.ConfigDict(PRESETS[name].to_dict())
  config.update(overrides)
  return config
