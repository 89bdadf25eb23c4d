"""docs/RESULTS.md's marked tables against their recomputation from results/, and the markers' parsing."""

import os
import shutil
import subprocess

import pytest

from lwjax import results
from lwjax.results import __main__ as cli, markers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "RESULTS.md")


def test_results_doc_tables_match_their_committed_data():
  with open(DOC) as f:
    problems = results.drift(f.read())
  assert not problems, ("docs/RESULTS.md drifted from results/ (`python -m lwjax.results --write docs/RESULTS.md` "
                        "rewrites it):\n" + "\n".join(problems))


def test_every_table_reads_only_committed_files():
  if not os.path.isdir(os.path.join(ROOT, ".git")) or shutil.which("git") is None:
    pytest.skip("not a git checkout")
  paths = sorted({os.path.relpath(p, ROOT) for table in results.TABLES.values() for p in table.paths()})
  tracked = subprocess.run(["git", "ls-files", "--", *paths], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
  assert sorted(tracked) == paths


DOC_TEXT = """# Notes

Prose before.

<!-- results:alpha -->
| a | b |
|---|---|
| 1 | 2 |
<!-- /results:alpha -->

Prose between, with a stray `<!-- results:x -->` mid-line that is not a marker.

<!-- results:beta -->
old beta
<!-- /results:beta -->
Prose after.
"""


def test_markers_read_and_rewrite_only_the_named_blocks(tmp_path):
  path = tmp_path / "doc.md"
  path.write_text(DOC_TEXT)
  text = path.read_text()
  assert markers.blocks(text) == {"alpha": "| a | b |\n|---|---|\n| 1 | 2 |", "beta": "old beta"}
  path.write_text(markers.rewrite(text, {"beta": "| new |\n|---|", "gamma": "not in the document"}))
  rewritten = path.read_text()
  assert markers.blocks(rewritten) == {"alpha": "| a | b |\n|---|---|\n| 1 | 2 |", "beta": "| new |\n|---|"}
  assert rewritten == DOC_TEXT.replace("old beta", "| new |\n|---|")
  assert markers.rewrite(rewritten, markers.blocks(rewritten)) == rewritten
  assert markers.blocks(markers.rewrite(DOC_TEXT, {"alpha": ""}))["alpha"] == ""


def test_drift_names_differing_missing_and_unknown_tables():
  problems = results.drift(DOC_TEXT, {"alpha": "| a | b |\n|---|---|\n| 1 | 3 |", "delta": "| d |"})
  assert [p.split(":")[0] for p in problems] == ["beta", "alpha", "delta"]
  assert "-| 1 | 2 |\n+| 1 | 3 |" in problems[1]
  assert results.drift(DOC_TEXT, {"alpha": "| a | b |\n|---|---|\n| 1 | 2 |", "beta": "old beta"}) == []


@pytest.mark.parametrize("text, message", [
    ("<!-- results:a -->\nx\n", "line 1: results:a is never closed"),
    ("x\n<!-- /results:a -->\n", "line 2: /results:a closes nothing"),
    ("<!-- results:a -->\n<!-- /results:b -->\n", "line 2: /results:b closes results:a (line 1)"),
    ("<!-- results:a -->\n<!-- results:b -->\n", "line 2: results:b opens inside results:a (line 1)"),
    ("<!-- results:a -->\n<!-- /results:a -->\n<!-- results:a -->\n<!-- /results:a -->\n",
     "line 3: results:a appears twice"),
    ("<!-- results: a -->\n", "line 1: malformed marker"),
])
def test_markers_reject_unpaired_nested_repeated_and_malformed(text, message):
  with pytest.raises(markers.MarkerError, match=message.replace("(", r"\(").replace(")", r"\)")):
    markers.blocks(text)


def test_cli_check_fails_on_a_changed_number_and_write_restores_the_doc(tmp_path, capsys):
  copy = tmp_path / "RESULTS.md"
  shutil.copy(DOC, copy)
  original = copy.read_text()
  body = markers.blocks(original)["gamengen_cpu_long"]
  copy.write_text(original.replace(body, body.replace("23.01", "23.02")))
  assert cli.main(["--check", str(copy)]) == 1
  err = capsys.readouterr().err
  assert err.startswith("gamengen_cpu_long: differs from its data") and "+| copy the last context frame" in err
  assert cli.main(["--write", str(copy)]) == 0
  assert copy.read_text() == original
  assert cli.main(["--check", str(copy)]) == 0
