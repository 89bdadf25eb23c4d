"""The GenRM sweep as one table and one chart per split (arXiv 2408.15240, Fig. 1/4 style): Best-of-N final-answer
accuracy of every verifier run under a directory (`<dir>/<run>/metrics.json`), with the baselines measured on
the same candidates (self-consistency, pass@N, first sample), standard errors over problems, and the
verifiers' AUC. Given several sweep directories (the same sweep at several seeds), one table over the seeds:
mean ± standard error over the seeds of each verifier's and baseline's accuracy, and GenRM-CoT's accuracy
against the number of rationales K.

  python -m lwjax.projects.genrm.report runs/genrm_cpu/igsm --png runs/genrm_cpu/igsm/bestofn.png
  python -m lwjax.projects.genrm.report runs/genrm_cpu/igsm runs/genrm_cpu/igsm_s1 --png docs/img/genrm_igsm.png
"""

from __future__ import annotations

import argparse

import numpy as np

from lwjax import plots, run_metrics

ORDER = ("judge", "disc", "direct", "cot", "unified")


def load_runs(sweep_dir: str) -> dict[str, dict]:
  """{run name: metrics} of every `<sweep_dir>/<run>/metrics.json`, in verifier order, then by name."""
  # Verifier runs only (not, e.g., the solver's own metrics beside them).
  runs = {name: m for name, m in run_metrics.load(sweep_dir).items() if m.get("kind") in ORDER}
  if not runs:
    raise ValueError(f"no <run>/metrics.json under {sweep_dir}: run experiments/genrm.py first")
  return dict(sorted(runs.items(), key=lambda kv: (ORDER.index(kv[1]["kind"]), kv[0])))


def _auc(value) -> str:
  """AUC, or `n/a` where it is undefined (every candidate of the split right, or every one wrong)."""
  return "n/a" if value is None or np.isnan(value) else f"{value:.3f}"


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
                 + f" | {_auc(m[split]['auc'])} | {m[split]['verifier_accuracy']:.3f} |")
  for label, key in (("self-consistency", "majority"), ("pass@N (oracle)", "pass")):
    lines.append(f"| {label} | " + " | ".join(map(_pm, first[metric][key])) + " | | |")
  lines.append("| first sample | " + " | ".join([_pm(first[metric]["first"])] * len(ns)) + " | | |")
  return "\n".join(lines)


def chart(runs: dict[str, dict], split: str, path: str) -> None:
  """Best-of-N accuracy against N (log 2) of every run and the baselines, ±1 standard error over problems."""
  first = next(iter(runs.values()))[split]
  ns = first["n"]
  series = {f"{name}": [(n, *v) for n, v in zip(ns, m[split]["answer"]["verifier"], strict=False)]
            for name, m in runs.items()}
  series["self-consistency"] = [(n, *v) for n, v in zip(ns, first["answer"]["majority"], strict=True)]
  series["pass@N (oracle)"] = [(n, *v) for n, v in zip(ns, first["answer"]["pass"], strict=True)]
  plots.line_chart(path, series, title=f"Best-of-N on {split} problems", x_label="N candidates",
                   y_label="final answer accuracy", log_x=2,
                   dashed=("self-consistency", "pass@N (oracle)"),
                   error_note="shaded: ±1 standard error over problems")


def by_kind(sweeps: list[dict[str, dict]]) -> dict[str, list[dict]]:
  """{verifier kind: [its metrics in each sweep]} for the kinds every sweep ran (one run per kind and sweep)."""
  kinds = [k for k in ORDER if all(sum(m["kind"] == k for m in runs.values()) == 1 for runs in sweeps)]
  return {k: [next(m for m in runs.values() if m["kind"] == k) for runs in sweeps] for k in kinds}


def _mean_se(values) -> tuple[float, float]:
  """(mean, standard error) of one number per seed."""
  v = np.asarray(values, float)
  return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def _over_seeds(values) -> str:
  """`mean ± SE` (percent) of one number per seed."""
  mean, se = _mean_se(100 * np.asarray(values, float))
  return f"{mean:.1f} ± {se:.1f}"


def seeds_table(sweeps: list[dict[str, dict]], split: str, metric: str = "answer") -> str:
  """Markdown over several seeds of one sweep: each cell the mean ± SE over seeds of the accuracy (each seed's
  accuracy a mean over its problems); baselines averaged over every run of every seed (they score the same
  candidates, with each run's own draws)."""
  kinds = by_kind(sweeps)
  if not kinds:
    raise ValueError("seeds_table: no verifier kind was run in every sweep")
  ns = next(iter(kinds.values()))[0][split]["n"]
  lines = [f"| selection ({len(sweeps)} seeds) | " + " | ".join(f"N={n}" for n in ns) + " | AUC |",
           "|---|" + "---|" * (len(ns) + 1)]
  for kind, runs in kinds.items():
    cells = [_over_seeds([m[split][metric]["verifier"][i][0] for m in runs]) for i in range(len(ns))]
    auc = np.asarray([m[split]["auc"] for m in runs], float)
    lines.append(f"| {kind} | " + " | ".join(cells) + f" | {_auc(auc.mean())} |")
  for label, key in (("self-consistency", "majority"), ("pass@N (oracle)", "pass")):
    per_seed = [[np.mean([m[split][metric][key][i][0] for m in runs_of_seed]) for runs_of_seed in
                 zip(*kinds.values(), strict=True)] for i in range(len(ns))]
    lines.append(f"| {label} | " + " | ".join(_over_seeds(v) for v in per_seed) + " | |")
  first = _over_seeds([np.mean([m[split][metric]["first"][0] for m in runs_of_seed])
                       for runs_of_seed in zip(*kinds.values(), strict=True)])
  lines.append("| first sample | " + " | ".join([first] * len(ns)) + " | |")
  return "\n".join(lines)


def cot_k_table(sweeps: list[dict[str, dict]], split: str) -> str:
  """GenRM-CoT's Best-of-N (the largest N) against the number of rationales K averaged, mean ± SE over seeds."""
  runs = by_kind(sweeps).get("cot", [])
  if not runs or "cot_k" not in runs[0][split]:
    return ""
  ks = sorted(runs[0][split]["cot_k"], key=int)
  return "\n".join(["| K rationales | " + " | ".join(ks) + " |", "|---|" + "---|" * len(ks),
                    f"| Best-of-{runs[0][split]['n'][-1]} | "
                    + " | ".join(_over_seeds([m[split]["cot_k"][k][0] for m in runs]) for k in ks) + " |"])


def seeds_chart(sweeps: list[dict[str, dict]], split: str, path: str) -> None:
  """`seeds_table`'s accuracy against N (log 2): each verifier kind and baseline, mean ± standard error over
  seeds (a baseline's per-seed value the mean over that seed's runs)."""
  kinds = by_kind(sweeps)
  ns = next(iter(kinds.values()))[0][split]["n"]
  series = {kind: [(n, *_mean_se([m[split]["answer"]["verifier"][i][0] for m in runs])) for i, n in enumerate(ns)]
            for kind, runs in kinds.items()}
  seeds = list(zip(*kinds.values(), strict=True))
  for label, key in (("self-consistency", "majority"), ("pass@N (oracle)", "pass")):
    series[label] = [(n, *_mean_se([np.mean([m[split]["answer"][key][i][0] for m in runs_of_seed])
                                    for runs_of_seed in seeds])) for i, n in enumerate(ns)]
  plots.line_chart(path, series, title=f"Best-of-N on {split} problems, mean of {len(sweeps)} seeds",
                   x_label="N candidates", y_label="final answer accuracy", log_x=2,
                   dashed=("self-consistency", "pass@N (oracle)"),
                   error_note=f"shaded: ±1 standard error over {len(sweeps)} seeds")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("sweep_dirs", nargs="+", help="one sweep, or the same sweep at several seeds")
  parser.add_argument("--png", default="", help="chart path; `_<split>` is added before .png")
  args = parser.parse_args(argv)
  if len(args.sweep_dirs) > 1:
    sweeps = [load_runs(d) for d in args.sweep_dirs]
    for split in ("test", "hard"):
      print(f"\n{split} problems, final answer accuracy (%), mean ± SE over seeds:\n{seeds_table(sweeps, split)}")
      print(f"\n{split} problems, whole solution correct (%):\n{seeds_table(sweeps, split, 'full')}")
      cot = cot_k_table(sweeps, split)
      if cot:
        print(f"\n{split} problems, GenRM-CoT against K (%):\n{cot}")
      if args.png:
        seeds_chart(sweeps, split, args.png.replace(".png", f"_{split}.png"))
    return
  runs = load_runs(args.sweep_dirs[0])
  for split in ("test", "hard"):
    print(f"\n{split} problems, final answer accuracy (%):\n{table(runs, split)}")
    print(f"\n{split} problems, whole solution correct (%):\n{table(runs, split, 'full')}")
    if args.png:
      chart(runs, split, args.png.replace(".png", f"_{split}.png"))


if __name__ == "__main__":
  main()
