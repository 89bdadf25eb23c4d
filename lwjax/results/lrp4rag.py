"""LRP4RAG's tables (arXiv 2408.15533) from the evaluation job's `metrics.json`: what the generator answers
from, by group of prompts, and the hallucination detectors' cross-validated scores."""

from __future__ import annotations

from lwjax.results.markdown import bold, read_json

NAMES = {"accuracy": "accuracy", "precision": "precision", "recall": "recall", "f1": "F1"}  # classifiers.METRICS


def groups(paths) -> str:
  """Per group of held-out prompts: how many, the share answered from the passage, from memory, otherwise,
  and the share hallucinated."""
  m = read_json(paths[0])
  lines = ["| group | n | answer from passage | from memory | other | hallucinated |", "|---|---|---|---|---|---|"]
  for group, g in m["by_group"].items():
    lines.append(f"| {group} | {g['n']} | {g['passage']:.2f} | {g['memory']:.2f} | {g['other']:.2f} "
                 f"| {g['hallucinated']:.2f} |")
  return "\n".join(lines)


def detectors(paths) -> str:
  """Every detector's mean ± std over the folds (hallucinated = positive), the majority class last. Bold: the
  best accuracy and F1, and the name of the detector with the best accuracy."""
  m = read_json(paths[0])
  detectors = m["detectors"]
  best = {metric: max(d[metric]["mean"] for d in detectors.values()) for metric in ("accuracy", "f1")}
  lines = ["| features / classifier | " + " | ".join(NAMES.values()) + " |", "|---|" + "---|" * len(NAMES)]
  for name, d in detectors.items():
    cells = []
    for metric in NAMES:
      cell = f"{d[metric]['mean']:.3f} ± {d[metric]['std']:.3f}"
      cells.append(bold(cell, d[metric]["mean"] == best.get(metric)))
    label = bold(name.replace("/", " / "), d["accuracy"]["mean"] == best["accuracy"])
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  lines.append(f"| majority class | {m['majority_accuracy']:.3f} | - | 0 | 0 |")
  return "\n".join(lines)
