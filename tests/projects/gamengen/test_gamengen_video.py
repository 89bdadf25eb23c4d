"""Rollout videos: GIF round trip, mp4 or a clear error, TensorBoard video or image-strip summaries."""

import glob
import importlib.util
import os
import struct

import numpy as np
import pytest
from tensorboardX import SummaryWriter
from tensorboardX.proto import event_pb2

from lwjax.projects.gamengen import video


def clip(t=5, h=12, w=16):
  """Frame i is one flat colour per half, few colours so the GIF palette keeps them exactly."""
  frames = np.zeros((t, h, w, 3), np.uint8)
  for i in range(t):
    frames[i, :, : w // 2] = (40 * i, 0, 255)
    frames[i, :, w // 2:] = (0, 255 - 40 * i, 0)
  return frames


def read_events(directory):
  """Summary values from tensorboardX event files (TFRecord framing: length, crc, data, crc)."""
  values = []
  for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      values += [(event.step, v) for v in event.summary.value]
      pos += 12 + length + 4
  return values


def test_gif_round_trip(tmp_path):
  Image = pytest.importorskip("PIL.Image")
  frames = clip()
  path = str(tmp_path / "clip.gif")
  video.write_gif(path, frames, fps=10)
  with Image.open(path) as gif:
    assert gif.n_frames == len(frames) and gif.info["duration"] == 100 and gif.info["loop"] == 0
    for i in range(len(frames)):
      gif.seek(i)
      np.testing.assert_array_equal(np.asarray(gif.convert("RGB")), frames[i])


def test_rejects_bad_frames(tmp_path):
  with pytest.raises(ValueError, match="uint8 frames"):
    video.write_gif(str(tmp_path / "x.gif"), clip().astype(np.float32))
  with pytest.raises(ValueError, match="uint8 frames"):
    video.image_strip(clip()[0])


def test_mp4_or_a_clear_error(tmp_path):
  path = str(tmp_path / "clip.mp4")
  if importlib.util.find_spec("imageio") and importlib.util.find_spec("imageio_ffmpeg"):
    video.write_mp4(path, clip(h=16, w=16))
    assert os.path.getsize(path) > 0
  else:
    with pytest.raises(ImportError, match="imageio-ffmpeg"):
      video.write_mp4(path, clip())


def test_image_strip_spaces_frames_evenly():
  frames = clip(t=7)
  strip = video.image_strip(frames, max_frames=3)
  np.testing.assert_array_equal(strip, np.concatenate([frames[0], frames[3], frames[6]], axis=1))
  assert video.image_strip(frames[:2], max_frames=3).shape == (12, 32, 3)


def test_tensorboard_summary(tmp_path):
  with SummaryWriter(str(tmp_path)) as writer:
    kind = video.add_video_summary(writer, "rollout", clip(), step=3, fps=10, max_strip_frames=4)
  assert kind == ("video" if importlib.util.find_spec("moviepy") else "image")
  (step, value), = read_events(str(tmp_path))
  assert step == 3 and value.tag == "rollout" and value.image.height == 12
  assert value.image.width == (16 if kind == "video" else 4 * 16)


def test_labelled_strip_puts_recorded_above_generated_with_captions():
  recorded = np.full((3, 6, 8, 3), 200, np.uint8)
  generated = np.full((3, 6, 8, 3), 50, np.uint8)
  image = video.labelled_strip({"recorded": recorded, "generated": generated}, ["FORWARD", "TURN_LEFT", "NOOP"],
                               min_width=16)
  # Frames enlarged 2x (8 -> 16 columns): three columns after an 80-pixel label margin, two rows, captions.
  assert image.dtype == np.uint8 and image.shape[1] == 80 + 3 * (16 + 2) and image.shape[0] > 2 * 12
  assert (image[0:12, 80:96] == 200).all() and (image[14:26, 80:96] == 50).all()
  with pytest.raises(ValueError, match="one caption per column"):
    video.labelled_strip({"recorded": recorded, "generated": generated}, ["only one"])
