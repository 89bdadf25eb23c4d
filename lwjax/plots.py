"""Charts as PNG files with Pillow alone (no plotting library in the dependencies): line charts (learning curves,
accuracy-vs-setting plots) and labelled heatmaps (e.g. LRP4RAG's relevance of answer tokens to prompt tokens,
arXiv 2408.15533 Sec. 4), written next to the numbers they show."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127))


def line_chart(path: str, series: Mapping[str, Sequence[tuple[float, float]]], *, title: str, x_label: str,
               y_label: str, y_range: tuple[float, float] | None = None, size: tuple[int, int] = (720, 440)) -> None:
  """Writes `series` ({name: [(x, y), ...]}) as one chart with a legend to the PNG `path`."""
  points = [p for values in series.values() for p in values]
  if not points:
    raise ValueError("line_chart: no points to draw")
  width, height = size
  left, right, top, bottom = 70, 170, 36, 50
  x0, x1 = min(x for x, _ in points), max(x for x, _ in points)
  y0, y1 = y_range or (min(y for _, y in points), max(y for _, y in points))
  x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

  def at(x: float, y: float) -> tuple[float, float]:
    return (left + (x - x0) / (x1 - x0) * (width - left - right),
            height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

  image = Image.new("RGB", size, "white")
  draw = ImageDraw.Draw(image)
  draw.text((left, 10), title, fill="black")
  draw.rectangle([left, top, width - right, height - bottom], outline="black")
  for i in range(5):
    y = y0 + (y1 - y0) * i / 4
    _, py = at(x0, y)
    draw.line([left - 4, py, left, py], fill="black")
    draw.text((8, py - 6), f"{y:.3g}", fill="black")
    x = x0 + (x1 - x0) * i / 4
    px, _ = at(x, y0)
    draw.line([px, height - bottom, px, height - bottom + 4], fill="black")
    draw.text((px - 14, height - bottom + 8), f"{x:.4g}", fill="black")
  draw.text(((left + width - right) // 2 - 30, height - 18), x_label, fill="black")
  draw.text((8, top - 18), y_label, fill="black")
  for i, (name, values) in enumerate(series.items()):
    colour = COLOURS[i % len(COLOURS)]
    xy = [at(x, y) for x, y in sorted(values)]
    if len(xy) > 1:
      draw.line(xy, fill=colour, width=2)
    for px, py in xy:
      draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
    ly = top + 8 + 18 * i
    draw.line([width - right + 10, ly + 6, width - right + 30, ly + 6], fill=colour, width=3)
    draw.text((width - right + 36, ly), name[:20], fill="black")
  image.save(path)


def diverging_colour(value: float, scale: float) -> tuple[int, int, int]:
  """Diverging map: 0 white, +scale red, -scale blue."""
  t = float(np.clip(value / scale, -1.0, 1.0)) if scale > 0 else 0.0
  fade = int(round(255 * (1 - abs(t))))
  return (255, fade, fade) if t >= 0 else (fade, fade, 255)


def heatmap(path: str, matrix_ap, row_labels: Sequence[str], column_labels: Sequence[str], *,
            title: Sequence[str] = ()) -> None:
  """Writes `matrix_ap` [rows, columns] as a heatmap: rows labelled on the left (e.g. answer tokens), columns below,
  written vertically (e.g. prompt tokens), colours diverging around 0 and scaled to the largest |value|; `title`
  lines above."""
  matrix = np.asarray(matrix_ap, np.float32)
  rows, cols = matrix.shape
  if (rows, cols) != (len(row_labels), len(column_labels)):
    raise ValueError(f"matrix {matrix.shape} does not match {len(row_labels)} row x {len(column_labels)} "
                     "column labels")
  cell_w, cell_h = max(12, min(28, 1000 // max(cols, 1))), 28
  label_h = 8 + 7 * max((len(t) for t in column_labels), default=1)
  left, top = 12 + 7 * max((len(t) for t in row_labels), default=1), 16 + 14 * len(title)
  width, height = left + cols * cell_w + 20, top + rows * cell_h + label_h + 24
  image = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(image)
  for i, line in enumerate(title):
    draw.text((8, 6 + 14 * i), line, fill="black")
  scale = float(np.max(np.abs(matrix))) if matrix.size else 0.0
  for r in range(rows):
    draw.text((6, top + r * cell_h + cell_h // 2 - 6), row_labels[r], fill="black")
    for c in range(cols):
      x, y = left + c * cell_w, top + r * cell_h
      draw.rectangle([x, y, x + cell_w - 1, y + cell_h - 1], fill=diverging_colour(matrix[r, c], scale),
                     outline=(220,) * 3)
  for c, token in enumerate(column_labels):
    label = Image.new("RGB", (label_h, 12), "white")
    ImageDraw.Draw(label).text((0, 0), token, fill="black")
    image.paste(label.rotate(90, expand=True), (left + c * cell_w + max(cell_w // 2 - 6, 0), top + rows * cell_h + 4))
  draw.text((8, height - 16), f"red +, blue -; full colour = max |relevance| = {scale:.3g}", fill="black")
  image.save(path)
