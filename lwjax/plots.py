"""Line charts as PNG files with Pillow alone (no plotting library in the dependencies): learning curves and
accuracy-vs-setting plots that sit next to the numbers they show."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
