"""The retry sweep as one table: each run's `metrics.json` (written by `job.run`) per held-out op, with the
binomial standard error of every accuracy (Physics of LMs 2.2, arXiv 2408.16293, Results 2-8 tables).

  python -m lwjax.projects.retry.report runs/igsm_retry_cpu          # Markdown table on stdout
  python -m lwjax.projects.retry.report runs/igsm_solver_cpu --png runs/igsm_solver_cpu/curve.png

`--png` also draws each run's accuracy curve (`curve.jsonl`, written at every evaluation when the config sets
`eval.curve_ops`): greedy full-solution accuracy on the curve's held-out problems against the step, a panel per
op (and one over all of them).
"""

from __future__ import annotations

import argparse
import json
import math
import os

from lwjax import run_metrics

_ORDER = ("none", "lora", "full")


def load_runs(sweep_dir: str) -> dict[str, dict]:
  """{run name: metrics} for every `<sweep_dir>/<run>/metrics.json`, pretraining runs by retry rate first."""
  runs = run_metrics.load(sweep_dir)
  return dict(sorted(runs.items(), key=lambda kv: (_ORDER.index(kv[1]["finetune"]), kv[1]["retry_weak"],
                                                   kv[1]["mask_retries"], kv[1]["retry_rate"], kv[0])))


def _describe(m: dict) -> str:
  if m["finetune"] != "none":
    return f"{m['finetune']} finetune of r=0 on r={m['retry_rate']:g} data"
  extra = ", retry_weak" if m["retry_weak"] else ", wrong steps masked" if m["mask_retries"] else ""
  return f"pretrain r={m['retry_rate']:g}{extra}"


def _binomial_se(p: float, n: int) -> float:
  return math.sqrt(max(p * (1 - p), 0.0) / n)


def _pm(p: float, n: int) -> str:
  return f"{100 * p:.1f} ± {100 * _binomial_se(p, n):.1f}"


def table(runs: dict[str, dict]) -> str:
  """Markdown: per run, full-solution accuracy (checker) per op and over all, answer accuracy, the correct
  prefix (share of the shortest solution written right before the first error), [BACK] rate, solution
  length vs shortest, eval loss; the constant-answer baseline of the same problems last."""
  if not runs:
    raise ValueError("no <run>/metrics.json found: run the sweep first (experiments/igsm_retry.py)")
  ops = [k for k in next(iter(runs.values()))["eval"] if k != "all"]
  head = (["run", "setting", "steps"] + [f"{op} acc %" for op in ops]
          + ["all acc %", "all answer %", "all correct prefix %", "[BACK] rate", "length/shortest", "eval loss"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, m in runs.items():
    e = m["eval"]
    cells = [name, _describe(m), str(m["steps"])] + [_pm(e[op]["accuracy"], e[op]["n"]) for op in ops]
    cells += [_pm(e["all"]["accuracy"], e["all"]["n"]), _pm(e["all"]["answer_accuracy"], e["all"]["n"]),
              f"{100 * e['all']['correct_prefix']:.1f}", f"{e['all']['back_rate']:.3f}",
              f"{e['all']['length_vs_shortest']:.3f}", f"{m['eval_loss']:.4f}"]
    lines.append("| " + " | ".join(cells) + " |")
  e = next(iter(runs.values()))["eval"]
  cells = (["constant", "most frequent answer of the op's problems (answer accuracy)", "-"]
           + [_pm(e[op]["constant_answer_accuracy"], e[op]["n"]) for op in ops]
           + ["-", _pm(e["all"]["constant_answer_accuracy"], e["all"]["n"]), "-", "-", "-", "-"])
  lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def load_curves(sweep_dir: str) -> dict[str, list[dict]]:
  """{run name: [{"step", "time", "eval"}, ...]} for every `<sweep_dir>/<run>/curve.jsonl`."""
  curves = {}
  for name in sorted(os.listdir(sweep_dir)):
    path = os.path.join(sweep_dir, name, "curve.jsonl")
    if os.path.isfile(path):
      with open(path) as f:
        points = {}
        for line in f:  # a resumed run may repeat a step: the last one counts
          point = json.loads(line)
          points[point["step"]] = point
      curves[name] = [points[step] for step in sorted(points)]
  return curves


def curve_png(sweep_dir: str, path: str) -> None:
  from lwjax import plots
  curves = load_curves(sweep_dir)
  if not curves:
    raise ValueError(f"no <run>/curve.jsonl under {sweep_dir}: set eval.curve_ops in the config")
  keys = list(dict.fromkeys(key for points in curves.values() for key in points[-1]["eval"]))
  panels = {key: {name: [(p["step"], 100 * p["eval"][key]["accuracy"],
                          100 * _binomial_se(p["eval"][key]["accuracy"], p["eval"][key]["n"]))
                         for p in points if key in p["eval"]] for name, points in curves.items()}
            for key in keys}
  plots.panels_chart(path, panels, title=f"greedy full-solution accuracy on held-out problems ({sweep_dir})",
                     x_label="training step", y_label="accuracy %", y_range=(0.0, 100.0), figsize=(4.0, 3.6),
                     error_note="shaded: ±1 binomial standard error over the curve's problems")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description="The retry sweep's metrics as one Markdown table.")
  parser.add_argument("sweep_dir", help="e.g. runs/igsm_retry_cpu: one <run>/metrics.json per run")
  parser.add_argument("--png", default="", help="also write the runs' accuracy curves to this PNG")
  args = parser.parse_args(argv)
  if args.png:
    curve_png(args.sweep_dir, args.png)
  print(table(load_runs(args.sweep_dir)))


if __name__ == "__main__":
  main()
