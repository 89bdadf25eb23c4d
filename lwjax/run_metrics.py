"""The `metrics.json` that each run of a sweep writes into its workdir, read back for the sweep's report."""

from __future__ import annotations

import json
import os


def load(sweep_dir: str) -> dict[str, dict]:
  """{run name: metrics} for every `<sweep_dir>/<run>/metrics.json`, by run name."""
  runs = {}
  for name in sorted(os.listdir(sweep_dir)):
    path = os.path.join(sweep_dir, name, "metrics.json")
    if os.path.isfile(path):
      with open(path) as f:
        runs[name] = json.load(f)
  return runs
