"""`lwjax.plots`: line charts with error bands, log axes and the data's own ticks, panels, and labelled heatmaps,
written as PNGs."""

import io

import numpy as np
import pytest
from PIL import Image

from lwjax import plots

SERIES = {"a": [(1, 0.2), (2, 0.5), (4, 0.6), (8, 0.7), (16, 0.9)], "b": [(1, 0.4), (16, 0.3)]}
LABELS = dict(title="t", x_label="N", y_label="accuracy")


def _ticks(fig, axis: str = "x") -> list[str]:
  """The tick labels drawn on the first axes' `axis` (those inside its view)."""
  fig.savefig(io.BytesIO(), format="png")  # draws, so the tick labels hold their text
  ax = getattr(fig.axes[0], f"{axis}axis")
  lo, hi = sorted(ax.get_view_interval())
  return [t.get_text() for t, v in zip(ax.get_ticklabels(), ax.get_ticklocs(), strict=True) if lo <= v <= hi]


def _pixels(path) -> np.ndarray:
  return np.asarray(Image.open(path).convert("RGB")).astype(int)


def test_error_bands_and_bars_are_drawn(tmp_path):
  plain, banded, bars = (str(tmp_path / f"{n}.png") for n in ("plain", "banded", "bars"))
  with_error = {name: [(x, y, 0.08) for x, y in points] for name, points in SERIES.items()}
  plots.line_chart(plain, SERIES, y_range=(0.0, 1.0), **LABELS)
  plots.line_chart(banded, with_error, y_range=(0.0, 1.0), error_note="shaded: ±1 SE", **LABELS)
  plots.line_chart(bars, with_error, y_range=(0.0, 1.0), errors="bars", **LABELS)
  a, b, c = _pixels(plain), _pixels(banded), _pixels(bars)
  assert a.shape == b.shape and a.shape[1] > 600  # ~6 inches at 150 dpi
  assert (a != b).any(-1).sum() > 2000 and (a != c).any(-1).sum() > 200
  # A band is a light tint of its line's colour: many pale, not white, pixels that the plain chart has not.
  pale = lambda p: ((p.min(-1) > 180) & (p.min(-1) < 250) & (p.max(-1) - p.min(-1) > 10)).sum()  # noqa: E731
  assert pale(b) > pale(a) + 2000
  with pytest.raises(ValueError, match="no points"):
    plots.line_chart(plain, {}, **LABELS)
  with pytest.raises(ValueError, match="a point is"):
    plots.line_chart(plain, {"a": [(1, 2, 3, 4)]}, **LABELS)
  with pytest.raises(ValueError, match="errors="):
    plots.line_chart(plain, SERIES, errors="whiskers", **LABELS)


def test_log_axes_and_ticks_at_the_data(tmp_path):
  fig = plots.line_figure(SERIES, log_x=2, **LABELS)
  assert fig.axes[0].get_xscale() == "log" and _ticks(fig) == ["1", "2", "4", "8", "16"]
  # Linear: still the data's x values (no 4.75, 8.5, 12.25) where they are few and spread; round y ticks.
  steps = {"run": [(s, s / 3000) for s in (400, 800, 1200, 1600, 2000, 2400)]}
  fig = plots.line_figure(steps, y_range=(0.0, 1.0), **LABELS)
  assert _ticks(fig) == ["400", "800", "1,200", "1,600", "2,000", "2,400"]
  assert _ticks(fig, "y") == ["0", "0.2", "0.4", "0.6", "0.8", "1"]
  many = {"loss": [(s, 1.0 / s) for s in range(1, 200, 4)]}
  fig = plots.line_figure(many, log_y=10, **LABELS)
  assert fig.axes[0].get_yscale() == "log" and all("." not in t for t in _ticks(fig))  # round integers
  plots.line_chart(str(tmp_path / "log.png"), many, log_x=10, log_y=10, **LABELS)
  assert Image.open(tmp_path / "log.png").size[0] > 600
  with pytest.raises(ValueError, match="log_x=2: every x must be > 0"):
    plots.line_figure({"a": [(0, 1.0), (1, 2.0)]}, log_x=2, **LABELS)


def test_panels_share_colours_and_one_legend(tmp_path):
  panels = {"op2": SERIES, "op3": {"b": [(1, 0.1), (16, 0.2)], "c": [(1, 0.3), (2, 0.4)]}}
  fig = plots.panels_figure(panels, dashed=("c",), **LABELS)
  left, right = fig.axes[:2]
  colour = {line.get_label(): line.get_color() for line in right.get_lines()}
  assert [line.get_color() for line in left.get_lines() if line.get_label() == "b"] == [colour["b"]]
  assert right.get_lines()[1].get_linestyle() == "--" and left.get_title() == "op2"
  assert [t.get_text() for t in fig.legends[0].get_texts()] == ["a", "b", "c"]
  plots.panels_chart(str(tmp_path / "p.png"), panels, **LABELS)
  assert Image.open(tmp_path / "p.png").size[0] > 2 * 600


def test_heatmap_labels_every_token(tmp_path):
  columns = ["<bos>", "doc", "e1", "$5", " "] + [f"w{i}" for i in range(55)]  # 60 prompt tokens
  matrix = np.zeros((2, len(columns)))
  matrix[0, 1], matrix[1, 3] = 2.0, -1.0
  fig = plots.heatmap_figure(matrix, ["city3", "<eos>"], columns, title=["faithful", "line 2"])
  fig.savefig(io.BytesIO(), format="png")
  ax = fig.axes[0]
  assert [t.get_text() for t in ax.get_xticklabels()] == columns[:4] + ["' '"] + columns[5:]
  assert [t.get_text() for t in ax.get_yticklabels()] == ["city3", "<eos>"]
  assert ax.get_images()[0].get_clim() == (-2.0, 2.0) and ax.get_title(loc="left") == "faithful\nline 2"
  path = tmp_path / "map.png"
  plots.heatmap(str(path), matrix, ["city3", "<eos>"], columns, title=["t"])
  pixels = _pixels(path)
  assert pixels.shape[1] > 60 * 20  # a column wide enough for its label
  red = (pixels[..., 0] > 150) & (pixels[..., 2] < 80)
  blue = (pixels[..., 2] > 150) & (pixels[..., 0] < 80)
  assert red.sum() > 100 and blue.sum() > 100
  with pytest.raises(ValueError, match="does not match"):
    plots.heatmap(str(path), np.zeros((1, 2)), ["a"], ["x", "y", "z"])
