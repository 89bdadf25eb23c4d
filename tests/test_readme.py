"""README's quick commands copy-paste and work from a fresh checkout (blocks marked `<!-- readme-test: quick -->`).

Each marked block runs as one bash script in a scratch directory that holds the repository's entry points
(main.py, experiments/, configs/), with the test's own virtual environment playing the part of the
activated `.venv`: `make env` and `source .venv/bin/activate` are checked to exist, not rerun.
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = "<!-- readme-test: quick -->"
ENV_SETUP = ("make env", "source .venv/bin/activate")


def _read(name: str) -> str:
  with open(os.path.join(ROOT, name)) as f:
    return f.read()


def quick_blocks(text: str) -> list[str]:
  """The fenced blocks that directly follow the quick marker."""
  return re.findall(re.escape(MARK) + r"\s*```(?:bash|sh)?\n(.*?)```", text, flags=re.S)


def test_quick_blocks_are_found():
  blocks = quick_blocks(_read("README.md"))
  assert blocks, f"README.md has no block marked {MARK}"
  assert quick_blocks(f"x\n{MARK}\n```bash\necho hi\n```\n```bash\nnot marked\n```") == ["echo hi\n"]


@pytest.mark.parametrize("index", range(len(quick_blocks(_read("README.md")))))
def test_quick_block_runs(index, tmp_path):
  block = quick_blocks(_read("README.md"))[index]
  script = []
  for line in block.splitlines():
    command = line.split("#")[0].strip()
    if command.startswith(ENV_SETUP):
      if command.startswith("make env"):
        assert re.search(r"^env:", _read("Makefile"), flags=re.M)
      continue
    if command:
      script.append(command)
  for name in ("main.py", "experiments", "configs"):
    os.symlink(os.path.join(ROOT, name), tmp_path / name)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
  result = subprocess.run(["bash", "-euo", "pipefail", "-c", "\n".join(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, f"README block {index} failed:\n{block}\n{result.stderr[-3000:]}"
  for workdir in re.findall(r"--workdir (\S+)", "\n".join(script)):
    assert (tmp_path / workdir / "checkpoints").is_dir(), f"{workdir}: no checkpoints written"
