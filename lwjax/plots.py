"""Figures as PNG files with matplotlib (Agg, no display): line charts of a measure against a setting, each point
with its uncertainty drawn as a band or error bars (learning curves, Best-of-N against N, accuracy against
document length), and labelled heatmaps (e.g. LRP4RAG's relevance of answer tokens to prompt tokens,
arXiv 2408.15533 Sec. 4), written next to the numbers they show.

A series is a list of points `(x, y)` or `(x, y, error)`, the error being the half-width drawn around y (a
standard error or a standard deviation: the caller says which in `error_note`)."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib import rc_context, ticker
from matplotlib.figure import Figure

DPI = 150
# One style for every figure: readable at the size a page shows a PNG, light grid, no top/right frame, text
# drawn as written (token labels such as `$5` must not turn into mathtext).
STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
         "legend.title_fontsize": 7.5, "xtick.labelsize": 8, "ytick.labelsize": 8, "axes.grid": True,
         "grid.alpha": 0.35, "grid.linewidth": 0.6, "axes.spines.top": False, "axes.spines.right": False,
         "legend.frameon": False, "text.parse_math": False}
DATA_TICKS = 12  # at most this many distinct x values: a tick at each, labelled with the value itself
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
MARKED_POINTS = 30  # a series of more points is drawn as a line alone
ERRORS = ("band", "bars")
LEGENDS = ("auto", "best", "outside")


def _points(name: str, values: Sequence) -> np.ndarray:
  """[points, 3] (x, y, error) sorted by x; error 0 where a point has none, and where it is nan."""
  rows = []
  for point in values:
    if len(point) not in (2, 3):
      raise ValueError(f"series {name!r}: a point is (x, y) or (x, y, error), got {point!r}")
    rows.append((float(point[0]), float(point[1]), float(point[2]) if len(point) == 3 else 0.0))
  out = np.asarray(sorted(rows), np.float64).reshape(-1, 3)
  out[:, 2] = np.nan_to_num(np.abs(out[:, 2]))
  return out


def _number(value: float, _pos=None) -> str:
  """A tick label: 16 not 16.0, 20,000 not 2e+04, 0.25 not 0.250000."""
  return f"{value:,.0f}" if value == round(value) and abs(value) < 1e9 else f"{value:.4g}"


def _x_ticks(axis, xs: np.ndarray, log_base: int) -> None:
  """A tick at each of the data's own x values when they are few (N = 1, 2, 4, 8, 16; steps 400, 800, ...) and
  spread enough to be read apart; otherwise a few round ones (integers where every x is one)."""
  span = xs[-1] - xs[0]
  spread = log_base or len(xs) < 2 or np.min(np.diff(xs)) >= span / 25
  if len(xs) <= DATA_TICKS and spread:
    axis.set_major_locator(ticker.FixedLocator(xs))
    axis.set_major_formatter(ticker.FuncFormatter(_number))
    axis.set_minor_locator(ticker.NullLocator())
  elif log_base:
    axis.set_major_locator(ticker.LogLocator(base=log_base))
    axis.set_major_formatter(ticker.FuncFormatter(_number))
  else:
    axis.set_major_locator(ticker.MaxNLocator(nbins=8, integer=bool(np.all(xs == np.round(xs)))))


def _style_axes(ax, xs: np.ndarray, *, log_x: int, log_y: int, y_range: tuple[float, float] | None) -> None:
  if log_x:
    ax.set_xscale("log", base=log_x)
  if log_y:
    ax.set_yscale("log", base=log_y)
  _x_ticks(ax.xaxis, xs, log_x)
  if not log_y:
    ax.yaxis.set_major_locator(ticker.MaxNLocator(nbins=8, steps=[1, 2, 2.5, 5, 10]))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(_number))
  if y_range is not None:
    pad = 0.03 * (y_range[1] - y_range[0])  # markers on the range's ends stay whole
    ax.set_ylim(y_range[0] - pad, y_range[1] + pad)


def panels_figure(panels: Mapping[str, Mapping[str, Sequence]], *, title: str, x_label: str, y_label: str,
                  y_range: tuple[float, float] | None = None, log_x: int = 0, log_y: int = 0, errors: str = "band",
                  error_note: str = "", dashed: Sequence[str] = (), legend: str = "auto",
                  figsize: tuple[float, float] = (6.0, 4.0)) -> Figure:
  """`panels` ({panel title: {series name: [(x, y) or (x, y, error), ...]}}) side by side, sharing the y axis,
  a series keeping its colour in every panel; see `line_figure` for the rest. `figsize` is per panel."""
  if errors not in ERRORS:
    raise ValueError(f"errors={errors!r}: one of {ERRORS}")
  if legend not in LEGENDS:
    raise ValueError(f"legend={legend!r}: one of {LEGENDS}")
  arrays = {panel: {name: _points(name, values) for name, values in series.items() if len(values)}
            for panel, series in panels.items()}
  arrays = {panel: series for panel, series in arrays.items() if series}
  if not arrays:
    raise ValueError("line_chart: no points to draw")
  every = np.concatenate([p for series in arrays.values() for p in series.values()])
  for axis_name, base, column in (("x", log_x, 0), ("y", log_y, 1)):
    if base and not np.all(every[:, column] > 0):
      raise ValueError(f"log_{axis_name}={base}: every {axis_name} must be > 0, got {every[:, column].min():g}")
  names = list(dict.fromkeys(name for series in arrays.values() for name in series))
  cmap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20"]
  colours = {name: cmap(i % cmap.N) for i, name in enumerate(names)}
  band_alpha = 0.18 if len(names) <= 4 else 0.1  # many overlapping bands stay see-through
  outside = legend == "outside" or (legend == "auto" and (len(names) > 4 or len(arrays) > 1))
  columns = -(-len(names) // 20)  # at most 20 entries a column: the legend stays as tall as the axes
  longest = max(len(name) for name in names)
  note = textwrap.fill(error_note, width=max(24, longest + 4))
  with rc_context(STYLE):
    # An outside legend widens the figure rather than narrowing the axes.
    legend_width = columns * (0.6 + 0.06 * longest) if outside else 0.0
    fig = Figure(figsize=(figsize[0] * len(arrays) + legend_width, figsize[1]), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, len(arrays), sharey=True, squeeze=False)[0]
    for ax, (panel, series) in zip(axes, arrays.items(), strict=True):
      for name, p in series.items():
        # Each later series thinner, with its own marker: one lying on another (equal scores) still shows. A dense
        # series (a curve of many steps) goes without markers.
        i = names.index(name)
        style = dict(color=colours[name], linestyle="--" if name in dashed else "-", label=name,
                     marker=MARKERS[i % len(MARKERS)] if len(p) <= MARKED_POINTS else None,
                     linewidth=max(2.2 - 0.25 * i, 1.2), markersize=max(6.5 - 0.6 * i, 4.0))
        if errors == "bars" and p[:, 2].any():
          ax.errorbar(p[:, 0], p[:, 1], yerr=p[:, 2], capsize=3, elinewidth=1, **style)
        else:
          ax.plot(p[:, 0], p[:, 1], **style)
        if errors == "band" and p[:, 2].any():
          ax.fill_between(p[:, 0], p[:, 1] - p[:, 2], p[:, 1] + p[:, 2], color=colours[name], alpha=band_alpha,
                          linewidth=0)
      _style_axes(ax, np.unique(every[:, 0]), log_x=log_x, log_y=log_y, y_range=y_range)
      ax.set_xlabel(x_label)
      if len(arrays) > 1:
        ax.set_title(panel)
    axes[0].set_ylabel(y_label)
    if len(arrays) > 1:
      fig.suptitle(title)
    else:
      axes[0].set_title(title)
    handles = {h.get_label(): h for ax in axes for h in ax.get_legend_handles_labels()[0]}
    where = fig if outside else axes[0]
    where.legend([handles[n] for n in names], names, title=note or None, ncols=columns, alignment="left",
                 loc="outside right upper" if outside else "best")
  return fig


def line_figure(series: Mapping[str, Sequence], *, title: str, x_label: str, y_label: str, **kwargs) -> Figure:
  """`series` ({name: [(x, y) or (x, y, error), ...]}) as one chart: lines with markers, each error as a shaded
  band (`errors="band"`) or error bars (`"bars"`), named in the legend's title by `error_note` (e.g. "shaded: ±1
  standard error over 2 seeds"); `y_range` fixes the y axis. `log_x`/`log_y`: the log base of that axis (2 for
  N = 1, 2, 4, ...), 0 linear. `dashed`: names of series drawn dashed (baselines, oracles). `legend`: "best"
  inside the axes, "outside" to their right (the figure widened for it), "auto" inside for up to four series.
  `figsize`: inches of the figure without an outside legend."""
  return panels_figure({"": series}, title=title, x_label=x_label, y_label=y_label, **kwargs)


def line_chart(path: str, series: Mapping[str, Sequence], **kwargs) -> None:
  """Writes `line_figure(series, **kwargs)` to the PNG `path`."""
  line_figure(series, **kwargs).savefig(path, dpi=DPI)


def panels_chart(path: str, panels: Mapping[str, Mapping[str, Sequence]], **kwargs) -> None:
  """Writes `panels_figure(panels, **kwargs)` to the PNG `path`."""
  panels_figure(panels, **kwargs).savefig(path, dpi=DPI)


def _label(token: str) -> str:
  """A token as an axis label: whitespace-only tokens quoted so that they show."""
  return token if token.strip() else repr(token)


def heatmap_figure(matrix_ap, row_labels: Sequence[str], column_labels: Sequence[str], *,
                   title: Sequence[str] = (), value_label: str = "relevance") -> Figure:
  """`matrix_ap` [rows, columns] as a heatmap: a row per label on the left (e.g. answer tokens), a column per label
  below, written vertically (e.g. prompt tokens; readable up to ~60), colours diverging around 0 (red +, blue -)
  and scaled to the largest |value|, a colour bar named `value_label`; `title` lines above."""
  matrix = np.asarray(matrix_ap, np.float32)
  rows, cols = matrix.shape
  if (rows, cols) != (len(row_labels), len(column_labels)):
    raise ValueError(f"matrix {matrix.shape} does not match {len(row_labels)} row x {len(column_labels)} "
                     "column labels")
  font = 8 if max(rows, cols) <= 30 else 7 if max(rows, cols) <= 60 else 6
  cell = font / 40  # inches: a label's line height, so that neighbouring labels do not overlap
  char = font / 110  # inches per character of a label
  longest_row = max((len(_label(t)) for t in row_labels), default=1)
  longest_col = max((len(_label(t)) for t in column_labels), default=1)
  width = max(4.0, 0.4 + longest_row * char + cols * cell + 1.2)
  height = max(1.8, 0.5 + 0.2 * len(title) + rows * cell + longest_col * char)
  scale = float(np.max(np.abs(matrix))) if matrix.size else 0.0
  with rc_context(STYLE):
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-(scale or 1.0), vmax=scale or 1.0, aspect="auto",
                      interpolation="nearest")
    ax.set_xticks(range(cols), [_label(t) for t in column_labels], rotation=90, fontsize=font)
    ax.set_yticks(range(rows), [_label(t) for t in row_labels], fontsize=font)
    ax.set_xticks(np.arange(cols + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(rows + 1) - 0.5, minor=True)
    ax.grid(False)
    ax.grid(which="minor", color="white", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    for side in ("top", "right"):
      ax.spines[side].set_visible(True)
    if title:
      ax.set_title("\n".join(title), loc="left", fontsize=9)
    bar = fig.colorbar(image, ax=ax, fraction=0.05 if cols > 12 else 0.12, pad=0.02, aspect=max(rows * 2, 6))
    bar.set_label(value_label, fontsize=7)
    bar.ax.tick_params(labelsize=7)
  return fig


def heatmap(path: str, matrix_ap, row_labels: Sequence[str], column_labels: Sequence[str], *,
            title: Sequence[str] = (), value_label: str = "relevance") -> None:
  """Writes `heatmap_figure(...)` to the PNG `path`."""
  heatmap_figure(matrix_ap, row_labels, column_labels, title=title, value_label=value_label).savefig(path, dpi=DPI)
