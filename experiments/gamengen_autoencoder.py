"""GameNGen's autoencoder on DOOM frames: trained from scratch, then decoder-only MSE fine-tuning
(arXiv 2408.14837, sec. 3.2.2).

  python main.py --config experiments/gamengen_record.py:scale=smoke --workdir runs/record_smoke
  python main.py --config experiments/gamengen_autoencoder.py:scale=smoke,data=runs/record_smoke/trajectories \
      --workdir runs/ae_smoke                                                            # seconds
  python main.py --config experiments/gamengen_autoencoder.py:scale=cpu,data=runs/record_cpu/trajectories \
      --workdir runs/ae_cpu                                                              # minutes, 2 cores
  python main.py --config \
      experiments/gamengen_autoencoder.py:scale=paper,data=runs/agent_paper/trajectories/from_update_000000 \
      --workdir runs/ae_paper --config.init.autoencoder=PATH/stable-diffusion-v1-4/vae   # as the paper

Arguments: `scale` in smoke|cpu|cpu_long|gpu|paper (configs/gamengen.py), `data` a recording directory (several:
`--config.data.recordings='["a", "b"]'`). The paper fine-tunes SD-1.4's pretrained decoder:
`--config.init.autoencoder` = a diffusers AutoencoderKL directory does that (decoder stage only). Without it
(nothing is downloaded here) stage one trains the whole autoencoder first.
"""

import ml_collections

from configs import common, gamengen

SCALES = gamengen.SCALES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, choices={"scale": gamengen.SCALES}, scale="cpu", data="runs/record/trajectories")
  return gamengen.autoencoder(args["scale"], [args["data"]])
