"""The jobs `main.py` can run, by the name a config gives in `config.job`.

Each job module defines `validate(config)` (raises ConfigError) and `run(config, workdir)`, and
`TAKES_PRETRAINED = True` when its model can start from `model.pretrained` (`lwjax.models.pretrained`), and
`MESH_COVERS_ALL_DEVICES = False` when its `mesh` may take fewer devices than there are (serving). Modules
are imported lazily so that validating a config never pays for another project's imports.
"""

from __future__ import annotations

import importlib

from lwjax.config import ConfigError

JOBS = {
    "compute_matched": "lwjax.projects.compute_matched.job",
    "gamengen_agent": "lwjax.projects.gamengen.jobs.train_agent",
    "gamengen_autoencoder": "lwjax.projects.gamengen.jobs.train_autoencoder",
    "gamengen_demo": "lwjax.projects.gamengen.jobs.demo_pipeline",
    "gamengen_diffusion": "lwjax.projects.gamengen.jobs.train_diffusion",
    "gamengen_eval": "lwjax.projects.gamengen.jobs.evaluate",
    "gamengen_play": "lwjax.projects.gamengen.jobs.play_world_model",
    "gamengen_record": "lwjax.projects.gamengen.jobs.record_trajectories",
    "genrm": "lwjax.projects.genrm.job",
    "genrm_solver": "lwjax.projects.genrm.solver",
    "igsm_retry": "lwjax.projects.retry.job",
    "lm_pretrain": "lwjax.projects.lm.pretrain",
    "lrp4rag": "lwjax.projects.lrp4rag.job",
    "mamba_distill": "lwjax.projects.mamba_distill.job",
    "serve": "lwjax.serving.serve",
    "wim": "lwjax.projects.wim.job",
}


def get(config):
  """The job module named by `config.job`, after validating the whole config against its schema."""
  name = config.get("job")
  if name not in JOBS:
    raise ConfigError("job", f"unknown job {name!r}", ", ".join(sorted(JOBS)))
  module = importlib.import_module(JOBS[name])
  model = config.get("model")
  if model is not None and hasattr(model, "get") and model.get("pretrained") and not getattr(
      module, "TAKES_PRETRAINED", False):
    raise ConfigError("model.pretrained", f"the {name} job does not start from a pretrained checkpoint",
                      "leave it empty; jobs that take one: " + ", ".join(_taking_pretrained()))
  module.validate(config)
  return module


def _taking_pretrained() -> list[str]:
  return sorted(n for n, m in JOBS.items() if getattr(importlib.import_module(m), "TAKES_PRETRAINED", False))
