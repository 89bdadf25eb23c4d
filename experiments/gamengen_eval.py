"""GameNGen evaluation: teacher-forced PSNR/SSIM vs copy-last-frame and the autoencoder ceiling, DDIM steps
1/2/4/8, autoregressive PSNR at 16/32/64 frames, on held-out episodes (arXiv 2408.14837, sec. 5).

  python main.py --config experiments/gamengen_eval.py:scale=smoke,diffusion=runs/diffusion_smoke \
      --workdir runs/eval_smoke
  python main.py --config experiments/gamengen_eval.py:scale=cpu,diffusion=runs/diffusion_cpu --workdir runs/eval_cpu
  python main.py --config experiments/gamengen_eval.py:scale=cpu,diffusion=runs/diffusion_cpu_no_aug \
      --workdir runs/eval_cpu_no_aug                                # the noise-augmentation ablation
  python main.py --config experiments/gamengen_record.py:scale=cpu --workdir runs/demo_heldout --config.seed=7 \
      --config.env.seed=7 --config.env.max_episode_tics=400 --config.record.num_envs=4 \
      --config.record.num_frames=1600                               # 4 fresh episodes of the demo's game
  python main.py --config experiments/gamengen_eval.py:scale=cpu,diffusion=runs/demo/diffusion \
      --config.eval.recordings=runs/demo_heldout --config.eval.num_windows=128 --workdir runs/demo_eval_4ep

Arguments: `scale` in smoke|cpu|cpu_long|gpu|paper (window counts and horizons), `diffusion` the workdir of a
gamengen_diffusion run; `--config.eval.recordings` evaluates on every episode of another recording of the same
game instead of the run's held-out split. Writes `<workdir>/metrics.json` (with the model minus copy-last-frame
and its 95% episode-bootstrap interval), `<workdir>/per_window.jsonl.gz` and `<workdir>/rollout.gif`.
"""

import ml_collections

from configs import common, gamengen

SCALES = gamengen.SCALES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, choices={"scale": gamengen.SCALES}, scale="cpu", diffusion="runs/diffusion")
  return gamengen.evaluation(args["scale"], args["diffusion"])
