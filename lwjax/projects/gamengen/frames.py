"""Frame geometry of the GameNGen model: recorded frames to model images and back (arXiv 2408.14837, sec. 4.2).

The paper's model sees the 320x240 frames padded to 320x256 (so that the 8x autoencoder and the UNet's
downsamplings divide the latent grid: 32x40 latents). Smaller scales first shrink the frames by an integer
box filter (`downsample`: 2 -> 160x120, 4 -> 80x60) and pad to a multiple of `pad_multiple` the same way.
Padding is black (-1) at the bottom and the right; `to_uint8` crops it off again.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lwjax.config import option, schema_of
from lwjax.projects.gamengen.env import FRAME_SHAPE


@dataclasses.dataclass(frozen=True)
class FrameGeometry:
  downsample: int = option(1, min=1, doc="integer box-filter factor applied to the recorded 240x320 frames")
  pad_multiple: int = option(64, min=1, doc="pad rows and columns to a multiple of this (64 gives the paper's "
                                          "256x320)")

  def __post_init__(self):
    h, w, _ = FRAME_SHAPE
    if h % self.downsample or w % self.downsample:
      raise ValueError(f"downsample={self.downsample} does not divide the {h}x{w} frames")

  @classmethod
  def from_dict(cls, d) -> FrameGeometry:
    return cls(**dict(d))

  @property
  def frame_shape(self) -> tuple[int, int, int]:
    """[rows, columns, 3] of a frame at model resolution, before padding."""
    h, w, c = FRAME_SHAPE
    return h // self.downsample, w // self.downsample, c

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """[rows, columns, 3] of the padded model image."""
    h, w, c = self.frame_shape
    m = self.pad_multiple
    return -(-h // m) * m, -(-w // m) * m, c

  def latent_shape(self, channels: int, factor: int = 8) -> tuple[int, int, int]:
    h, w, _ = self.image_shape
    if h % factor or w % factor:
      raise ValueError(f"image {h}x{w} is not divisible by the autoencoder's factor {factor}")
    return h // factor, w // factor, channels

  def shrink(self, frames_uint8: np.ndarray) -> np.ndarray:
    """Recorded frames [..., 240, 320, 3] uint8 -> [..., rows, columns, 3] uint8 at model resolution."""
    f = self.downsample
    if f == 1:
      return np.asarray(frames_uint8)
    h, w, c = self.frame_shape
    x = np.asarray(frames_uint8, np.float32).reshape(*frames_uint8.shape[:-3], h, f, w, f, c)
    return np.round(x.mean(axis=(-4, -2))).astype(np.uint8)

  def to_model(self, frames_uint8: np.ndarray) -> np.ndarray:
    """Recorded frames [..., 240, 320, 3] uint8 -> padded images [..., H, W, 3] float32 in [-1, 1]."""
    x = self.shrink(frames_uint8).astype(np.float32) / 127.5 - 1.0
    (h, w, _), (hp, wp, _) = self.frame_shape, self.image_shape
    pad = [(0, 0)] * (x.ndim - 3) + [(0, hp - h), (0, wp - w), (0, 0)]
    return np.pad(x, pad, constant_values=-1.0)

  def to_uint8(self, images):
    """Padded model images [..., H, W, 3] in [-1, 1] (NumPy or JAX) -> frames [..., rows, columns, 3] uint8."""
    h, w, _ = self.frame_shape
    return to_uint8(images, h, w)


SCHEMA = schema_of(FrameGeometry)


def to_uint8(images, crop_rows: int | None = None, crop_cols: int | None = None):
  """Images [..., H, W, 3] in [-1, 1] (NumPy or JAX, any float dtype) -> uint8, rounded, keeping the top
  `crop_rows` rows and the left `crop_cols` columns (None keeps all): the model pads at the bottom and right."""
  x = images[..., :crop_rows, :crop_cols, :].astype(np.float32)
  return ((x.clip(-1.0, 1.0) + 1.0) * 127.5 + 0.5).astype(np.uint8)

