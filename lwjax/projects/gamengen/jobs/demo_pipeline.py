"""The `gamengen_demo` job: GameNGen end to end in one workdir (arXiv 2408.14837, sec. 3-5) — record DOOM,
train the autoencoder, train the denoiser, evaluate on held-out episodes, roll out a GIF.

Stages, each in its own folder of the workdir; a restart skips the finished ones (their index.json or
metrics.json exists) and resumes an interrupted one from its checkpoints:
`trajectories/` (gamengen_record), `autoencoder/` (gamengen_autoencoder), `diffusion/` (gamengen_diffusion),
`eval/` (gamengen_eval: metrics.json, rollout.gif). The stage configs are those of the single-stage
experiments at the same scale; paths between them are filled in here. `<workdir>/metrics.json` gathers
the headline numbers. Play the result with experiments/gamengen_play.py:diffusion=<workdir>/diffusion.
"""

from __future__ import annotations

import json
import logging
import os

import jax

from lwjax.config import ConfigError
from lwjax.projects.gamengen.jobs import evaluate, record_trajectories, train_autoencoder, train_diffusion

STAGES = ("record", "autoencoder", "diffusion", "eval")


def _wire(config, workdir: str) -> dict:
  """The stage configs with the paths between stages set under `workdir`."""
  d = {name: os.path.join(workdir, name if name != "record" else "trajectories") for name in STAGES}
  record, ae, diff, ev = (config[name] for name in STAGES)
  with record.unlocked(), ae.unlocked(), diff.unlocked(), ev.unlocked():
    record.record.out_dir = d["record"]
    ae.data.recordings = [d["record"]]
    diff.data.recordings = [d["record"]]
    diff.autoencoder.workdir = d["autoencoder"]
    ev.diffusion_workdir = d["diffusion"]
  return d


def validate(config) -> None:
  expected = {"job", *STAGES}
  for key in sorted(set(config.keys()) ^ expected):
    why = "unknown key" if key not in expected else "missing stage config"
    raise ConfigError(key, why, ", ".join(sorted(expected)))
  for name, module in (("record", record_trajectories), ("autoencoder", train_autoencoder),
                       ("diffusion", train_diffusion)):
    try:
      module.validate(config[name])
    except ConfigError as e:
      raise ConfigError(f"{name}.{e.key}", e.why, e.valid) from None
  try:
    evaluate.validate_settings(config.eval)
  except ConfigError as e:
    raise ConfigError(f"eval.{e.key}", e.why, e.valid) from None


def _stage(name: str, done_file: str, fn) -> dict:
  """Runs a stage unless a previous run finished it (its `done_file` exists); returns that file's JSON."""
  if os.path.exists(done_file):
    logging.info("demo: reusing the finished %s stage (%s)", name, done_file)
  else:
    fn()
  with open(done_file) as f:
    return json.load(f)


def run(config, workdir: str) -> dict:
  dirs = _wire(config, os.path.abspath(workdir))
  done = {"record": os.path.join(dirs["record"], "index.json"),
          **{name: os.path.join(dirs[name], "metrics.json") for name in STAGES[1:]}}
  _stage("record", done["record"], lambda: record_trajectories.run(config.record, workdir))
  ae = _stage("autoencoder", done["autoencoder"],
              lambda: train_autoencoder.run(config.autoencoder, dirs["autoencoder"]))
  _stage("diffusion", done["diffusion"], lambda: train_diffusion.run(config.diffusion, dirs["diffusion"]))
  metrics = _stage("eval", done["eval"], lambda: evaluate.run(config.eval, dirs["eval"]))
  summary = {"autoencoder_held_out_psnr": ae[ae["final_stage"]]["held_out"]["psnr"],
             **{k: metrics[k] for k in ("psnr_teacher_forced", "ssim_teacher_forced", "psnr_copy_last_frame",
                                        "psnr_autoencoder", "psnr_by_ddim_steps")},
             "paired_vs_copy_last_frame": metrics.get("paired_vs_copy_last_frame"),
             "psnr_autoregressive": metrics.get("psnr_autoregressive"),
             "rollout_gif": os.path.join(dirs["eval"], "rollout.gif"), "strips": metrics.get("strips", {}),
             "stages": dirs}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump(summary, f, indent=2)
  logging.info("demo outputs: %s", json.dumps(summary, indent=1))
  return summary
