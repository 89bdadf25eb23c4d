"""The iGSM testbed's tables: the retry sweep (Physics of LMs 2.2, arXiv 2408.16293), compute-matched sampling
(arXiv 2408.16737) and GenRM (arXiv 2408.15240), rendered by the projects' report modules from the committed
`metrics.json` files; the two layouts the reports lack (in-distribution accuracy pooled over ops 1-3, and one
seed's finetuning rows with standard errors over problems) are built here from the reports' own helpers."""

from __future__ import annotations

import os
from collections import defaultdict

from lwjax.projects.compute_matched import report as compute_matched
from lwjax.projects.genrm import report as genrm
from lwjax.projects.retry import report as retry
from lwjax.results.markdown import read_json

IN_DISTRIBUTION = ("op1", "op2", "op3")


def _sweep_dirs(paths) -> list[str]:
  """The sweep directories of `<sweep>/<run>/metrics.json` paths, in the order they first appear."""
  return list(dict.fromkeys(os.path.dirname(os.path.dirname(str(p))) for p in paths))


def retry_table(paths) -> str:
  """Every retry run: full-solution accuracy per op and pooled over the training ops (1-3), answer accuracy
  over all ops, the [BACK] rate; the constant-answer baseline last. ± the binomial standard error."""
  (sweep,) = _sweep_dirs(paths)
  runs = retry.load_runs(sweep)
  head = ["run", "setting", "op1", "op2", "op3", "ops 1-3 (in distribution)", "op4", "op5", "answer, all ops",
          "[BACK] rate"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, m in runs.items():
    e = m["eval"]
    n = sum(e[op]["n"] for op in IN_DISTRIBUTION)
    pooled = sum(e[op]["accuracy"] * e[op]["n"] for op in IN_DISTRIBUTION) / n
    cells = ([name, retry._describe(m)] + [retry._pm(e[op]["accuracy"], e[op]["n"]) for op in IN_DISTRIBUTION]
             + [retry._pm(pooled, n)] + [retry._pm(e[op]["accuracy"], e[op]["n"]) for op in ("op4", "op5")]
             + [retry._pm(e["all"]["answer_accuracy"], e["all"]["n"]), f"{e['all']['back_rate']:.3f}"])
    lines.append("| " + " | ".join(cells) + " |")
  e = next(iter(runs.values()))["eval"]
  constant = [retry._pm(e[op]["constant_answer_accuracy"], e[op]["n"]) for op in ("op1", "op2", "op3", "op4", "op5")]
  cells = (["constant", "most frequent answer (answer accuracy)"] + constant[:3] + [""] + constant[3:]
           + [retry._pm(e["all"]["constant_answer_accuracy"], e["all"]["n"]), ""])
  lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _compute_matched_runs(paths) -> list[dict]:
  return compute_matched.ordered(read_json(p) for p in paths)


def compute_matched_quality(paths) -> str:
  return compute_matched.quality_table(_compute_matched_runs(paths))


def compute_matched_finetune(split: str):
  def render(paths) -> str:
    return compute_matched.finetune_table(_compute_matched_runs(paths), split)
  render.__doc__ = f"Every setup's held-out accuracy on the {split} problems, over the seeds."
  return render


def compute_matched_one_seed(paths) -> str:
  """One seed's finetuning, a row per setup and split, ± the standard error over problems (WC - SE paired)."""
  runs = _compute_matched_runs(paths)
  if len({m["seed"] for m in runs}) != 1:
    raise ValueError("compute_matched_one_seed: the files hold more than one seed")
  by_setup = defaultdict(list)
  for m in runs:
    by_setup[m["setup"]].append(m)
  lines = ["| setup | model finetuned | before finetuning | on SE data | on WC data | WC - SE |",
           "|---|---|---|---|---|---|"]
  for split in ("test", "hard"):
    for setup, (m,) in by_setup.items():
      name = compute_matched.SETUP_NAMES[setup].split(" (")[0]
      model = m["finetuned"].upper() if m["finetuned"] in ("wc", "se") else m["finetuned"]
      if m.get("finetuned_from"):
        base, step = m["finetuned_from"]
        model += f" ({os.path.basename(base)} solver at step {step})"
      cells = [compute_matched._pm((m["eval"][k][split]["accuracy"], m["eval"][k][split]["accuracy_se"]))
               for k in ("base", "se_data", "wc_data")]
      cells.append(compute_matched._pm(tuple(m["wc_minus_se"][split])))
      lines.append(f"| {name}, {split} | {model} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def genrm_seeds(split: str, metric: str = "answer"):
  def render(paths) -> str:
    return genrm.seeds_table([genrm.load_runs(d) for d in _sweep_dirs(paths)], split, metric)
  render.__doc__ = f"Best-of-N on the {split} problems ({metric}), mean ± SE over the seeds' sweeps."
  return render
