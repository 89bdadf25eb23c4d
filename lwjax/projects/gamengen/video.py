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


def labelled_strip(rows: dict[str, np.ndarray], captions: list[str], *, min_width: int = 160) -> np.ndarray:
  """Frames people look at: each row of `rows` ({label: uint8 [n, H, W, 3]}, e.g. recorded above generated)
  side by side, the rows stacked, the label left of each row and `captions[i]` (e.g. the action taken) under
  column i; frames narrower than `min_width` are enlarged by an integer factor (nearest). uint8 [h, w, 3]."""
  from PIL import Image, ImageDraw
  arrays = [_check_frames(frames) for frames in rows.values()]
  n, h, w, _ = arrays[0].shape
  if any(a.shape != arrays[0].shape for a in arrays) or len(captions) != n:
    raise ValueError(f"rows of equal shape and one caption per column expected, got "
                     f"{[a.shape for a in arrays]} and {len(captions)} captions")
  k = max(1, -(-min_width // w))
  h, w = h * k, w * k
  label_w, caption_h, gap = 80, 14, 2
  canvas = Image.new("RGB", (label_w + n * (w + gap), len(arrays) * (h + gap) + caption_h), (24, 24, 24))
  draw = ImageDraw.Draw(canvas)
  for r, (label, frames) in enumerate(zip(rows, arrays, strict=True)):
    y = r * (h + gap)
    draw.text((4, y + h // 2 - 6), label, fill=(230, 230, 230))
    for i, frame in enumerate(frames):
      canvas.paste(Image.fromarray(frame.repeat(k, 0).repeat(k, 1)), (label_w + i * (w + gap), y))
  for i, caption in enumerate(captions):
    draw.text((label_w + i * (w + gap) + 2, len(arrays) * (h + gap)), caption[:max(4, w // 6)],
              fill=(230, 230, 230))
  return np.asarray(canvas)


def write_png(path: str, image_hwc: np.ndarray) -> None:
  from PIL import Image
  Image.fromarray(np.asarray(image_hwc, np.uint8)).save(path)


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
