"""Writing GameNGen rollouts (frames uint8 [T, H, W, 3]) as GIF, mp4 and TensorBoard summaries
(GameNGen, arXiv 2408.14837, sec. 4: the paper shows generated play as videos).

GIFs need Pillow; mp4 needs `imageio` with its ffmpeg plugin (`imageio-ffmpeg`). TensorBoard videos go
through tensorboardX's `add_video`, which encodes a GIF with moviepy; when moviepy is not installed,
`add_video_summary` logs an image strip of evenly spaced frames side by side instead (`add_image`).
"""

from __future__ import annotations

import importlib
import importlib.util

import numpy as np


def _check_frames(frames_thwc) -> np.ndarray:
  frames = np.asarray(frames_thwc)
  if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or not len(frames):
    raise ValueError(f"expected uint8 frames [T>0, H, W, 3], got {frames.dtype} {frames.shape}")
  return frames


def write_gif(path: str, frames_thwc, fps: float = 20.0) -> None:
  """An animated, looping GIF of the frames at `fps` (GIF delays are whole 10 ms units)."""
  frames = _check_frames(frames_thwc)
  try:
    from PIL import Image
  except ImportError as e:
    raise ImportError("write_gif needs Pillow: pip install pillow") from e
  images = [Image.fromarray(f) for f in frames]
  images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)


def write_mp4(path: str, frames_thwc, fps: float = 20.0) -> None:
  """An H.264 mp4 of the frames through imageio's ffmpeg plugin."""
  frames = _check_frames(frames_thwc)
  try:
    imageio = importlib.import_module("imageio.v2")
    importlib.import_module("imageio_ffmpeg")
  except ImportError as e:
    raise ImportError("write_mp4 needs imageio and its ffmpeg plugin: pip install imageio imageio-ffmpeg") from e
  imageio.mimwrite(path, list(frames), fps=fps, macro_block_size=2)  # libx264 needs even sizes


def image_strip(frames_thwc, max_frames: int = 16) -> np.ndarray:
  """At most `max_frames` evenly spaced frames side by side: uint8 [H, n * W, 3]."""
  frames = _check_frames(frames_thwc)
  picks = np.unique(np.linspace(0, len(frames) - 1, min(max_frames, len(frames))).round().astype(int))
  return np.concatenate(list(frames[picks]), axis=1)


def add_video_summary(writer, tag: str, frames_thwc, step: int, fps: float = 20.0, max_strip_frames: int = 16) -> str:
  """Logs the frames to a tensorboardX SummaryWriter: a video with moviepy, else an image strip.

  Returns "video" or "image", what was logged.
  """
  frames = _check_frames(frames_thwc)
  if importlib.util.find_spec("moviepy") is not None:
    writer.add_video(tag, frames.transpose(0, 3, 1, 2)[None], global_step=step, fps=fps)  # [N, T, C, H, W]
    return "video"
  writer.add_image(tag, image_strip(frames, max_strip_frames), global_step=step, dataformats="HWC")
  return "image"
