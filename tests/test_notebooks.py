"""The Colab notebooks (`notebooks/`) execute end to end at the smoke scale (nbclient, a fresh kernel, in a
temporary directory that links the checkout's main.py, experiments/ and configs/); stored without outputs."""

import json
import os

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(f for f in os.listdir(os.path.join(ROOT, "notebooks")) if f.endswith(".ipynb"))


def test_notebooks_are_stored_without_outputs():
  assert {"quickstart.ipynb", "gamengen.ipynb", "serving.ipynb", "genrm.ipynb", "lrp4rag.ipynb", "retry.ipynb",
          "mamba_distill.ipynb", "wim.ipynb"} <= set(NOTEBOOKS)
  for name in NOTEBOOKS:
    with open(os.path.join(ROOT, "notebooks", name)) as f:
      nb = json.load(f)
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code), name


def _execute(name, tmp_path, monkeypatch):
  for entry in ("main.py", "experiments", "configs"):
    os.symlink(os.path.join(ROOT, entry), tmp_path / entry)
  monkeypatch.setenv("LWJAX_NOTEBOOK_SCALE", "smoke")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
  nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  return nb


def test_quickstart_trains_plots_and_generates(tmp_path, monkeypatch):
  nb = _execute("quickstart.ipynb", tmp_path, monkeypatch)
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert "scale=smoke" in text and (tmp_path / "runs/notebook_lm_smoke/metrics.json").is_file()
  assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
             for c in nb.cells if c.cell_type == "code" for o in c.outputs)  # the loss curve


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in NOTEBOOKS if n != "quickstart.ipynb"])
def test_the_other_notebooks_run(name, tmp_path, monkeypatch):
  nb = _execute(name, tmp_path, monkeypatch)
  assert nb.cells[-1].outputs
