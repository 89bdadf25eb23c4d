"""The Mamba in the Llama's tables (arXiv 2408.15237) from the distillation job's `metrics.json`, one per
initialisation of the Mamba layers: the teacher, each distillation stage and the SFT after, on held-out text."""

from __future__ import annotations

import re

from lwjax.results.markdown import bold, read_json


def _unique_best(shown: dict[str, str], pick) -> str | None:
  """The key whose value, at the digits shown, is the unique best by `pick` (min or max); None on a tie."""
  values = {k: float(v.rstrip("%")) for k, v in shown.items()}
  best = pick(values.values())
  winners = [k for k, v in values.items() if v == best]
  return winners[0] if len(winners) == 1 else None


def _model(stage: str, stages: list[str]) -> str:
  """`stage0_attention0.5` -> `hybrid, stage 1`; `sft` -> `stage N + SFT` after the last of N stages."""
  if stage == "sft":
    return f"stage {len(stages)} + SFT"
  index = int(re.fullmatch(r"stage(\d+)_.*", stage)[1])
  return f"hybrid, stage {index + 1}"


def stages(paths) -> str:
  """A row per stage and initialisation: attention layers kept, held-out loss (nats), next-token accuracy,
  agreement with the teacher's argmax and KL to it. Bold: at each stage, the better initialisation's loss and
  accuracy at the digits shown (none on a tie)."""
  metrics = [read_json(p) for p in paths]
  runs = {m["init"]: m["results"] for m in metrics}
  n_layers = metrics[0]["teacher_step_config"]["model"]["n_layers"]
  first = next(iter(runs.values()))
  teacher = first["teacher"]
  lines = ["| model | attention layers | init | held-out loss | accuracy | agreement with teacher | KL to teacher |",
           "|---|---|---|---|---|---|---|"]
  keys = [k for k in first if k != "teacher"]
  lines.append(f"| teacher GPT | {n_layers} of {n_layers} | - | {teacher['loss']:.3f} "
               f"| {100 * teacher['accuracy']:.1f}% | {100 * teacher['teacher_agreement']:.0f}% "
               f"| {teacher['kl_to_teacher']:.0f} |")
  for key in keys:
    losses = {init: f"{r[key]['loss']:.3f}" for init, r in runs.items()}
    accuracies = {init: f"{100 * r[key]['accuracy']:.1f}%" for init, r in runs.items()}
    best_loss = _unique_best(losses, min)
    best_acc = _unique_best(accuracies, max)
    for init, results in runs.items():
      r = results[key]
      kept = n_layers - len(r["mamba_layers"])
      loss, accuracy = bold(losses[init], init == best_loss), bold(accuracies[init], init == best_acc)
      lines.append(f"| {_model(key, [k for k in keys if k != 'sft'])} | {kept} of {n_layers} | {init} | {loss} "
                   f"| {accuracy} | {100 * r['teacher_agreement']:.1f}% | {r['kl_to_teacher']:.3f} |")
  return "\n".join(lines)
