"""GameNGen's denoiser: action-conditioned UNet on latent windows, v-prediction, noise augmentation
(arXiv 2408.14837, sec. 3.2 and 4.2).

  python main.py --config \
      experiments/gamengen_diffusion.py:scale=smoke,data=runs/record_smoke/trajectories,autoencoder=runs/ae_smoke \
      --workdir runs/diffusion_smoke                                                     # seconds
  python main.py --config \
      experiments/gamengen_diffusion.py:scale=cpu,data=runs/record_cpu/trajectories,autoencoder=runs/ae_cpu \
      --workdir runs/diffusion_cpu                                                       # minutes, 2 cores
  # the noise-augmentation ablation: the same run without it
  python main.py --workdir runs/diffusion_cpu_no_aug --config \
    experiments/gamengen_diffusion.py:scale=cpu,data=runs/record_cpu/trajectories,autoencoder=runs/ae_cpu,noise_aug=off
  python main.py --config experiments/gamengen_diffusion.py:scale=paper,data=...,autoencoder=runs/ae_paper \
      --workdir runs/diffusion_paper --config.init.unet=PATH/stable-diffusion-v1-4/unet   # SD-1.4, 64 frames
  # before renting a slice: the same train step compiled for it here (memory fit, roofline MFU)
  python -m lwjax.launch.compile --config experiments/gamengen_diffusion.py:scale=paper --tpu v5p-8

Arguments: `scale` in smoke|cpu|cpu_long|gpu|paper (configs/gamengen.py); `data` a recording directory; `autoencoder`
the workdir of a gamengen_autoencoder run; `noise_aug` on|off; `context` the number of past frames (the
context-length ablation: `--config` arg context=1, 4, ...). Latents are cached in `<workdir>/latents`.
`--config.init.unet`: a diffusers UNet2DConditionModel directory to start from, enlarged as the paper (conv_in
widened with zero weights for the context latents, noise-bucket embedding zero, action embeddings fresh).
"""

import ml_collections

from configs import common, gamengen

SCALES = gamengen.SCALES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, choices={"scale": gamengen.SCALES, "noise_aug": ("on", "off")}, scale="cpu",
                          data="runs/record/trajectories", autoencoder="runs/ae", noise_aug="on", context="")
  config = gamengen.diffusion(args["scale"], [args["data"]], args["autoencoder"],
                              noise_augmentation=args["noise_aug"] == "on")
  if args["context"]:
    config.model.context_frames = int(args["context"])
  return config
