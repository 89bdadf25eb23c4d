"""The Stable-Diffusion KL autoencoder (diffusers `AutoencoderKL`) in Flax NNX, NHWC.

GameNGen (arXiv 2408.14837, §3.2) runs its diffusion model on the latents of SD-v1.4's autoencoder (8x
down, 4 channels) and fine-tunes the decoder alone on game frames (§3.2.2). Encoder: conv_in, one level
of ResBlocks per `block_out_channels` entry with a stride-2 Downsample between levels, a mid block
(ResBlock-Attention-ResBlock), GroupNorm-SiLU-conv_out to mean and log-variance, and the 1x1 `quant_conv`.
The decoder mirrors it with `layers_per_block + 1` ResBlocks per level and nearest-neighbour Upsample.
Images are in [-1, 1]; the diffusion model sees latents times `scaling_factor` (SD: 0.18215).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lwjax import kernels
from lwjax.config import option, schema_of
from lwjax.models.diffusion_blocks import (
  ACT_BHWC,
  DTYPES,
  Conv,
  Downsample,
  GroupNorm,
  Numerics,
  ResBlock,
  SpatialSelfAttention,
  Upsample,
  positive_ints,
)
from lwjax.models.logical import constrain

NORM_EPS = 1e-6  # every GroupNorm of the SD VAE
LOGVAR_RANGE = (-30.0, 20.0)  # as diffusers' `DiagonalGaussianDistribution` clamps the log-variance


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
  """Shape and numerics of the autoencoder; the defaults are SD-v1.4's VAE (83,653,863 parameters)."""
  block_out_channels: tuple[int, ...] = option((128, 256, 512, 512), check=positive_ints,
                                                doc="width of each level")
  layers_per_block: int = option(2, min=1, doc="ResBlocks per encoder level (decoder: one more)")
  latent_channels: int = option(4, min=1)
  image_channels: int = option(3, min=1)
  norm_groups: int = option(32, min=1, doc="divides every block_out_channels entry")
  dropout: float = option(0.0, min=0.0, max=1.0)
  scaling_factor: float = option(0.18215, min=0.0)
  dtype: str = option("float32", choices=DTYPES)
  param_dtype: str = option("float32", choices=DTYPES)
  attention_impl: str = option("auto", choices=kernels.IMPLS)

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
    bad = [c for c in self.block_out_channels if c % self.norm_groups]
    if bad:
      raise ValueError(f"block_out_channels {bad} are not multiples of norm_groups ({self.norm_groups})")

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> AutoencoderConfig:
    return cls(**dict(d))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @property
  def numerics(self) -> Numerics:
    return Numerics(self.dtype, self.param_dtype, self.attention_impl)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)


CONFIG_SCHEMA = schema_of(AutoencoderConfig)


class MidBlock(nnx.Module):
  """diffusers `UNetMidBlock2D` without time embedding: ResBlock, spatial self-attention, ResBlock."""

  def __init__(self, channels: int, cfg: AutoencoderConfig, *, rngs: nnx.Rngs):
    res = functools.partial(ResBlock, channels, channels, cfg.numerics, groups=cfg.norm_groups, eps=NORM_EPS,
                            dropout=cfg.dropout, rngs=rngs)
    self.resnets = nnx.List([res(), res()])
    self.attentions = nnx.List([SpatialSelfAttention(channels, cfg.numerics, groups=cfg.norm_groups, eps=NORM_EPS,
                                                     rngs=rngs)])

  def __call__(self, x_bhwc):
    return self.resnets[1](self.attentions[0](self.resnets[0](x_bhwc)))


class Level(nnx.Module):
  """One resolution: `num_blocks` ResBlocks, then a Downsample (encoder) or Upsample (decoder) unless last."""

  def __init__(self, in_channels: int, out_channels: int, num_blocks: int, cfg: AutoencoderConfig, *,
               resample: str | None, rngs: nnx.Rngs):
    num = cfg.numerics
    self.resnets = nnx.List([
        ResBlock(in_channels if i == 0 else out_channels, out_channels, num, groups=cfg.norm_groups, eps=NORM_EPS,
                 dropout=cfg.dropout, rngs=rngs) for i in range(num_blocks)])
    self.downsample = (Downsample(out_channels, num, asymmetric_padding=True, rngs=rngs)
                       if resample == "down" else None)
    self.upsample = Upsample(out_channels, num, rngs=rngs) if resample == "up" else None

  def __call__(self, x_bhwc):
    for resnet in self.resnets:
      x_bhwc = resnet(x_bhwc)
    if self.downsample is not None:
      x_bhwc = self.downsample(x_bhwc)
    if self.upsample is not None:
      x_bhwc = self.upsample(x_bhwc)
    return x_bhwc


class Encoder(nnx.Module):
  """Image `[b, h, w, image_channels]` -> `[b, h/f, w/f, 2 * latent_channels]` (mean and log-variance)."""

  def __init__(self, cfg: AutoencoderConfig, *, rngs: nnx.Rngs):
    ch, num = cfg.block_out_channels, cfg.numerics
    self.conv_in = Conv(cfg.image_channels, ch[0], num, rngs=rngs)
    self.down_blocks = nnx.List([
        Level(ch[max(i - 1, 0)], c, cfg.layers_per_block, cfg, resample="down" if i < len(ch) - 1 else None,
              rngs=rngs) for i, c in enumerate(ch)])
    self.mid_block = MidBlock(ch[-1], cfg, rngs=rngs)
    self.conv_norm_out = GroupNorm(ch[-1], num, groups=cfg.norm_groups, eps=NORM_EPS, rngs=rngs)
    self.conv_out = Conv(ch[-1], 2 * cfg.latent_channels, num, rngs=rngs)

  def __call__(self, x_bhwc):
    h = constrain(self.conv_in(x_bhwc), ACT_BHWC)
    for level in self.down_blocks:
      h = level(h)
    h = self.mid_block(h)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class Decoder(nnx.Module):
  """Latent `[b, h, w, latent_channels]` -> image `[b, h * f, w * f, image_channels]`."""

  def __init__(self, cfg: AutoencoderConfig, *, rngs: nnx.Rngs):
    ch, num = cfg.block_out_channels[::-1], cfg.numerics
    self.conv_in = Conv(cfg.latent_channels, ch[0], num, rngs=rngs)
    self.mid_block = MidBlock(ch[0], cfg, rngs=rngs)
    self.up_blocks = nnx.List([
        Level(ch[max(i - 1, 0)], c, cfg.layers_per_block + 1, cfg, resample="up" if i < len(ch) - 1 else None,
              rngs=rngs) for i, c in enumerate(ch)])
    self.conv_norm_out = GroupNorm(ch[-1], num, groups=cfg.norm_groups, eps=NORM_EPS, rngs=rngs)
    self.conv_out = Conv(ch[-1], cfg.image_channels, num, rngs=rngs)

  def __call__(self, z_bhwc):
    h = self.mid_block(constrain(self.conv_in(z_bhwc), ACT_BHWC))
    for level in self.up_blocks:
      h = level(h)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class Autoencoder(nnx.Module):
  """The KL autoencoder: `encode` to a diagonal Gaussian over latents, `decode` back to pixels."""

  def __init__(self, cfg: AutoencoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    latent, num = cfg.latent_channels, cfg.numerics
    self.encoder = Encoder(cfg, rngs=rngs)
    self.quant_conv = Conv(2 * latent, 2 * latent, num, kernel_size=1, rngs=rngs)
    self.post_quant_conv = Conv(latent, latent, num, kernel_size=1, rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)

  def encode(self, x_bhwc):
    """Images in [-1, 1] `[b, h, w, image_channels]` -> (mean, logvar) `[b, h/8, w/8, latent]`, float32."""
    _, h, w, c = x_bhwc.shape
    f = self.cfg.downsample_factor
    if h % f or w % f or c != self.cfg.image_channels:
      raise ValueError(f"encode expects [b, h, w, {self.cfg.image_channels}] with h, w multiples of {f}; "
                       f"got {x_bhwc.shape}")
    moments = self.quant_conv(self.encoder(x_bhwc)).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  @staticmethod
  def sample_latent(mean, logvar, key):
    """A draw from N(mean, exp(logvar)) (the reparameterisation trick)."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)

  def decode(self, z_bhwc):
    """Latents `[b, h, w, latent]` (unscaled: divide diffusion latents by `scaling_factor`) -> images, float32."""
    if z_bhwc.shape[-1] != self.cfg.latent_channels:
      raise ValueError(f"decode expects {self.cfg.latent_channels} latent channels, got shape {z_bhwc.shape}")
    return self.decoder(self.post_quant_conv(z_bhwc)).astype(jnp.float32)

  def __call__(self, x_bhwc, key):
    """Reconstruction of a sampled latent: (recon, mean, logvar)."""
    mean, logvar = self.encode(x_bhwc)
    return self.decode(self.sample_latent(mean, logvar, key)), mean, logvar
