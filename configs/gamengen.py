"""GameNGen model-side config groups per scale, shared by the gamengen_* experiments and the demo pipeline.

Scales (arXiv 2408.14837 sec. 4.2 for the paper's): frame geometry, autoencoder, denoiser and their training.
- smoke: 80x60 frames padded to 96x64 (latents 12x8), tiny networks, a handful of steps: seconds.
- cpu:   the same geometry, `ae_tiny` and `unet_cpu` (`unet_tiny` at twice the width: +1.2 dB; 4x: no more),
         trained for minutes on 2 cores (the `make demo` scale).
- cpu_long: the cpu geometry and autoencoder, trained longer, and `unet_cpu_wide` (twice unet_cpu's width) on
         ten times the frames: about 75 minutes on 2 cores (docs/RESULTS.md).
- gpu:   160x120 frames padded to 192x128 (latents 24x16), `ae_small` / `unet_small`, 16-frame context.
- paper: 320x240 padded to 320x256 (latents 40x32), SD-v1.4 autoencoder and UNet, 64-frame context,
         batch 128, Adafactor lr 2e-5, 700k steps, bf16.
"""

import ml_collections

from configs import autoencoder as autoencoder_presets, common, mesh, unet as unet_presets

SCALES = ("smoke", "cpu", "cpu_long", "gpu", "paper")

# (downsample, pad_multiple)
_GEOMETRY = {"smoke": (4, 32), "cpu": (4, 32), "cpu_long": (4, 32), "gpu": (2, 64), "paper": (1, 64)}


def geometry(scale: str) -> ml_collections.ConfigDict:
  downsample, pad_multiple = _GEOMETRY[scale]
  return ml_collections.ConfigDict({"downsample": downsample, "pad_multiple": pad_multiple})


def autoencoder(scale: str, recordings: list[str]) -> ml_collections.ConfigDict:
  """The gamengen_autoencoder job's config."""
  config = ml_collections.ConfigDict()
  config.job = "gamengen_autoencoder"
  config.seed = 0
  config.data = {"recordings": list(recordings), "held_out_episodes": 1}
  config.geometry = geometry(scale)
  config.model = autoencoder_presets.get({"smoke": "ae_tiny", "cpu": "ae_tiny", "cpu_long": "ae_tiny",
                                          "gpu": "ae_small", "paper": "sd14"}[scale])
  config.init = {"autoencoder": ""}  # SD-v1.4's vae/ (diffusers layout): fine-tune its decoder only
  config.loss = {"kl_weight": 1e-6}
  config.decoder = {"steps": 100, "learning_rate": 1e-4}
  config.train = common.train(steps=2000, global_batch_size=32, log_every=50, eval_every=500, eval_steps=4,
                              checkpoint_every=500)
  config.optim = common.optim(learning_rate=1e-3, warmup_steps=100, weight_decay=0.0, b2=0.99)
  config.mesh = mesh.get()
  if scale == "smoke":
    config.decoder.steps = 2
    config.train.update(steps=4, global_batch_size=4, log_every=2, eval_every=4, eval_steps=1, checkpoint_every=4)
    config.optim.warmup_steps = 1
  elif scale == "cpu":  # batches of 8: ~4 steps/s on one core, where batches of 16 ran ~1 s a step
    config.decoder.steps = 50
    config.train.update(steps=800, global_batch_size=8, log_every=100, eval_every=800, eval_steps=4,
                        checkpoint_every=400)
    config.optim.update(learning_rate=2e-3, warmup_steps=20)
  elif scale == "cpu_long":  # the cpu recipe for 4x the steps (800 steps: held-out ceiling 24.9 dB)
    config.data.held_out_episodes = 2
    config.decoder.steps = 200
    config.train.update(steps=3200, global_batch_size=8, log_every=100, eval_every=1600, eval_steps=4,
                        checkpoint_every=800)
    config.optim.update(learning_rate=2e-3, warmup_steps=20)
  elif scale == "gpu":
    config.decoder.steps = 2000
    config.train.update(steps=20000, global_batch_size=64, eval_every=2000, checkpoint_every=2000)
    config.model.dtype = "bfloat16"
  else:
    config.decoder.steps = 50000
    config.train.update(steps=100000, global_batch_size=128, eval_every=5000, checkpoint_every=5000)
    config.model.dtype = "bfloat16"
  return config


def diffusion(scale: str, recordings: list[str], autoencoder_workdir: str,
              noise_augmentation: bool = True) -> ml_collections.ConfigDict:
  """The gamengen_diffusion job's config."""
  config = ml_collections.ConfigDict()
  config.job = "gamengen_diffusion"
  config.seed = 0
  # One model frame per agent step (4 tics, our choice): consecutive tics differ little and the action
  # changes only every 4 tics. frame_stride=1 trains on every tic.
  config.data = {"recordings": list(recordings), "held_out_episodes": 1, "encode_batch_size": 32,
                 "frame_stride": 4}
  # geometry: the latent grid when compiling ahead of time without a trained autoencoder (lwjax.launch.compile);
  # training always uses the autoencoder checkpoint's own.
  config.autoencoder = {"workdir": autoencoder_workdir, "geometry": geometry(scale)}
  config.model = unet_presets.get({"smoke": "unet_tiny", "cpu": "unet_cpu", "cpu_long": "unet_cpu_wide",
                                   "gpu": "unet_small", "paper": "sd14"}[scale])
  config.init = {"unet": ""}  # SD-v1.4's unet/ (diffusers layout), enlarged as the paper (sec. 3.2)
  config.diffusion = {"noise_augmentation": noise_augmentation, "max_noise_level": 0.7, "context_dropout": 0.1}
  config.sample = {"steps": 4, "guidance": 1.5, "num_images": 4}
  config.train = common.train(steps=700000, global_batch_size=128, log_every=100, eval_every=10000,
                              eval_steps=8, checkpoint_every=10000)
  config.optim = common.optim(name="adafactor", learning_rate=2e-5, schedule="constant", warmup_steps=0,
                              weight_decay=0.0, b1=0.0, b2=0.8, eps=1e-30, clip_norm=1.0)
  config.mesh = mesh.get()
  if scale == "smoke":
    config.data.encode_batch_size = 8
    config.sample.num_images = 2
    config.train.update(steps=4, global_batch_size=4, log_every=2, eval_every=4, eval_steps=1, checkpoint_every=4)
    config.optim.learning_rate = 1e-3
  elif scale == "cpu":
    # Minutes on 2 cores: Adafactor at 2e-5 would barely move a from-scratch net in a few hundred steps.
    config.train.update(steps=2500, global_batch_size=16, log_every=100, eval_every=1250, eval_steps=4,
                        checkpoint_every=1250)
    config.optim.update(name="adamw", learning_rate=1e-3, schedule="warmup_cosine", warmup_steps=30, b1=0.9,
                        b2=0.99, eps=1e-8)
  elif scale == "cpu_long":  # 6-7 steps/s on one core: ~55 minutes; ~30 passes over 10k model frames
    config.data.held_out_episodes = 2
    config.train.update(steps=20000, global_batch_size=16, log_every=200, eval_every=5000, eval_steps=4,
                        checkpoint_every=2500)
    config.optim.update(name="adamw", learning_rate=1e-3, schedule="warmup_cosine", warmup_steps=100, b1=0.9,
                        b2=0.99, eps=1e-8)
  elif scale == "gpu":
    config.train.update(steps=50000, global_batch_size=64, eval_every=5000, checkpoint_every=5000)
    config.optim.update(learning_rate=1e-4)
    config.model.dtype = "bfloat16"
  else:
    config.model.dtype = "bfloat16"
  return config


def evaluation(scale: str, diffusion_workdir: str) -> ml_collections.ConfigDict:
  """The gamengen_eval job's config."""
  config = ml_collections.ConfigDict()
  config.job = "gamengen_eval"
  config.seed = 0
  config.diffusion_workdir = diffusion_workdir
  # Tuples, not lists: absl's config flags override tuples (`--config.eval.horizons='(16, 32)'`), never lists.
  # recordings: "" = the run's held-out split; or a gamengen_record run of the same game, all held out.
  config.eval = {"num_windows": 256, "batch_size": 16, "steps": 4, "guidance": 1.5, "noise_level": 0.0,
                 "ddim_steps": (1, 2, 4, 8), "horizons": (16, 32, 64), "num_rollouts": 8, "recordings": "",
                 "episodes": 0}
  if scale == "smoke":
    config.eval.update(num_windows=4, batch_size=4, ddim_steps=(1,), horizons=(4,), num_rollouts=1)
  elif scale == "cpu":
    config.eval.update(num_windows=64, batch_size=16, horizons=(16, 32), num_rollouts=4)
  elif scale == "cpu_long":
    config.eval.update(num_windows=128, batch_size=16, horizons=(16, 32, 64), num_rollouts=4)
  return config
