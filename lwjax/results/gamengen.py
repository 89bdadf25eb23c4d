"""GameNGen's tables (arXiv 2408.14837) from the evaluation job's `eval_metrics.json`: teacher-forced PSNR and
SSIM against copying the last frame and the autoencoder's ceiling, and the ablations' rows side by side."""

from __future__ import annotations

from lwjax.results.markdown import bold, read_json


def _steps(m: dict, field: str) -> dict[str, float]:
  """{DDIM steps: value} of the steps other than the evaluation's own (`ddim_steps`), fewest first."""
  return {s: v for s, v in sorted(m[f"{field}_by_ddim_steps"].items(), key=lambda kv: int(kv[0]))
          if int(s) != m["ddim_steps"]}


def teacher_forced(paths) -> str:
  """One run: copy-last-frame, the autoencoder ceiling, the world model at its DDIM steps and at the others.
  Bold: the better of the world model and copy-last-frame; another step count where it beats both."""
  m = read_json(paths[0])
  rows = {"psnr": ("psnr", "{:.2f}"), "ssim": ("ssim", "{:.3f}")}
  copy = {k: m[f"{k}_copy_last_frame"] for k in rows}
  model = {k: m[f"{k}_teacher_forced"] for k in rows}
  ceiling = {k: m[f"{k}_autoencoder"] for k in rows}
  steps = {k: _steps(m, k) for k in rows}

  def cells(values, best):
    return " | ".join(bold(fmt.format(values[k]), best(k)) for k, (_, fmt) in rows.items())

  def other_steps(k):
    fmt, best = rows[k][1], max(steps[k].values())
    return " / ".join(bold(fmt.format(v), v == best and v > max(model[k], copy[k])) for v in steps[k].values())

  return "\n".join([
      "| next frame (teacher-forced) | PSNR dB | SSIM |", "|---|---|---|",
      f"| copy the last context frame (baseline) | {cells(copy, lambda k: copy[k] > model[k])} |",
      f"| the autoencoder's reconstruction of the target (ceiling) | {cells(ceiling, lambda k: False)} |",
      f"| **the world model, {m['ddim_steps']} DDIM steps** | {cells(model, lambda k: model[k] > copy[k])} |",
      f"| the world model, {' / '.join(steps['psnr'])} DDIM steps | {other_steps('psnr')} | {other_steps('ssim')} |"])


def noise_augmentation(paths) -> str:
  """The demo (noise augmentation on) against the same run without it: teacher-forced and autoregressive PSNR.
  Bold: the better of the two in each column."""
  on, off = (read_json(p) for p in paths)
  if not on["noise_augmentation"] or off["noise_augmentation"]:
    raise ValueError(f"noise_augmentation: expected {paths[0]} with it on and {paths[1]} with it off")
  columns = [(lambda m: m["psnr_teacher_forced"], "{:.2f}"), (lambda m: m["ssim_teacher_forced"], "{:.3f}"),
             (lambda m: m["psnr_autoregressive"]["16"], "{:.2f}"), (lambda m: m["psnr_autoregressive"]["32"], "{:.2f}")]
  lines = [f"| | teacher-forced PSNR dB ({on['ddim_steps']} steps) | SSIM | autoregressive PSNR, frame 16 | frame 32 |",
           "|---|---|---|---|---|"]
  for label, m, other in (("noise augmentation on (the demo)", on, off), ("noise augmentation off", off, on)):
    lines.append(f"| {label} | " + " | ".join(bold(fmt.format(get(m)), get(m) > get(other))
                                               for get, fmt in columns) + " |")
  return "\n".join(lines)


def context_length(paths) -> str:
  """Runs at several context lengths, each against its own windows' copy-last-frame and autoencoder ceiling; the
  last run is the demo's. Bold: the largest margin over copy-last-frame."""
  runs = [read_json(p) for p in paths]
  margins = [m["psnr_teacher_forced"] - m["psnr_copy_last_frame"] for m in runs]
  lines = ["| context | world model PSNR dB | copy-last-frame | autoencoder ceiling | model minus copy-last "
           "| autoregressive 16 / 32 |", "|---|---|---|---|---|---|"]
  for m, margin in zip(runs, margins, strict=True):
    frames = m["context_frames"]
    label = f"{frames} frame" + ("s" if frames > 1 else "") + (" (the demo)" if m is runs[-1] else "")
    ar = m["psnr_autoregressive"]
    lines.append(f"| {label} | {m['psnr_teacher_forced']:.2f} | {m['psnr_copy_last_frame']:.2f} "
                 f"| {m['psnr_autoencoder']:.2f} | {bold(f'{margin:+.2f}', margin == max(margins))} "
                 f"| {ar['16']:.2f} / {ar['32']:.2f} |")
  return "\n".join(lines)


def _difference(d: dict, fmt: str) -> str:
  low, high = d["ci95"]
  return bold(f"{d['mean_diff']:{fmt}} [{low:{fmt}}, {high:{fmt}}]", low > 0 or high < 0)


def paired_interval(labels: dict[str, str]):
  """The same world model on several held-out sets (one evaluation each; `labels`: {its results file name: the
  set in words}): its PSNR and SSIM against copy-last-frame, the paired difference (model minus copy, per window)
  with the evaluation's bootstrap 95% interval (episodes resampled, then windows; windows alone for one episode).
  Bold: a difference whose interval excludes 0."""
  def table(paths) -> str:
    lines = ["| held-out set | windows / episodes | PSNR dB: model / copy / autoencoder | PSNR difference [95% CI] "
             "| SSIM: model / copy | SSIM difference [95% CI] |", "|---|---|---|---|---|---|"]
    for path, label in zip(paths, labels.values(), strict=True):
      m = read_json(path)
      paired = m["paired_vs_copy_last_frame"]
      lines.append(f"| {label} | {paired['psnr']['n_windows']} / {paired['psnr']['n_episodes']} "
                   f"| {m['psnr_teacher_forced']:.2f} / {m['psnr_copy_last_frame']:.2f} / {m['psnr_autoencoder']:.2f} "
                   f"| {_difference(paired['psnr'], '+.2f')} "
                   f"| {m['ssim_teacher_forced']:.3f} / {m['ssim_copy_last_frame']:.3f} "
                   f"| {_difference(paired['ssim'], '+.3f')} |")
    return "\n".join(lines)
  return table
