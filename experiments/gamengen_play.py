"""Play DOOM inside the trained GameNGen world model: a local web page, or headless from an action file
(arXiv 2408.14837, sec. 3.3).

  python main.py --config experiments/gamengen_play.py:diffusion=runs/demo/diffusion --workdir runs/play
  #   -> open the logged http://127.0.0.1:8765/ ; W/S forward/back, A/D turn, Q/E strafe, Space attack, F use
  python main.py --config experiments/gamengen_play.py:diffusion=runs/demo/diffusion,headless=true \
      --config.play.actions_file=actions.txt --workdir runs/play_headless   # play.gif, frames.npy, play.json

Arguments: `diffusion` the workdir of a gamengen_diffusion run; `headless` true|false; `steps` DDIM steps per
frame (default 4, the paper's; 1 is faster). Overrides: `--config.play.port=0` picks a free port.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, choices={"headless": ("true", "false")}, diffusion="runs/diffusion",
                          headless="false", steps="4")
  config = ml_collections.ConfigDict()
  config.job = "gamengen_play"
  config.seed = 0
  config.diffusion_workdir = args["diffusion"]
  config.sample = {"steps": int(args["steps"]), "guidance": 1.5, "noise_level": 0.0}
  config.play = {"host": "127.0.0.1", "port": 8765, "headless": args["headless"] == "true", "actions_file": "",
                 "out_dir": "", "seed": 0}
  return config
