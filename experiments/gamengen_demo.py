"""GameNGen end to end (the `make demo` experiment): record DOOM with a random policy, train the autoencoder
and the action-conditioned denoiser, evaluate on a held-out episode, roll out a GIF (arXiv 2408.14837).

  python main.py --config experiments/gamengen_demo.py:scale=smoke --workdir runs/demo_smoke   # ~1 minute
  python main.py --config experiments/gamengen_demo.py:scale=cpu --workdir runs/demo           # make demo
  python main.py --config experiments/gamengen_demo.py:scale=cpu_long --workdir runs/demo_long # ~75 minutes
  python main.py --config experiments/gamengen_play.py:diffusion=runs/demo/diffusion --workdir runs/play

Arguments: `scale` in smoke|cpu|cpu_long|gpu|paper (configs/gamengen.py for the model side); `policy` in
random|scripted|agent, the recording's (agent: `--config.record.policy.checkpoint=<a gamengen_agent workdir>`).
The cpu scale records
4 games of E1M1 for 4,800 frames (episodes of 400 tics, one held out), trains the tiny autoencoder and the
`unet_cpu` denoiser at 80x60 for a few minutes each and evaluates on the held-out episode (about 8 minutes on
2 cores; docs/RESULTS.md). cpu_long records 40,000 frames of 8 games (100 episodes, two held out), trains the
same autoencoder 4x longer and a denoiser twice as wide for 20,000 steps. Outputs: `<workdir>/metrics.json`,
`<workdir>/eval/rollout.gif` (generated frames above the recorded ones), TensorBoard under each stage.
Going bigger: scale=gpu (160x120, ae_small / unet_small) or the single-stage experiments at scale=paper on
the agent's recordings (experiments/gamengen_agent.py records its play).
"""

import ml_collections

from configs import common, gamengen
from experiments import gamengen_record

PLACEHOLDER = "<set by the gamengen_demo job>"

SCALES = gamengen.SCALES


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, choices={"scale": gamengen.SCALES, "policy": gamengen_record.POLICIES}, scale="cpu",
                          policy="random")
  scale = args["scale"]
  record = gamengen_record.get_config(f"scale={'smoke' if scale == 'smoke' else 'cpu'},policy={args['policy']}")
  if scale == "smoke":
    record.env.max_episode_tics = 60
    record.record.update(num_envs=2, num_frames=240)
  elif scale == "cpu":
    record.env.max_episode_tics = 400
    record.record.update(num_envs=4, num_frames=4800)
  elif scale == "cpu_long":  # ten times the frames: 100 episodes of 400 tics
    record.env.max_episode_tics = 400
    record.record.update(num_envs=8, num_frames=40_000)
  config = ml_collections.ConfigDict()
  config.job = "gamengen_demo"
  config.record = record
  config.autoencoder = gamengen.autoencoder(scale, [PLACEHOLDER])
  config.diffusion = gamengen.diffusion(scale, [PLACEHOLDER], PLACEHOLDER)
  config.eval = gamengen.evaluation(scale, PLACEHOLDER)
  return config
