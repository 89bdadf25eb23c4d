"""GameNGen's autoencoder on DOOM frames: trained from scratch, then decoder-only MSE fine-tuning
(arXiv 2408.14837, sec. 3.2.2).

  python main.py --config experiments/gamengen_record.py:scale=smoke --workdir runs/record_smoke
  python main.py --config experiments/gamengen_autoencoder.py:scale=smoke,data=runs/record_smoke/trajectories \
      --workdir runs/ae_smoke                                                            # seconds
  python main.py --config experiments/gamengen_autoencoder.py:scale=cpu,data=runs/record_cpu/trajectories \
      --workdir runs/ae_cpu                                                              # minutes, 2 cores
  python main.py --config \
      experiments/gamengen_autoencoder.py:scale=paper,data=runs/agent_paper/trajectories/from_update_000000 \
      --workdir runs/ae_paper                                                            # SD-v1.4 VAE shape

Arguments: `scale` in smoke|cpu|gpu|paper (configs/gamengen.py), `data` a recording directory (several:
`--config.data.recordings='["a", "b"]'`). The paper fine-tunes SD-1.4's pretrained decoder; no SD weights are
reachable here, so stage one trains the whole autoencoder first (lwjax.models.diffusers_import can load
SD's weights where they exist).
"""

import ml_collections

from configs import common, gamengen

SCALES = gamengen.SCALES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, choices={"scale": gamengen.SCALES}, scale="cpu", data="runs/record/trajectories")
  return gamengen.autoencoder(args["scale"], [args["data"]])
