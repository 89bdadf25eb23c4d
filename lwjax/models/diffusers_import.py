"""diffusers checkpoints of SD-v1.4's VAE and UNet to and from lwjax models.

GameNGen (arXiv 2408.14837, §3.2) starts from pretrained Stable Diffusion v1.4. A diffusers model directory
holds `config.json` and `diffusion_pytorch_model.safetensors` (`AutoencoderKL`: keys such as
`encoder.down_blocks.0.resnets.0.conv1.weight`; `UNet2DConditionModel`: keys such as
`down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight`). Torch convs are OIHW (here HWIO),
torch linears `[out, in]` (here `[in, out]`); a 1x1 conv and a linear load into each other (SD-2's
`use_linear_projection`, old VAEs' conv attention). The VAE attention also loads under its legacy names
(`query`/`key`/`value`/`proj_attn`).

Importing SD's 4-channel UNet into a GameNGen UNet copies `conv_in` into the first (noisy-latent) input
channels and zero-initialises the context channels, and zero-initialises the noise-bucket embedding
(diffusers' `class_embedding`), so the imported model starts as SD on the noisy latent; the action and
slot embeddings (not diffusers tensors) start fresh; the text cross-attention K/V weights are kept and
read the action tokens, which have the same `cross_attention_dim`. The exporters write the same layout,
with the action embeddings under `action_embedding.weight` and `action_position_embedding.weight`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from lwjax.models.autoencoder import Autoencoder, AutoencoderConfig
from lwjax.models.unet_diffusion import UNet, UNetConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
# Dotted model path -> diffusers name, where they differ.
_RENAMES = (
    (r"\.downsample\.", ".downsamplers.0."), (r"\.upsample\.", ".upsamplers.0."), (r"\.to_out\.", ".to_out.0."),
    (r"\.transformer_block\.", ".transformer_blocks.0."), (r"\.ff\.proj\.", ".ff.net.0.proj."),
    (r"\.ff\.out\.", ".ff.net.2."), (r"^noise_bucket_embedding\.", "class_embedding."),
)
_LEAVES = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
_LEGACY = ((r"\.query\.", ".to_q."), (r"\.key\.", ".to_k."), (r"\.value\.", ".to_v."), (r"\.proj_attn\.", ".to_out.0."))
# UNet tensors a plain SD checkpoint lacks, and how they start: fresh from the model's init, or zero.
_UNET_EXTRAS = {"action_embedding.weight": "init", "action_position_embedding.weight": "init",
                "class_embedding.weight": "zeros"}
# UNet2DConditionModel defaults of the options that must match the UNetConfig.
_UNET_DEFAULTS = {
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 1280,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "norm_num_groups": 32, "norm_eps": 1e-5,
    "flip_sin_to_cos": True, "freq_shift": 0, "out_channels": 4,
}
# UNet2DConditionModel options that change the topology: only SD-v1's values are supported.
_UNET_FIXED = {
    "act_fn": "silu", "center_input_sample": False, "class_embed_type": None, "addition_embed_type": None,
    "time_embedding_type": "positional", "resnet_time_scale_shift": "default", "downsample_padding": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "mid_block_scale_factor": 1, "only_cross_attention": False,
    "dual_cross_attention": False, "transformer_layers_per_block": 1, "encoder_hid_dim": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "time_cond_proj_dim": None, "timestep_post_act": None,
    "time_embedding_dim": None, "class_embeddings_concat": False, "attention_type": "default",
}


def diffusers_key(path: tuple) -> str:
  """The diffusers name of the parameter at `path` in `nnx.state(model)`."""
  dotted = ".".join(map(str, path[:-1])) + "."
  for pattern, name in _RENAMES:
    dotted = re.sub(pattern, name, dotted)
  return dotted + _LEAVES[path[-1]]


def _canonical(key: str) -> str:
  for pattern, name in _LEGACY:
    key = re.sub(pattern, name, key)
  return key


def _from_torch(x: np.ndarray, leaf: str, shape: tuple) -> np.ndarray:
  if leaf != "kernel":
    return x
  if len(shape) == 4:  # conv: OIHW (or a linear's [out, in] for a 1x1 conv) -> HWIO
    return (x[:, :, None, None] if x.ndim == 2 else x).transpose(2, 3, 1, 0)
  return (x[:, :, 0, 0] if x.ndim == 4 else x).T


def _to_torch(x: np.ndarray, leaf: str) -> np.ndarray:
  if leaf != "kernel":
    return np.ascontiguousarray(x)
  return np.ascontiguousarray(x.transpose(3, 2, 0, 1) if x.ndim == 4 else x.T)


def _read_config(path: str, class_name: str) -> dict[str, Any]:
  with open(os.path.join(path, CONFIG_FILE)) as fh:
    config = json.load(fh)
  if config.get("_class_name", class_name) != class_name:
    raise ValueError(f"{path}/{CONFIG_FILE}: _class_name {config['_class_name']!r}, expected {class_name!r}")
  return config


def _scalar(value, key: str):
  """A per-block option given as one value (or a list of equal ones)."""
  if isinstance(value, list):
    if len(set(map(str, value))) != 1:
      raise ValueError(f"{CONFIG_FILE}: {key}={value!r}: different values per block are not supported")
    value = value[0]
  return value


def autoencoder_config_from_diffusers(config: dict[str, Any], **overrides) -> AutoencoderConfig:
  """An `AutoencoderConfig` from an `AutoencoderKL` config dict; `overrides` replace fields afterwards."""
  down, up = config.get("down_block_types", ["DownEncoderBlock2D"]), config.get("up_block_types", ["UpDecoderBlock2D"])
  checks = {"act_fn": (config.get("act_fn", "silu"), "silu"),
            "down_block_types": (set(down), {"DownEncoderBlock2D"}), "up_block_types": (set(up), {"UpDecoderBlock2D"}),
            "out_channels": (config.get("out_channels", 3), config.get("in_channels", 3)),
            "use_quant_conv": (config.get("use_quant_conv", True), True),
            "use_post_quant_conv": (config.get("use_post_quant_conv", True), True),
            "mid_block_add_attention": (config.get("mid_block_add_attention", True), True)}
  for key, (value, supported) in checks.items():
    if value != supported:
      raise ValueError(f"{CONFIG_FILE}: {key}={config.get(key)!r} is not supported (supported: {supported!r})")
  fields = dict(block_out_channels=tuple(config.get("block_out_channels", (64,))),
                layers_per_block=config.get("layers_per_block", 1), latent_channels=config.get("latent_channels", 4),
                image_channels=config.get("in_channels", 3), norm_groups=config.get("norm_num_groups", 32),
                scaling_factor=float(config.get("scaling_factor", 0.18215)))
  if len(down) != len(fields["block_out_channels"]) or len(up) != len(down):
    raise ValueError(f"{CONFIG_FILE}: need one down and one up block type per block_out_channels entry")
  fields.update(overrides)
  return AutoencoderConfig(**fields)


def autoencoder_config_to_diffusers(cfg: AutoencoderConfig) -> dict[str, Any]:
  levels = len(cfg.block_out_channels)
  return {"_class_name": "AutoencoderKL", "act_fn": "silu", "in_channels": cfg.image_channels,
          "out_channels": cfg.image_channels, "latent_channels": cfg.latent_channels,
          "block_out_channels": list(cfg.block_out_channels), "layers_per_block": cfg.layers_per_block,
          "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
          "norm_num_groups": cfg.norm_groups, "scaling_factor": cfg.scaling_factor}


def unet_config_to_diffusers(cfg: UNetConfig) -> dict[str, Any]:
  """The `UNet2DConditionModel` config of `cfg`'s topology; the action/context sizes go under "lwjax"."""
  down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels]
  up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in cfg.attention_levels[::-1]]
  return {"_class_name": "UNet2DConditionModel", "in_channels": cfg.in_channels, "out_channels": cfg.latent_channels,
          "block_out_channels": list(cfg.block_out_channels), "layers_per_block": cfg.layers_per_block,
          "down_block_types": down, "up_block_types": up, "attention_head_dim": cfg.num_heads,
          "cross_attention_dim": cfg.cross_attention_dim, "norm_num_groups": cfg.norm_groups,
          "norm_eps": cfg.norm_eps, "flip_sin_to_cos": cfg.flip_sin_to_cos, "freq_shift": cfg.freq_shift,
          "num_class_embeds": cfg.num_noise_buckets, **_UNET_FIXED,
          "lwjax": {"context_frames": cfg.context_frames, "num_actions": cfg.num_actions}}


def _check_unet_config(config: dict[str, Any], cfg: UNetConfig) -> None:
  """Raises ValueError naming the first `config.json` entry `cfg`'s UNet cannot load."""
  for key, supported in _UNET_FIXED.items():
    if key in config and _scalar(config[key], key) != supported:
      raise ValueError(f"{CONFIG_FILE}: {key}={config[key]!r} is not supported (supported: {supported!r})")
  ours = unet_config_to_diffusers(cfg)
  # diffusers' `num_attention_heads` defaults to `attention_head_dim`, which SD-v1 uses as the head count.
  heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
  found = {key: config.get(key, default) for key, default in _UNET_DEFAULTS.items()}
  found.update(attention_head_dim=heads)
  for key, value in found.items():
    if key in ("layers_per_block", "attention_head_dim", "cross_attention_dim"):
      value = _scalar(value, key)
    if value != ours[key]:
      raise ValueError(f"{CONFIG_FILE}: {key}={value!r} does not match the UNetConfig ({ours[key]!r})")
  if config.get("in_channels", 4) not in (cfg.latent_channels, cfg.in_channels):
    raise ValueError(f"{CONFIG_FILE}: in_channels={config.get('in_channels', 4)!r}, expected {cfg.latent_channels} "
                     f"(an SD UNet) or {cfg.in_channels} (latent_channels * (context_frames + 1))")
  if config.get("num_class_embeds") not in (None, cfg.num_noise_buckets):
    raise ValueError(f"{CONFIG_FILE}: num_class_embeds={config['num_class_embeds']!r}, expected "
                     f"{cfg.num_noise_buckets} (num_noise_buckets) or none")


def _load(path: str, model_fn: Callable[[], nnx.Module], extras: dict[str, str], widen_conv_in: bool = False):
  """Builds `model_fn()` with its parameters read from `path`'s safetensors.

  `extras`: keys the checkpoint may lack, filled with "zeros" or the model's "init" values. With
  `widen_conv_in`, a `conv_in.weight` with fewer input channels fills the first ones, the rest zero.
  """
  graphdef, params, rest = nnx.split(nnx.eval_shape(model_fn), nnx.Param, ...)
  layout = {diffusers_key(p): (p, v) for p, v in nnx.to_flat_state(params)}
  with safe_open(os.path.join(path, WEIGHTS_FILE), framework="np") as f:
    names = {_canonical(k): k for k in f.keys()}  # noqa: SIM118  safe_open is not iterable
    missing = sorted(set(layout) - set(names) - set(extras))
    if missing:
      raise ValueError(f"{path}: checkpoint is missing {len(missing)} tensor(s), e.g. {missing[:5]}")
    unexpected = sorted(set(names) - set(layout))
    if unexpected:
      raise ValueError(f"{path}: checkpoint has {len(unexpected)} unexpected tensor(s), e.g. {unexpected[:5]}")
    fresh = [p for key, (p, _) in layout.items() if key not in names and extras[key] == "init"]

    def init():  # only these values are computed: XLA drops the other parameters' initialisers
      _, new_params, new_rest = nnx.split(model_fn(), nnx.Param, ...)
      flat = dict(nnx.to_flat_state(new_params))
      return [flat[p].get_value() for p in fresh], new_rest
    fresh_values = {}
    if fresh or jax.tree.leaves(rest):  # RNG state (dropout) too
      values, rest = jax.jit(init)()
      fresh_values = dict(zip(fresh, values, strict=False))
    for key, (p, variable) in layout.items():
      if key not in names:
        variable.set_value(fresh_values[p] if p in fresh_values else jnp.zeros(variable.shape, variable.dtype))
        continue
      x = _from_torch(f.get_tensor(names[key]), p[-1], variable.shape)
      if widen_conv_in and key == "conv_in.weight" and x.shape[2] < variable.shape[2]:
        x = np.pad(x, ((0, 0), (0, 0), (0, variable.shape[2] - x.shape[2]), (0, 0)))
      if x.shape != variable.shape:
        raise ValueError(f"{path}: {names[key]} has shape {x.shape} after conversion, the model needs "
                         f"{variable.shape}")
      variable.set_value(jnp.asarray(x.astype(variable.dtype)))
  return nnx.merge(graphdef, params, rest)


def _save(model: nnx.Module, path: str, config: dict[str, Any]) -> None:
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, CONFIG_FILE), "w") as fh:
    json.dump(config, fh, indent=2)
  tensors = {diffusers_key(p): _to_torch(np.asarray(jax.device_get(v.get_value())), p[-1])
             for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})


def load_autoencoder(path: str | os.PathLike, cfg: AutoencoderConfig | None = None) -> Autoencoder:
  """Reads an `AutoencoderKL` directory; `cfg` (default: from its config.json) must have its shapes."""
  path = os.fspath(path)
  config = _read_config(path, "AutoencoderKL")
  cfg = cfg or autoencoder_config_from_diffusers(config)
  _check_autoencoder_config(path, config, cfg)
  return _load(path, lambda: Autoencoder(cfg, rngs=nnx.Rngs(0)), extras={})


def check_unet_dir(path: str | os.PathLike, cfg: UNetConfig, *, key: str = "path") -> None:
  """Raises `ConfigError(key, ...)` unless `path` holds a UNet2DConditionModel directory `cfg` can load
  (reads config.json only)."""
  _check_dir(path, key, "UNet2DConditionModel", lambda config: _check_unet_config(config, cfg))


def check_autoencoder_dir(path: str | os.PathLike, cfg: AutoencoderConfig, *, key: str = "path") -> None:
  """Raises `ConfigError(key, ...)` unless `path` holds an AutoencoderKL directory of `cfg`'s shapes."""
  _check_dir(path, key, "AutoencoderKL", lambda config: _check_autoencoder_config(path, config, cfg))


def _check_dir(path, key: str, class_name: str, check: Callable[[dict[str, Any]], None]) -> None:
  from lwjax.config import ConfigError
  path = os.fspath(path)
  valid = f"a diffusers {class_name} directory ({CONFIG_FILE} and {WEIGHTS_FILE})"
  for name in (CONFIG_FILE, WEIGHTS_FILE):
    if not os.path.isfile(os.path.join(path, name)):
      raise ConfigError(key, f"{path!r} has no {name}", valid)
  try:
    check(_read_config(path, class_name))
  except ValueError as e:
    raise ConfigError(key, str(e), valid + " matching the model config") from None


def _check_autoencoder_config(path: str, config: dict[str, Any], cfg: AutoencoderConfig) -> None:
  found = autoencoder_config_from_diffusers(config)
  for key in ("block_out_channels", "layers_per_block", "latent_channels", "image_channels", "norm_groups"):
    if getattr(cfg, key) != getattr(found, key):
      raise ValueError(f"{path}/{CONFIG_FILE}: {key}={getattr(found, key)!r}, the AutoencoderConfig has "
                       f"{getattr(cfg, key)!r}")


def load_unet(path: str | os.PathLike, cfg: UNetConfig, *, seed: int = 0) -> UNet:
  """Reads a `UNet2DConditionModel` directory (SD-v1.4's, or one `save_unet` wrote) into a `UNet(cfg)`.

  Tensors the checkpoint lacks start as the module docstring says; `seed` draws the fresh ones.
  """
  path = os.fspath(path)
  _check_unet_config(_read_config(path, "UNet2DConditionModel"), cfg)
  return _load(path, lambda: UNet(cfg, rngs=nnx.Rngs(seed)), extras=_UNET_EXTRAS, widen_conv_in=True)


def save_autoencoder(model: Autoencoder, path: str | os.PathLike) -> None:
  """Writes `model` as an `AutoencoderKL` directory (tensors in `param_dtype`)."""
  _save(model, os.fspath(path), autoencoder_config_to_diffusers(model.cfg))


def save_unet(model: UNet, path: str | os.PathLike) -> None:
  """Writes `model` as a `UNet2DConditionModel` directory plus the action tensors (in `param_dtype`)."""
  _save(model, os.fspath(path), unet_config_to_diffusers(model.cfg))
