"""A relevance matrix (answer tokens x prompt tokens) as a PNG heatmap with token labels, Pillow alone, as LRP4RAG
(arXiv 2408.15533, Sec. 4) shows the relevance of faithful and hallucinated answers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw


def colour(value: float, scale: float) -> tuple[int, int, int]:
  """Diverging map: 0 white, +scale red, -scale blue."""
  t = float(np.clip(value / scale, -1.0, 1.0)) if scale > 0 else 0.0
  fade = int(round(255 * (1 - abs(t))))
  return (255, fade, fade) if t >= 0 else (fade, fade, 255)


def relevance_heatmap(path: str, matrix_ap, answer_tokens: Sequence[str], prompt_tokens: Sequence[str], *,
                      title: Sequence[str] = ()) -> None:
  """Writes `matrix_ap` [answer, prompt] as a heatmap: rows labelled by answer tokens, columns by the prompt tokens
  (written vertically below), colours scaled to the largest |relevance|; `title` lines above."""
  matrix = np.asarray(matrix_ap, np.float32)
  rows, cols = matrix.shape
  if (rows, cols) != (len(answer_tokens), len(prompt_tokens)):
    raise ValueError(f"matrix {matrix.shape} does not match {len(answer_tokens)} answer x {len(prompt_tokens)} "
                     "prompt labels")
  cell_w, cell_h = max(12, min(28, 1000 // max(cols, 1))), 28
  label_h = 8 + 7 * max((len(t) for t in prompt_tokens), default=1)
  left, top = 12 + 7 * max((len(t) for t in answer_tokens), default=1), 16 + 14 * len(title)
  width, height = left + cols * cell_w + 20, top + rows * cell_h + label_h + 24
  image = Image.new("RGB", (width, height), "white")
  draw = ImageDraw.Draw(image)
  for i, line in enumerate(title):
    draw.text((8, 6 + 14 * i), line, fill="black")
  scale = float(np.max(np.abs(matrix))) if matrix.size else 0.0
  for r in range(rows):
    draw.text((6, top + r * cell_h + cell_h // 2 - 6), answer_tokens[r], fill="black")
    for c in range(cols):
      x, y = left + c * cell_w, top + r * cell_h
      draw.rectangle([x, y, x + cell_w - 1, y + cell_h - 1], fill=colour(matrix[r, c], scale), outline=(220,) * 3)
  for c, token in enumerate(prompt_tokens):
    label = Image.new("RGB", (label_h, 12), "white")
    ImageDraw.Draw(label).text((0, 0), token, fill="black")
    image.paste(label.rotate(90, expand=True), (left + c * cell_w + max(cell_w // 2 - 6, 0), top + rows * cell_h + 4))
  draw.text((8, height - 16), f"red +, blue -; full colour = max |relevance| = {scale:.3g}", fill="black")
  image.save(path)
