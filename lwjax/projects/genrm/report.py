"""The GenRM sweep as one table and one chart per split (arXiv 2408.15240, Fig. 1/4 style): Best-of-N final-answer
accuracy of every verifier run under a directory (`<dir>/<run>/metrics.json`), with the baselines measured on
the same candidates (self-consistency, pass@N, first sample), standard errors over problems, and the
verifiers' AUC.

  python -m lwjax.projects.genrm.report runs/genrm_cpu/igsm --png runs/genrm_cpu/igsm/bestofn.png
"""

from __future__ import annotations

import argparse

from lwjax import plots, run_metrics

ORDER = ("judge", "disc", "direct", "cot", "unified")


def load_runs(sweep_dir: str) -> dict[str, dict]:
  """{run name: metrics} of every `<sweep_dir>/<run>/metrics.json`, in verifier order, then by name."""
  # Verifier runs only (not, e.g., the solver's own metrics beside them).
  runs = {name: m for name, m in run_metrics.load(sweep_dir).items() if m.get("kind") in ORDER}
  if not runs:
    raise ValueError(f"no <run>/metrics.json under {sweep_dir}: run experiments/genrm.py first")
  return dict(sorted(runs.items(), key=lambda kv: (ORDER.index(kv[1]["kind"]), kv[0])))


def _pm(mean_se) -> str:
  return f"{100 * mean_se[0]:.1f} ± {100 * mean_se[1]:.1f}"


def table(runs: dict[str, dict], split: str, metric: str = "answer") -> str:
  """Markdown: one row per verifier run and one per baseline (from the first run: every run of a sweep scores
  the same candidates), a column per N."""
  first = next(iter(runs.values()))[split]
  ns = first["n"]
  lines = ["| selection | " + " | ".join(f"N={n}" for n in ns) + " | AUC | verifier acc. |",
           "|---|" + "---|" * (len(ns) + 2)]
  for name, m in runs.items():
    lines.append(f"| {name} ({m['kind']}) | " + " | ".join(map(_pm, m[split][metric]["verifier"]))
                 + f" | {m[split]['auc']:.3f} | {m[split]['verifier_accuracy']:.3f} |")
  for label, key in (("self-consistency", "majority"), ("pass@N (oracle)", "pass")):
    lines.append(f"| {label} | " + " | ".join(map(_pm, first[metric][key])) + " | | |")
  lines.append("| first sample | " + " | ".join([_pm(first[metric]["first"])] * len(ns)) + " | | |")
  return "\n".join(lines)


def chart(runs: dict[str, dict], split: str, path: str) -> None:
  first = next(iter(runs.values()))[split]
  ns = first["n"]
  series = {f"{name}": [(n, v[0]) for n, v in zip(ns, m[split]["answer"]["verifier"], strict=False)]
            for name, m in runs.items()}
  series["self-consistency"] = [(n, v[0]) for n, v in zip(ns, first["answer"]["majority"], strict=True)]
  series["pass@N"] = [(n, v[0]) for n, v in zip(ns, first["answer"]["pass"], strict=True)]
  plots.line_chart(path, series, title=f"Best-of-N on {split} problems", x_label="N candidates",
                   y_label="final answer accuracy", y_range=(0.0, 1.0))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("sweep_dir")
  parser.add_argument("--png", default="", help="chart path; `_<split>` is added before .png")
  args = parser.parse_args(argv)
  runs = load_runs(args.sweep_dir)
  for split in ("test", "hard"):
    print(f"\n{split} problems, final answer accuracy (%):\n{table(runs, split)}")
    print(f"\n{split} problems, whole solution correct (%):\n{table(runs, split, 'full')}")
    if args.png:
      chart(runs, split, args.png.replace(".png", f"_{split}.png"))


if __name__ == "__main__":
  main()
