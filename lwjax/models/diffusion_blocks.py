"""Stable-Diffusion building blocks in Flax NNX, NHWC: GroupNorm, ResBlock, Down/Upsample and attention.

GameNGen (arXiv 2408.14837, §3.2) keeps SD-v1.4's UNet and its KL autoencoder; both are built from these
blocks (`lwjax.models.unet_diffusion`, `lwjax.models.autoencoder`). Attribute names follow diffusers
(`norm1`, `conv1`, `time_emb_proj`, `to_q`, `proj_in`, ...) so that `lwjax.models.diffusers_import` maps
checkpoint keys by path. Every parameter carries `logical_axes`; activations are constrained by logical
names at block boundaries; attention goes through `lwjax.kernels.attention`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from lwjax import kernels
from lwjax.models import logical
from lwjax.models.logical import constrain

DTYPES = ("float32", "bfloat16", "float16")
CONV_AXES = ("conv_h", "conv_w", "conv_in", "conv_out")
ACT_BHWC = ("batch", None, None, "embed")
ACT_BLD = ("batch", "length", "embed")


def positive_ints(value) -> str | None:
  """A `lwjax.config.Field` check: why `value` is not a non-empty sequence of positive ints, or None."""
  if value and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
    return None
  return "must be a non-empty sequence of positive ints"


@dataclasses.dataclass(frozen=True)
class Numerics:
  """Compute dtype, stored parameter dtype and attention kernel, shared by every block of a model."""
  dtype: str = "float32"
  param_dtype: str = "float32"
  attention_impl: str = "auto"


def param(rngs: nnx.Rngs, shape, axes, dtype, *, init: str = "normal", fan_in: int = 1) -> nnx.Param:
  """A parameter with `logical_axes`: truncated normal of std `fan_in ** -0.5`, or ones, or zeros."""
  if init == "ones":
    value = jnp.ones(shape, dtype)
  elif init == "zeros":
    value = jnp.zeros(shape, dtype)
  else:
    value = _truncated_normal(rngs.params(), fan_in ** -0.5, tuple(shape), dtype)
  return nnx.Param(value, logical_axes=tuple(axes))


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _truncated_normal(key, std, shape, dtype):
  # One compiled function per shape: built eagerly, a model compiles each shape's initialiser once.
  return (std * jax.random.truncated_normal(key, -2.0, 2.0, shape)).astype(dtype)


class Conv(nnx.Module):
  """2-D convolution with bias; kernel `[kh, kw, in, out]` (HWIO), `padding` a (low, high) pair per dim."""

  def __init__(self, in_channels: int, out_channels: int, num: Numerics, *, kernel_size: int = 3, stride: int = 1,
               padding: tuple[tuple[int, int], tuple[int, int]] | None = None, rngs: nnx.Rngs):
    self.dtype, self.stride = num.dtype, stride
    self.padding = padding or ((kernel_size // 2, kernel_size // 2),) * 2
    shape = (kernel_size, kernel_size, in_channels, out_channels)
    self.kernel = param(rngs, shape, CONV_AXES, num.param_dtype, fan_in=kernel_size * kernel_size * in_channels)
    self.bias = param(rngs, (out_channels,), ("conv_out",), num.param_dtype, init="zeros")

  def __call__(self, x_bhwc):
    y = jax.lax.conv_general_dilated(x_bhwc.astype(self.dtype), self.kernel[...].astype(self.dtype),
                                     (self.stride, self.stride), self.padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + self.bias[...].astype(self.dtype)


class Linear(nnx.Module):
  """Dense layer `[..., in] -> [..., out]`, kernel `[in, out]` with logical `axes`, optional bias."""

  def __init__(self, in_dim: int, out_dim: int, axes: tuple[str, str], num: Numerics, *, bias: bool = True,
               rngs: nnx.Rngs):
    self.dtype = num.dtype
    self.kernel = param(rngs, (in_dim, out_dim), axes, num.param_dtype, fan_in=in_dim)
    self.bias = param(rngs, (out_dim,), axes[-1:], num.param_dtype, init="zeros") if bias else None

  def __call__(self, x):
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class GroupNorm(nnx.Module):
  """GroupNorm over the channels (last axis) of `[b, ..., c]`, statistics in float32."""

  def __init__(self, channels: int, num: Numerics, *, groups: int = 32, eps: float = 1e-5, rngs: nnx.Rngs):
    if channels % groups:
      raise ValueError(f"GroupNorm: {channels} channels do not split into {groups} groups")
    self.dtype, self.groups, self.eps = num.dtype, groups, eps
    self.scale = param(rngs, (channels,), ("norm",), num.param_dtype, init="ones")
    self.bias = param(rngs, (channels,), ("norm",), num.param_dtype, init="zeros")

  def __call__(self, x):
    # Statistics over every position and the channels within a group, in two passes (mean, then the centred
    # squares). Each pass first sums the positions per channel (`[b, p, c] -> [b, c]`, channels kept minor) and
    # only then the channels of a group: XLA:CPU reduces that layout 3-5x faster, forward and backward, than
    # one reduction over a `[b, p, groups, c / groups]` view (which kept a non-minor axis).
    b, c, per = x.shape[0], x.shape[-1], x.shape[-1] // self.groups
    x32 = x.astype(jnp.float32).reshape(b, -1, c)
    count = x32.shape[1] * per

    def group_mean(per_channel_sum):  # [b, c] -> each channel's group mean, [b, c]
      return jnp.repeat(per_channel_sum.reshape(b, self.groups, per).sum(-1) / count, per, axis=-1)

    centred = x32 - group_mean(x32.sum(1))[:, None]
    inv_std = jax.lax.rsqrt(group_mean(jnp.square(centred).sum(1)) + self.eps)
    y = centred * (inv_std * self.scale[...].astype(jnp.float32))[:, None] + self.bias[...].astype(jnp.float32)
    return y.reshape(x.shape).astype(self.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis with scale and bias, statistics in float32."""

  def __init__(self, dim: int, num: Numerics, *, eps: float = 1e-5, rngs: nnx.Rngs):
    self.dtype, self.eps = num.dtype, eps
    self.scale = param(rngs, (dim,), ("norm",), num.param_dtype, init="ones")
    self.bias = param(rngs, (dim,), ("norm",), num.param_dtype, init="zeros")

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, -1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(jnp.mean(jnp.square(x32 - mean), -1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


class ResBlock(nnx.Module):
  """diffusers `ResnetBlock2D`: GroupNorm-SiLU-Conv3x3 (+ projected time embedding), GroupNorm-SiLU-dropout-
  Conv3x3, plus the input (through a 1x1 conv when the channel count changes)."""

  def __init__(self, in_channels: int, out_channels: int, num: Numerics, *, groups: int, eps: float,
               temb_dim: int | None = None, dropout: float = 0.0, rngs: nnx.Rngs):
    self.norm1 = GroupNorm(in_channels, num, groups=groups, eps=eps, rngs=rngs)
    self.conv1 = Conv(in_channels, out_channels, num, rngs=rngs)
    self.time_emb_proj = (Linear(temb_dim, out_channels, ("embed", "conv_out"), num, rngs=rngs)
                          if temb_dim else None)
    self.norm2 = GroupNorm(out_channels, num, groups=groups, eps=eps, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout else None
    self.conv2 = Conv(out_channels, out_channels, num, rngs=rngs)
    self.conv_shortcut = (Conv(in_channels, out_channels, num, kernel_size=1, rngs=rngs)
                          if in_channels != out_channels else None)

  def __call__(self, x_bhwc, temb_bd=None):
    h = self.conv1(jax.nn.silu(self.norm1(x_bhwc)))
    if self.time_emb_proj is not None:
      h = h + self.time_emb_proj(jax.nn.silu(temb_bd))[:, None, None, :]
    h = jax.nn.silu(self.norm2(h))
    if self.dropout is not None:
      h = self.dropout(h)
    h = self.conv2(h)
    x = x_bhwc if self.conv_shortcut is None else self.conv_shortcut(x_bhwc)
    return constrain(x.astype(h.dtype) + h, ACT_BHWC)


class Downsample(nnx.Module):
  """Stride-2 3x3 conv. The UNet pads 1 on every side; the SD VAE pads (0, 1) on height and width only."""

  def __init__(self, channels: int, num: Numerics, *, asymmetric_padding: bool = False, rngs: nnx.Rngs):
    padding = ((0, 1), (0, 1)) if asymmetric_padding else ((1, 1), (1, 1))
    self.conv = Conv(channels, channels, num, stride=2, padding=padding, rngs=rngs)

  def __call__(self, x_bhwc):
    return constrain(self.conv(x_bhwc), ACT_BHWC)


@jax.custom_vjp
def nearest_upsample_conv(x_bhwc, kernel_hwio):
  """A 3x3 'same' convolution of the nearest-neighbour 2x upsampling of `x`, without upsampling: [b, 2h, 2w, o].

  Output pixel (2i + a, 2j + b) reads only source rows i - 1 + a, i + a and columns j - 1 + b, j + b, so each of
  the four phases is a 2x2 convolution of the source with summed taps. One 2x2 convolution of the source padded
  by one, with the four phases' kernels side by side as 4 x o output channels, makes all of them; the phases
  are then interleaved. 4 / 9 of the multiply-adds of `nearest_upsample_conv_reference`, the same sums.
  Differentiated, it is the reference, forward and backward: the phase form's gradient made an autoencoder
  training step 2.4x slower on CPU, and the phase forward with the reference's backward still 4% slower.
  """
  return _phase_conv(x_bhwc, kernel_hwio)


def _phase_conv(x_bhwc, kernel_hwio):
  b, h, w, _ = x_bhwc.shape
  out = kernel_hwio.shape[-1]

  def phase_taps(k):  # [3, ...] -> [phase, 2, ...]: phase 0 reads offsets -1, 0 of the source, phase 1 0, +1
    return jnp.stack([jnp.stack([k[0], k[1] + k[2]]), jnp.stack([k[0] + k[1], k[2]])])

  rows = phase_taps(kernel_hwio)  # [a, y, 3, i, o]
  taps = phase_taps(jnp.moveaxis(rows, 2, 0))  # [c, x, a, y, i, o]
  kernel = taps.transpose(3, 1, 4, 2, 0, 5).reshape(2, 2, -1, 4 * out)  # [y, x, i, (a, c, o)]
  y = jax.lax.conv_general_dilated(x_bhwc, kernel, (1, 1), ((1, 1), (1, 1)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC")).reshape(b, h + 1, w + 1, 2, 2, out)
  phases = jnp.stack([jnp.stack([y[:, a:a + h, c:c + w, a, c] for c in (0, 1)], axis=3) for a in (0, 1)], axis=2)
  return phases.reshape(b, 2 * h, 2 * w, out)  # [b, h, a, w, c, o] -> rows 2i + a, columns 2j + c


def _reference_fwd(x_bhwc, kernel_hwio):  # differentiated (training): the reference form, forward and backward
  return nearest_upsample_conv_reference(x_bhwc, kernel_hwio), (x_bhwc, kernel_hwio)


def _reference_bwd(residuals, cotangent):
  return jax.vjp(nearest_upsample_conv_reference, *residuals)[1](cotangent)


nearest_upsample_conv.defvjp(_reference_fwd, _reference_bwd)


def nearest_upsample_conv_reference(x_bhwc, kernel_hwio):
  """`nearest_upsample_conv` as written: repeat every pixel 2x2, then the 3x3 'same' convolution."""
  x = jnp.repeat(jnp.repeat(x_bhwc, 2, axis=1), 2, axis=2)
  return jax.lax.conv_general_dilated(x, kernel_hwio, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


# Below this many source pixels x in x out channels (b * h * w * c * o) the upsampled conv is cheaper as written:
# on 2 CPU cores `nearest_upsample_conv` is 2x faster at [1, 32, 48, 32] -> 32, level at [1, 16, 24, 32], and
# slower at [1, 8, 12, 32], where its extra ops cost more than the multiply-adds they save.
SUBPIXEL_MIN_WORK = 2 ** 19


class Upsample(nnx.Module):
  """Nearest-neighbour 2x upsampling, then a 3x3 conv: as `nearest_upsample_conv` at sizes where that is faster."""

  def __init__(self, channels: int, num: Numerics, *, rngs: nnx.Rngs):
    self.conv = Conv(channels, channels, num, rngs=rngs)

  def __call__(self, x_bhwc):
    dtype, kernel = self.conv.dtype, self.conv.kernel[...]
    b, h, w, c = x_bhwc.shape
    fast = b * h * w * c * kernel.shape[-1] >= SUBPIXEL_MIN_WORK
    upsample_conv = nearest_upsample_conv if fast else nearest_upsample_conv_reference
    y = upsample_conv(x_bhwc.astype(dtype), kernel.astype(dtype))
    return constrain(y + self.conv.bias[...].astype(dtype), ACT_BHWC)


def attend(q, k, v, impl: str):
  """Non-causal `kernels.attention` on `[batch, len, heads, head_dim]`, per batch shard under a mesh.

  XLA cannot partition a Pallas kernel, so under a multi-device mesh the call goes through `jax.shard_map`
  with the batch split as the rules say and everything else whole.
  """
  attention = functools.partial(kernels.attention, causal=False, impl=impl)
  mesh = logical.current_mesh()
  if mesh is None or mesh.size == 1:
    return attention(q, k, v)
  spec = P(logical.spec_for(("batch",), q.shape[:1])[0], None, None, None)
  return jax.shard_map(attention, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


class Attention(nnx.Module):
  """diffusers `Attention`: multi-head attention of tokens `x` over `context` (over themselves without one)."""

  def __init__(self, dim: int, num: Numerics, *, heads: int, context_dim: int | None = None,
               qkv_bias: bool = False, rngs: nnx.Rngs):
    if dim % heads:
      raise ValueError(f"attention width {dim} does not split into {heads} heads")
    self.heads, self.impl = heads, num.attention_impl
    context_dim = context_dim or dim
    self.to_q = Linear(dim, dim, ("embed", "heads"), num, bias=qkv_bias, rngs=rngs)
    self.to_k = Linear(context_dim, dim, ("embed", "heads"), num, bias=qkv_bias, rngs=rngs)
    self.to_v = Linear(context_dim, dim, ("embed", "heads"), num, bias=qkv_bias, rngs=rngs)
    self.to_out = Linear(dim, dim, ("heads", "embed"), num, rngs=rngs)

  def __call__(self, x_bld, context_bsd=None):
    context = x_bld if context_bsd is None else context_bsd

    def split(t):  # [b, len, heads * head_dim] -> [b, len, heads, head_dim]
      t = t.reshape(*t.shape[:2], self.heads, t.shape[-1] // self.heads)
      return constrain(t, ("batch", "length", "heads", "head_dim"))
    out = attend(split(self.to_q(x_bld)), split(self.to_k(context)), split(self.to_v(context)), self.impl)
    return self.to_out(out.reshape(x_bld.shape[:2] + (-1,)))


class SpatialSelfAttention(Attention):
  """The SD VAE mid-block attention: GroupNorm, single-head self-attention over all positions, residual."""

  def __init__(self, channels: int, num: Numerics, *, groups: int, eps: float, rngs: nnx.Rngs):
    super().__init__(channels, num, heads=1, qkv_bias=True, rngs=rngs)
    self.group_norm = GroupNorm(channels, num, groups=groups, eps=eps, rngs=rngs)

  def __call__(self, x_bhwc):
    b, h, w, c = x_bhwc.shape
    y = super().__call__(self.group_norm(x_bhwc).reshape(b, h * w, c))
    return constrain(x_bhwc + y.reshape(b, h, w, c), ACT_BHWC)


class GEGLU(nnx.Module):
  """The SD transformer's feed-forward: `proj` to 2 x mult x dim, value * GELU(gate), `out` back to dim."""

  def __init__(self, dim: int, num: Numerics, *, mult: int = 4, rngs: nnx.Rngs):
    self.proj = Linear(dim, 2 * mult * dim, ("embed", "mlp"), num, rngs=rngs)
    self.out = Linear(mult * dim, dim, ("mlp", "embed"), num, rngs=rngs)

  def __call__(self, x_bld):
    value, gate = jnp.split(self.proj(x_bld), 2, axis=-1)
    return self.out(constrain(value * jax.nn.gelu(gate, approximate=False), ("batch", "length", "mlp")))


class TransformerLayer(nnx.Module):
  """diffusers `BasicTransformerBlock`: pre-LayerNorm self-attention, cross-attention and GEGLU, residual."""

  def __init__(self, dim: int, num: Numerics, *, heads: int, context_dim: int, rngs: nnx.Rngs):
    self.norm1 = LayerNorm(dim, num, rngs=rngs)
    self.attn1 = Attention(dim, num, heads=heads, rngs=rngs)
    self.norm2 = LayerNorm(dim, num, rngs=rngs)
    self.attn2 = Attention(dim, num, heads=heads, context_dim=context_dim, rngs=rngs)
    self.norm3 = LayerNorm(dim, num, rngs=rngs)
    self.ff = GEGLU(dim, num, rngs=rngs)

  def __call__(self, x_bld, context_bsd):
    x = constrain(x_bld + self.attn1(self.norm1(x_bld)), ACT_BLD)
    x = constrain(x + self.attn2(self.norm2(x), context_bsd), ACT_BLD)
    return constrain(x + self.ff(self.norm3(x)), ACT_BLD)


class SpatialTransformer(nnx.Module):
  """diffusers `Transformer2DModel` as in SD-v1.4: GroupNorm (eps 1e-6), 1x1-conv `proj_in`, one
  `TransformerLayer` over the h * w positions, 1x1-conv `proj_out`, residual."""

  def __init__(self, channels: int, num: Numerics, *, heads: int, context_dim: int, groups: int,
               rngs: nnx.Rngs):
    self.norm = GroupNorm(channels, num, groups=groups, eps=1e-6, rngs=rngs)
    self.proj_in = Conv(channels, channels, num, kernel_size=1, rngs=rngs)
    self.transformer_block = TransformerLayer(channels, num, heads=heads, context_dim=context_dim, rngs=rngs)
    self.proj_out = Conv(channels, channels, num, kernel_size=1, rngs=rngs)

  def __call__(self, x_bhwc, context_bsd):
    b, h, w, c = x_bhwc.shape
    tokens = constrain(self.proj_in(self.norm(x_bhwc)).reshape(b, h * w, c), ACT_BLD)
    tokens = self.transformer_block(tokens, context_bsd)
    return constrain(x_bhwc + self.proj_out(tokens.reshape(b, h, w, c)), ACT_BHWC)
