"""The results tables of docs/RESULTS.md, recomputed from the data committed under results/.

Each table is registered by name with the files it reads (glob patterns under results/) and the function
that renders them as Markdown (the projects' report functions where they have one). In the document each
sits between `<!-- results:NAME -->` and `<!-- /results:NAME -->`, so a table cannot drift from its data:

  python -m lwjax.results                            # every table, as recomputed
  python -m lwjax.results --check docs/RESULTS.md    # exit 1 naming each table that differs, with a diff
  python -m lwjax.results --write docs/RESULTS.md    # rewrite the marked tables in place
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import glob
import os
from collections.abc import Callable

from lwjax.results import gamengen, lrp4rag, mamba_distill, markers, reasoning, wim

RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "results")


@dataclasses.dataclass(frozen=True)
class Table:
  files: tuple[str, ...]  # glob patterns under results/, each matching at least one committed file
  render: Callable[[list[str]], str]  # the matched paths, in pattern order (each pattern's sorted) -> Markdown

  def paths(self, results_dir: str = RESULTS_DIR) -> list[str]:
    paths = []
    for pattern in self.files:
      matched = sorted(glob.glob(os.path.join(results_dir, pattern)))
      if not matched:
        raise FileNotFoundError(f"no file under {results_dir} matches {pattern}")
      paths += matched
    return paths


_GAMENGEN_ABLATIONS = "gamengen_cpu_ablations_2026-12-07/"
_WIM_PROBES = {"aggregation_sorted.log": "alphabetical (the task's)",
               "aggregation_first.log": "order of first appearance"}
_COPY_PROBES = {
    "mqar_nomix.log": "MQAR layout `k17 v42 .`, `? get k17` -> `v42`, no copy rows (control, same day)",
    "mqar_mixcopy.log": "the same + copy rows (half the training rows)",
    "mqar_filler_mixcopy.log": "the same, the 4 facts inside a 48-word filler segment + copy rows (run with the old "
                               "task layout, `=` dropped)",
    "taskfacts_filler_mixcopy.log": "the tasks' new layout in filler, `v42 k17 .`, `? get v42` -> `k17`, + copy rows "
                                    "(600-step schedule)",
    "valuefirst_mixcopy.log": "`k17 = v42 .` asked value-first, `? get v42 ans` -> `k17`, + copy rows",
}

_DEMO_HELD_OUT = {"gamengen_demo_eval_1ep/metrics.json": "the demo's own held-out episode",
                  "gamengen_demo_eval_4ep/metrics.json": "4 fresh episodes (seed 7)",
                  "gamengen_demo_eval_16ep/metrics.json": "16 fresh episodes (seed 11)"}

TABLES: dict[str, Table] = {
    "gamengen_demo": Table((_GAMENGEN_ABLATIONS + "demo_eval_metrics.json",), gamengen.teacher_forced),
    "gamengen_cpu_long": Table(("gamengen_cpu_long/eval_metrics.json",), gamengen.teacher_forced),
    "gamengen_cpu_long_agent": Table(("gamengen_cpu_long_agent/eval_metrics.json",), gamengen.teacher_forced),
    "gamengen_noise_augmentation": Table(
        (_GAMENGEN_ABLATIONS + "demo_eval_metrics.json", _GAMENGEN_ABLATIONS + "noise_aug_off_eval_metrics.json"),
        gamengen.noise_augmentation),
    "gamengen_context_length": Table(
        (_GAMENGEN_ABLATIONS + "context1_eval_metrics.json", _GAMENGEN_ABLATIONS + "demo_eval_metrics.json"),
        gamengen.context_length),
    "gamengen_demo_interval": Table(tuple(_DEMO_HELD_OUT), gamengen.paired_interval(_DEMO_HELD_OUT)),
    "retry_cpu": Table(("igsm_retry_cpu/*/metrics.json",), reasoning.retry_table),
    "mamba_distill_cpu_short": Table(("mamba_distill_cpu_short/attention/metrics.json",
                                      "mamba_distill_cpu_short/random/metrics.json"), mamba_distill.stages),
    "mamba_distill_cpu50": Table(("mamba_distill_cpu50/attention/metrics.json",
                                  "mamba_distill_cpu50/random/metrics.json"), mamba_distill.stages),
    "compute_matched_quality": Table(("compute_matched_cpu/*_metrics.json",), reasoning.compute_matched_quality),
    "compute_matched_test": Table(("compute_matched_cpu/*_metrics.json",), reasoning.compute_matched_finetune("test")),
    "compute_matched_hard": Table(("compute_matched_cpu/*_metrics.json",), reasoning.compute_matched_finetune("hard")),
    "compute_matched_seed0": Table(("compute_matched_cpu/*_s0_metrics.json",), reasoning.compute_matched_one_seed),
    "wim_cpu_20k": Table(("wim_cpu_20k/metrics.json",), functools.partial(wim.by_length, trained_up_to=8)),
    "wim_cpu_long": Table(("wim_cpu_long/metrics.json",),
                          functools.partial(wim.by_task, trained_up_to=8, lengths=(8, 16, 32))),
    "wim_cpu_4k": Table(("wim_cpu_4k/metrics.json",), functools.partial(wim.by_length, trained_up_to=8, margins_at=16)),
    "wim_cpu": Table(("wim_cpu/eval.log", "wim_cpu/metrics_multihop8.json", "wim_cpu/metrics_aggregation.json"),
                     functools.partial(wim.by_task, trained_up_to=8)),
    "wim_copy_rows_probe": Table(tuple(f"wim_probes/{name}" for name in _COPY_PROBES),
                                 wim.probe_curves("probe (GPT 4 x 128)", _COPY_PROBES, floor=True)),
    "wim_aggregation_probe": Table(tuple(f"wim_probes/{name}" for name in _WIM_PROBES),
                                   wim.probe_curves("answer order", _WIM_PROBES)),
    "genrm_igsm_test": Table(("genrm_cpu/igsm/*/metrics.json", "genrm_cpu/igsm_s1/*/metrics.json"),
                             reasoning.genrm_seeds("test")),
    "lrp4rag_groups": Table(("lrp4rag_cpu/metrics.json",), lrp4rag.groups),
    "lrp4rag_detectors": Table(("lrp4rag_cpu/metrics.json",), lrp4rag.detectors),
}


def render(name: str, results_dir: str = RESULTS_DIR) -> str:
  """The Markdown table `name`, recomputed from its files."""
  table = TABLES[name]
  return table.render(table.paths(results_dir))


def drift(doc_text: str, tables: dict[str, str] | None = None) -> list[str]:
  """One message per table of `tables` ({name: recomputed Markdown}) that the document lacks or holds
  differently (with a unified diff, document first), and per marked block that names no registered table.
  Without `tables`, every registered table recomputed."""
  tables = {name: render(name) for name in TABLES} if tables is None else tables
  found = markers.blocks(doc_text)
  messages = [f"{name}: marked in the document but not a registered table" for name in found if name not in tables]
  for name, table in tables.items():
    if name not in found:
      messages.append(f"{name}: no <!-- results:{name} --> ... <!-- /results:{name} --> block in the document")
    elif found[name].strip("\n") != table:
      diff = difflib.unified_diff(found[name].strip("\n").split("\n"), table.split("\n"), "document", "data",
                                  n=0, lineterm="")
      messages.append(f"{name}: differs from its data ({', '.join(TABLES[name].files) if name in TABLES else ''})\n"
                      + "\n".join(list(diff)[2:]))
  return messages
