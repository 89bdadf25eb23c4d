"""run_metrics.load reads every run's metrics.json below a sweep directory, skipping the rest."""

import json

from lwjax import run_metrics


def test_load_reads_each_runs_metrics_by_name(tmp_path):
  for name, value in (("b", 2), ("a", 1)):
    (tmp_path / name).mkdir()
    (tmp_path / name / "metrics.json").write_text(json.dumps({"x": value}))
  (tmp_path / "candidates").mkdir()
  (tmp_path / "notes.txt").write_text("not a run")
  assert list(run_metrics.load(str(tmp_path)).items()) == [("a", {"x": 1}), ("b", {"x": 2})]
