"""The `gamengen_play` job: play the trained world model in a browser, or headless from an action file
(arXiv 2408.14837, sec. 3.3: the diffusion model is the game engine, in real time).

The engine (`world_model.NeuralEngine`) starts each game from a recorded window of the diffusion run's
held-out episodes (the model needs `context` frames to begin) and then makes every frame itself: k DDIM
steps with guidance on past frames, then decode, one compiled call per frame.
"""

from __future__ import annotations

import os

from lwjax.config import ConfigError, Field, positive_int, validate as validate_schema
from lwjax.projects.gamengen import play, world_model
from lwjax.projects.gamengen.jobs.evaluate import held_out_windows

SCHEMA = {
    "job": Field(str), "seed": Field(int, min=0),
    "diffusion_workdir": Field(str, doc="workdir of the gamengen_diffusion run to play"),
    "sample": {"steps": positive_int("DDIM steps per frame (the paper: 4)"), "guidance": Field(float, min=0.0),
               "noise_level": Field(float, min=0.0, max=1.0)},
    "play": play.SCHEMA,
}


def validate(config) -> None:
  validate_schema(config, SCHEMA)
  if not os.path.isdir(os.path.join(config.diffusion_workdir, "checkpoints")):
    raise ConfigError("diffusion_workdir", f"{config.diffusion_workdir!r} holds no checkpoints/",
                      "the workdir of a gamengen_diffusion run")
  play_config = config.play.to_dict()
  play_config["out_dir"] = play_config["out_dir"] or "<workdir>/play"  # the default run() fills in
  try:
    play.validate(play_config)
  except ConfigError as e:
    raise ConfigError(f"play.{e.key}", e.why, e.valid) from None


def run(config, workdir: str):
  s = config.sample
  settings = world_model.SampleSettings(steps=s.steps, guidance=s.guidance, noise_level=s.noise_level)
  model, run_config = world_model.load(config.diffusion_workdir, settings)
  engine = world_model.NeuralEngine(model, held_out_windows(run_config, model.context), seed=config.seed)
  play_config = config.play.to_dict()
  play_config["out_dir"] = play_config["out_dir"] or os.path.join(workdir, "play")
  return play.run(engine, play_config)
