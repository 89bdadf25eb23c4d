"""`lwjax.plots`: line charts and heatmaps as PNGs of the right size whose pixels carry the right colours."""

import numpy as np
import pytest
from PIL import Image

from lwjax import plots


def test_line_chart_draws_each_series(tmp_path):
  path = str(tmp_path / "curve.png")
  plots.line_chart(path, {"a": [(0, 0.0), (10, 0.5), (20, 1.0)], "b": [(0, 1.0), (20, 0.0)]}, title="t",
                   x_label="step", y_label="accuracy", y_range=(0.0, 1.0))
  pixels = np.asarray(Image.open(path).convert("RGB"))
  assert pixels.shape == (440, 720, 3)
  for colour in plots.COLOURS[:2]:
    assert (pixels == colour).all(-1).sum() > 50
  assert not (pixels == plots.COLOURS[2]).all(-1).any()
  with pytest.raises(ValueError, match="no points"):
    plots.line_chart(path, {}, title="t", x_label="x", y_label="y")


def test_relevance_heatmap_writes_a_labelled_png(tmp_path):
  path = str(tmp_path / "map.png")
  plots.heatmap(path, np.array([[0.5, -1.0, 0.0]]), ["city3"], ["<bos>", "doc", "e1"], title=["t"])
  image = Image.open(path)
  assert image.size[0] > 3 * 12 and image.size[1] > 28
  assert plots.diverging_colour(1.0, 1.0) == (255, 0, 0) and plots.diverging_colour(-1.0, 1.0) == (0, 0, 255)
  with pytest.raises(ValueError, match="does not match"):
    plots.heatmap(path, np.zeros((1, 2)), ["a"], ["x", "y", "z"])
