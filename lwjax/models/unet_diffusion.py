"""GameNGen's denoiser: the Stable-Diffusion-v1.4 UNet conditioned on past frames and actions, in Flax NNX.

GameNGen (arXiv 2408.14837, §3.2) keeps SD-v1.4's UNet topology and replaces the text conditioning:
- the past `context_frames` latents are concatenated to the noisy latent on channels (`conv_in` takes
  `latent_channels * (context_frames + 1)` channels, the noisy latent first);
- each past action is a learned embedding token; the cross-attention layers attend to this sequence
  (plus a learned embedding per context slot) where SD attended to the CLIP text tokens;
- the noise-augmentation level of the context (§3.2.1), discretised into `num_noise_buckets`, has a
  learned embedding added to the timestep embedding (diffusers' `class_embedding`).
Levels: ResBlocks (+ SpatialTransformers where `attention_levels` says) with a Downsample between levels,
a mid block (ResBlock-SpatialTransformer-ResBlock), the mirrored up path over the skip connections
(`layers_per_block + 1` ResBlocks per level), GroupNorm-SiLU-conv_out. NHWC throughout.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lwjax import kernels
from lwjax.config import option, schema_of
from lwjax.models.diffusion_blocks import (
  ACT_BHWC,
  ACT_BLD,
  DTYPES,
  Conv,
  Downsample,
  GroupNorm,
  Linear,
  Numerics,
  ResBlock,
  SpatialTransformer,
  Upsample,
  positive_ints,
)
from lwjax.models.logical import constrain


def _bools(value) -> str | None:
  return None if value and all(isinstance(v, bool) for v in value) else "must be a non-empty sequence of bools"


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Shape and numerics of the UNet; the defaults are SD-v1.4's UNet with GameNGen's 64-frame context."""
  latent_channels: int = option(4, min=1)
  context_frames: int = option(64, min=1, doc="past frames (and actions) conditioned on")
  num_actions: int = option(17, min=1)
  num_noise_buckets: int = option(10, min=1, doc="noise-augmentation levels (§3.2.1)")
  block_out_channels: tuple[int, ...] = option((320, 640, 1280, 1280), check=positive_ints,
                                                doc="width of each level")
  attention_levels: tuple[bool, ...] = option((True, True, True, False), check=_bools,
                                              doc="cross-attention at each level")
  layers_per_block: int = option(2, min=1)
  num_heads: int = option(8, min=1, doc="divides every block_out_channels entry")
  cross_attention_dim: int = option(768, min=1, doc="width of the action tokens")
  norm_groups: int = option(32, min=1, doc="divides every block_out_channels entry")
  norm_eps: float = option(1e-5, min=0.0)
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  dropout: float = option(0.0, min=0.0, max=1.0)
  dtype: str = option("float32", choices=DTYPES)
  param_dtype: str = option("float32", choices=DTYPES)
  attention_impl: str = option("auto", choices=kernels.IMPLS)

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
    object.__setattr__(self, "attention_levels", tuple(self.attention_levels))
    if len(self.attention_levels) != len(self.block_out_channels):
      raise ValueError(f"attention_levels {self.attention_levels} needs one entry per block_out_channels "
                       f"{self.block_out_channels}")
    bad = [c for c in self.block_out_channels if c % self.norm_groups or c % self.num_heads]
    if bad:
      raise ValueError(f"block_out_channels {bad} are not multiples of norm_groups ({self.norm_groups}) and "
                       f"num_heads ({self.num_heads})")
    if self.block_out_channels[0] % 2:
      raise ValueError(f"block_out_channels[0] ({self.block_out_channels[0]}) must be even (sinusoidal embedding)")

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> UNetConfig:
    return cls(**dict(d))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @property
  def numerics(self) -> Numerics:
    return Numerics(self.dtype, self.param_dtype, self.attention_impl)

  @property
  def in_channels(self) -> int:
    return self.latent_channels * (self.context_frames + 1)

  @property
  def time_embed_dim(self) -> int:
    return 4 * self.block_out_channels[0]

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)


CONFIG_SCHEMA = schema_of(UNetConfig)


def timestep_embedding(t_b, dim: int, *, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0):
  """diffusers' `get_timestep_embedding`: timesteps [b] -> float32 sinusoidal features [b, dim] (dim even)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
  angles = jnp.asarray(t_b, jnp.float32)[:, None] * freqs[None, :]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  return jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


class TimestepMLP(nnx.Module):
  """diffusers `TimestepEmbedding`: linear-SiLU-linear from the sinusoidal features to `time_embed_dim`."""

  def __init__(self, in_dim: int, out_dim: int, num: Numerics, *, rngs: nnx.Rngs):
    self.linear_1 = Linear(in_dim, out_dim, ("embed", "mlp"), num, rngs=rngs)
    self.linear_2 = Linear(out_dim, out_dim, ("mlp", "embed"), num, rngs=rngs)

  def __call__(self, x_bd):
    return self.linear_2(jax.nn.silu(self.linear_1(x_bd)))


class Level(nnx.Module):
  """One resolution: ResBlocks, each followed by a SpatialTransformer on attention levels, and a resample.

  On the up path every ResBlock first concatenates the matching skip activation on channels.
  """

  def __init__(self, in_channels: list[int], out_channels: int, cfg: UNetConfig, *, attention: bool,
               resample: str | None, rngs: nnx.Rngs):
    num = cfg.numerics
    self.resnets = nnx.List([
        ResBlock(c, out_channels, num, groups=cfg.norm_groups, eps=cfg.norm_eps, temb_dim=cfg.time_embed_dim,
                 dropout=cfg.dropout, rngs=rngs) for c in in_channels])
    self.attentions = nnx.List([
        SpatialTransformer(out_channels, num, heads=cfg.num_heads, context_dim=cfg.cross_attention_dim,
                           groups=cfg.norm_groups, rngs=rngs) for _ in in_channels]) if attention else None
    self.downsample = Downsample(out_channels, num, rngs=rngs) if resample == "down" else None
    self.upsample = Upsample(out_channels, num, rngs=rngs) if resample == "up" else None

  def __call__(self, h, temb, context, skips: list | None = None):
    """Returns the output and, on the down path (`skips` None), the activations the up path consumes; the up
    path pops its skip activations off the end of `skips`."""
    outputs = []
    for i, resnet in enumerate(self.resnets):
      if skips is not None:
        h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = resnet(h, temb)
      if self.attentions is not None:
        h = self.attentions[i](h, context)
      outputs.append(h)
    if self.downsample is not None:
      h = self.downsample(h)
      outputs.append(h)
    if self.upsample is not None:
      h = self.upsample(h)
    return h, outputs


class MidBlock(nnx.Module):
  """diffusers `UNetMidBlock2DCrossAttn`: ResBlock, SpatialTransformer, ResBlock."""

  def __init__(self, channels: int, cfg: UNetConfig, *, rngs: nnx.Rngs):
    res = functools.partial(ResBlock, channels, channels, cfg.numerics, groups=cfg.norm_groups, eps=cfg.norm_eps,
                            temb_dim=cfg.time_embed_dim, dropout=cfg.dropout, rngs=rngs)
    self.resnets = nnx.List([res(), res()])
    self.attentions = nnx.List([SpatialTransformer(channels, cfg.numerics, heads=cfg.num_heads,
                                                   context_dim=cfg.cross_attention_dim, groups=cfg.norm_groups,
                                                   rngs=rngs)])

  def __call__(self, h, temb, context):
    return self.resnets[1](self.attentions[0](self.resnets[0](h, temb), context), temb)


class UNet(nnx.Module):
  """The denoiser: `__call__(x, timesteps, noise_buckets, actions) -> [b, h, w, latent_channels]`."""

  def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    num, ch, n = cfg.numerics, cfg.block_out_channels, cfg.layers_per_block
    embed = functools.partial(nnx.Embed, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype),
                              rngs=rngs)
    self.conv_in = Conv(cfg.in_channels, ch[0], num, rngs=rngs)
    self.time_embedding = TimestepMLP(ch[0], cfg.time_embed_dim, num, rngs=rngs)
    self.noise_bucket_embedding = embed(cfg.num_noise_buckets, cfg.time_embed_dim,
                                        embedding_metadata={"logical_axes": ("vocab", "embed")})
    # Action tokens stand in for SD's CLIP text tokens, which have unit-scale entries.
    self.action_embedding = embed(cfg.num_actions, cfg.cross_attention_dim,
                                  embedding_init=nnx.initializers.normal(1.0),
                                  embedding_metadata={"logical_axes": ("vocab", "embed")})
    self.action_position_embedding = embed(cfg.context_frames, cfg.cross_attention_dim,
                                           embedding_init=nnx.initializers.normal(0.02),
                                           embedding_metadata={"logical_axes": ("length", "embed")})
    last = len(ch) - 1
    self.down_blocks = nnx.List([
        Level([ch[max(i - 1, 0)]] + [c] * (n - 1), c, cfg, attention=cfg.attention_levels[i],
              resample="down" if i < last else None, rngs=rngs) for i, c in enumerate(ch)])
    self.mid_block = MidBlock(ch[-1], cfg, rngs=rngs)
    # Up level i takes the previous level's output, then concatenates the down path's activations in
    # reverse: its own level's, and finally the one entering that level (the level below's width).
    rev, rev_attn = ch[::-1], cfg.attention_levels[::-1]
    self.up_blocks = nnx.List([
        Level([(rev[max(i - 1, 0)] if j == 0 else c) + (rev[min(i + 1, last)] if j == n else c) for j in range(n + 1)],
              c, cfg, attention=rev_attn[i], resample="up" if i < last else None, rngs=rngs)
        for i, c in enumerate(rev)])
    self.conv_norm_out = GroupNorm(ch[0], num, groups=cfg.norm_groups, eps=cfg.norm_eps, rngs=rngs)
    self.conv_out = Conv(ch[0], cfg.latent_channels, num, rngs=rngs)

  def action_tokens(self, actions_bn):
    """Action ids [b, context_frames] -> cross-attention tokens [b, context_frames, cross_attention_dim]."""
    positions = self.action_position_embedding(jnp.arange(actions_bn.shape[1]))
    return constrain(self.action_embedding(actions_bn) + positions[None], ACT_BLD)

  def time_conditioning(self, timesteps_b, noise_bucket_b):
    """The embedding every ResBlock receives: timestep MLP output plus the noise-bucket embedding."""
    cfg = self.cfg
    feats = timestep_embedding(timesteps_b, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                               freq_shift=cfg.freq_shift)
    return self.time_embedding(feats) + self.noise_bucket_embedding(noise_bucket_b)

  def __call__(self, x_bhwc, timesteps_b, noise_bucket_b, actions_bn):
    """Predicts for `x` = [noisy latent, context latents...] concatenated on channels `[b, h, w, in_channels]`.

    timesteps_b: diffusion steps (int or float) [b]; noise_bucket_b: ints in [0, num_noise_buckets) [b];
    actions_bn: action ids [b, context_frames]. Returns `[b, h, w, latent_channels]` in float32.
    """
    cfg = self.cfg
    b, h, w, c = x_bhwc.shape
    f = cfg.downsample_factor
    if c != cfg.in_channels or h % f or w % f:
      raise ValueError(f"UNet expects [b, h, w, {cfg.in_channels}] with h, w multiples of {f}; got {x_bhwc.shape}")
    if actions_bn.shape != (b, cfg.context_frames):
      raise ValueError(f"actions must be [{b}, {cfg.context_frames}] ids, got shape {actions_bn.shape}")
    temb = self.time_conditioning(timesteps_b, noise_bucket_b)
    context = self.action_tokens(actions_bn)
    h = constrain(self.conv_in(x_bhwc), ACT_BHWC)
    skips = [h]
    for level in self.down_blocks:
      h, outputs = level(h, temb, context)
      skips.extend(outputs)
    h = self.mid_block(h, temb, context)
    for level in self.up_blocks:
      h, _ = level(h, temb, context, skips)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(h))).astype(jnp.float32)
