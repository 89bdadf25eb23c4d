"""The compute-matched sweep as two tables and one chart (Smaller, Weaker, Yet Better, arXiv 2408.16737, Fig. 3
and Tables 1-3 style): the data quality of both sources at every budget, and every finetuning setup's held-out
accuracy on WC vs SE data next to the untouched model's, over the runs under a directory
(`<dir>/<setup>_s<seed>/metrics.json`). With one seed the ± is the standard error over problems; with more,
over seeds.

  python -m lwjax.projects.compute_matched.report runs/compute_matched_cpu --png docs/img/compute_matched_coverage.png
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np

from lwjax import plots, run_metrics

SETUP_ORDER = ("self", "w2s", "kd")
SETUP_NAMES = {"self": "self-improvement (WC finetuned)", "w2s": "weak-to-strong (SE finetuned)",
               "kd": "distillation (student finetuned)"}


def load_runs(sweep_dir: str) -> list[dict]:
  runs = ordered(run_metrics.load(sweep_dir).values())
  if not runs:
    raise ValueError(f"no <run>/metrics.json under {sweep_dir}: run experiments/compute_matched.py first")
  return runs


def ordered(metrics) -> list[dict]:
  """The setups' metrics (other runs' dropped) by setup, then seed: the order every table reads them in."""
  runs = [m for m in metrics if m.get("setup") in SETUP_ORDER]
  return sorted(runs, key=lambda m: (SETUP_ORDER.index(m["setup"]), m["seed"]))


def _mean_se(values: list[float]) -> tuple[float, float]:
  values = [v for v in values if v == v]  # nan: nothing measured
  if not values:
    return float("nan"), float("nan")
  return float(np.mean(values)), float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0


def _pm(mean_se: tuple[float, float], scale: float = 100.0, digits: int = 1) -> str:
  mean, se = mean_se
  if mean != mean:
    return "-"
  return f"{scale * mean:.{digits}f} ± {scale * se:.{digits}f}" if se else f"{scale * mean:.{digits}f}"


def quality_table(runs: list[dict]) -> str:
  """Coverage, diversity and false-positive rate of both sources at every budget (each seed counted once); with
  an LLM judge, its false-positive rate beside (± its binomial standard error for one seed, over seeds for more)."""
  by_seed = {m["seed"]: m for m in runs}
  seeds = sorted(by_seed)
  judged = [s for s in seeds if by_seed[s].get("judge_by_budget")]
  header = ["budget (SE / WC samples per problem)", "coverage SE", "coverage WC", "diversity SE", "diversity WC",
            "FPR SE", "FPR WC", *(["judged FPR SE (n)", "judged FPR WC (n)"] if judged else [])]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for i, row in enumerate(by_seed[seeds[0]]["quality"]):
    cells = []
    for field, scale, digits in (("coverage", 100, 1), ("diversity", 1, 2), ("false_positive_rate", 100, 1)):
      for src in ("se", "wc"):
        cells.append(_pm(_mean_se([by_seed[s]["quality"][i][src][field] for s in seeds]), scale, digits))
    for src in ("se", "wc") if judged else ():
      results = [by_seed[s]["judge_by_budget"][i][src] for s in judged]
      mean_se = ((results[0]["false_positive_rate"], results[0]["false_positive_rate_se"]) if len(results) == 1
                 else _mean_se([r["false_positive_rate"] for r in results]))
      cells.append(f"{_pm(mean_se)} ({sum(r['n'] for r in results)})")
    lines.append(f"| {row['budget']['se']} / {row['budget']['wc']} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def finetune_table(runs: list[dict], split: str = "test") -> str:
  """Held-out accuracy (%) of every setup: the model before finetuning, on WC data, on SE data, WC - SE."""
  grouped = defaultdict(list)
  for m in runs:
    grouped[m["setup"]].append(m)
  lines = ["| setup | seeds | before finetuning | on SE data | on WC data | WC - SE |", "|---|---|---|---|---|---|"]
  for setup in SETUP_ORDER:
    ms = grouped.get(setup)
    if not ms:
      continue
    cells = []
    for name in ("base", "se_data", "wc_data"):
      evals = [m["eval"][name][split] for m in ms if m["eval"].get(name) and split in m["eval"][name]]
      if len(evals) == 1:
        cells.append(_pm((evals[0]["accuracy"], evals[0]["accuracy_se"])))
      else:
        cells.append(_pm(_mean_se([e["accuracy"] for e in evals])))
    diffs = [m["wc_minus_se"][split] for m in ms if split in m.get("wc_minus_se", {})]
    cells.append("-" if not diffs else _pm(tuple(diffs[0])) if len(diffs) == 1 else
                 _pm(_mean_se([d[0] for d in diffs])))
    lines.append(f"| {SETUP_NAMES[setup]} | {len(ms)} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_coverage(path: str, runs: list[dict]) -> None:
  """Coverage of both sources against the budget (log 2), mean ± standard error over seeds; with one seed, ± the
  binomial standard error over its problems."""
  by_seed = {m["seed"]: m for m in runs}
  first = next(iter(by_seed.values()))
  series = {}
  for src, name in (("wc", "WC (weak, cheap)"), ("se", "SE (strong, costly)")):
    points = []
    for i, row in enumerate(first["quality"]):
      mean, se = _mean_se([m["quality"][i][src]["coverage"] for m in by_seed.values()])
      if len(by_seed) == 1:
        se = float(np.sqrt(mean * (1 - mean) / first["sampling"][src]["num_problems"]))
      points.append((row["budget"]["se"], mean, se))
    series[name] = points
  over = f"{len(by_seed)} seeds" if len(by_seed) > 1 else f"{first['sampling']['wc']['num_problems']} problems"
  plots.line_chart(path, series, title="coverage of the training problems at matched sampling FLOPs",
                   x_label="budget (SE samples per problem; WC draws the cost ratio times more)",
                   y_label="coverage (>= 1 right answer)", y_range=(0.0, 1.0), log_x=2,
                   error_note=f"shaded: ±1 standard error over {over}")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("sweep_dir")
  parser.add_argument("--png", default="", help="write the coverage-vs-budget chart here")
  args = parser.parse_args(argv)
  runs = load_runs(args.sweep_dir)
  print(f"cost ratio SE/WC {runs[0]['cost_ratio']:.2f} (forward FLOPs per token at {runs[0]['context']} tokens)\n")
  print(quality_table(runs) + "\n")
  for split in ("test", "hard"):
    print(f"held-out accuracy, {split} problems (%):\n" + finetune_table(runs, split) + "\n")
  if args.png:
    plot_coverage(args.png, runs)
    print(f"wrote {args.png}")


if __name__ == "__main__":
  main()
