"""The `gamengen_autoencoder` job: trains the KL autoencoder on DOOM frames, then fine-tunes its decoder alone
(arXiv 2408.14837, sec. 3.2.2).

The paper starts from Stable Diffusion's autoencoder and fine-tunes only its decoder, with an MSE loss to
the target frames: `init.autoencoder` = a diffusers AutoencoderKL directory (SD-v1.4's vae/) does exactly
that (stage two alone, from the imported weights; the pretrained model's held-out PSNR is reported as the
"pretrained" stage). Without it, stage one trains the whole autoencoder from scratch (MSE + `kl_weight` x KL
to N(0, I); SD's LPIPS and GAN terms need pretrained networks) in `<workdir>/checkpoints`; stage two
(`decoder.steps` > 0) fine-tunes the decoder alone with MSE, on the frozen encoder's posterior means (what
the denoiser's latents are), in `<workdir>/decoder/checkpoints`. Both stages resume.
`load(workdir)` returns the final model for the diffusion, evaluation and play jobs.
The last `data.held_out_episodes` episodes are never trained on; `metrics.json` reports their
reconstruction PSNR per stage.
"""

from __future__ import annotations

import itertools
import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from lwjax.config import ConfigError, Field, non_negative_int, validate as validate_schema
from lwjax.data.pipeline import take_padded
from lwjax.models import diffusers_import
from lwjax.models.autoencoder import CONFIG_SCHEMA as AE_SCHEMA, Autoencoder, AutoencoderConfig
from lwjax.projects.gamengen import data as data_lib, frames
from lwjax.projects.gamengen.record import EpisodeWindows, split_episodes
from lwjax.training import checkpoint, mesh, optim, trainer as trainer_lib

SCHEMA = {
    "job": Field(str), "seed": Field(int, min=0),
    "data": {
        "recordings": Field((list, tuple), doc="directories written by gamengen_record (or an agent run)"),
        "held_out_episodes": non_negative_int("last episodes kept out of training, for evaluation"),
    },
    "geometry": frames.SCHEMA,
    "model": AE_SCHEMA,
    "init": {"autoencoder": Field(str, doc="a diffusers AutoencoderKL directory (SD-v1.4's vae/): fine-tune its "
                                           "decoder only; empty = train from scratch")},
    "loss": {"kl_weight": Field(float, min=0.0)},
    "decoder": {"steps": non_negative_int("decoder-only MSE fine-tuning steps after stage one; 0 skips it"),
                "learning_rate": Field(float, min=0.0)},
    "train": trainer_lib.SCHEMA, "optim": optim.SCHEMA, "mesh": mesh.SCHEMA,
}


def validate(config) -> None:
  validate_schema(config, SCHEMA)
  try:
    cfg = AutoencoderConfig.from_dict(config.model)
    geometry = frames.FrameGeometry.from_dict(config.geometry)
  except ValueError as e:
    raise ConfigError("model/geometry", str(e), "see lwjax/models/autoencoder.py") from None
  h, w, _ = geometry.image_shape
  if h % cfg.downsample_factor or w % cfg.downsample_factor:
    raise ConfigError("geometry.pad_multiple", f"image {h}x{w} is not divisible by {cfg.downsample_factor}",
                      f"a multiple of {cfg.downsample_factor}")
  if not config.data.recordings:
    raise ConfigError("data.recordings", "empty", "directories holding index.json of recorded frames")
  if config.init.autoencoder:
    diffusers_import.check_autoencoder_dir(config.init.autoencoder, cfg, key="init.autoencoder")
    if not config.decoder.steps:
      raise ConfigError("decoder.steps", "0 with init.autoencoder: nothing would be trained",
                        "the decoder fine-tuning steps (the paper fine-tunes the pretrained decoder)")


def autoencoder_loss(model: Autoencoder, batch: dict, *, kl_weight: float, decoder_only: bool = False):
  """Per-frame MSE of the reconstruction of a latent sample (+ kl_weight x KL); (sum, frames, metrics).

  `decoder_only`: the decoder fine-tuning of the paper (sec. 3.2.2), gradients stopped at the latent, which is
  the posterior mean: the latents the denoiser trains on (the cache) and generates, so the decoder is tuned
  on what it will decode.
  """
  x = batch["image"]
  mean, logvar = model.encode(x)
  if decoder_only:
    z = jax.lax.stop_gradient(mean)
  else:
    noise = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], mean.dtype))(
        data_lib.example_keys(batch["seed"]))
    z = mean + jnp.exp(0.5 * logvar) * noise
  mse_b = jnp.mean((model.decode(z) - x) ** 2, axis=(1, 2, 3))
  kl_b = 0.5 * jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
  loss_b = mse_b + (0.0 if decoder_only else kl_weight) * kl_b
  psnr_b = 10.0 * jnp.log10(4.0 / jnp.maximum(mse_b, 1e-10))  # images span [-1, 1]: peak-to-peak 2
  return jnp.sum(loss_b), jnp.float32(x.shape[0]), {"mse": jnp.sum(mse_b), "kl": jnp.sum(kl_b),
                                                    "psnr": jnp.sum(psnr_b)}


def _stage_config(config, steps: int, learning_rate: float) -> ml_collections.ConfigDict:
  stage = ml_collections.ConfigDict(config.to_dict())
  stage.train.steps = steps
  stage.train.eval_every = min(stage.train.eval_every, steps) if stage.train.eval_every else 0
  stage.optim.update(learning_rate=learning_rate, weight_decay=0.0, warmup_steps=min(config.optim.warmup_steps,
                                                                                     steps // 10))
  return stage


def run(config, workdir: str) -> dict:
  """Trains both stages (resuming), writes `<workdir>/metrics.json`; returns it."""
  cfg, geometry = AutoencoderConfig.from_dict(config.model), frames.FrameGeometry.from_dict(config.geometry)
  recordings = list(config.data.recordings)
  num_episodes = len(EpisodeWindows(recordings, context=0).all_episodes)
  train_eps, eval_eps = split_episodes(num_episodes, config.data.held_out_episodes)
  batch = config.train.global_batch_size

  def eval_batches():
    ds = data_lib.frame_dataset(recordings, geometry, batch_size=batch, episodes=eval_eps or train_eps,
                                shuffle_seed=None, num_epochs=1)
    return take_padded(iter(ds), config.train.eval_steps)

  model_fn = lambda rngs: Autoencoder(cfg, rngs=rngs)  # noqa: E731
  kl = config.loss.kl_weight
  stages, metrics, params = [], {}, None
  if config.init.autoencoder:  # the paper: the pretrained autoencoder, its decoder fine-tuned
    params = nnx.to_pure_dict(nnx.state(diffusers_import.load_autoencoder(config.init.autoencoder, cfg)))
    logging.info("gamengen autoencoder: fine-tuning the decoder of %s", config.init.autoencoder)
  else:
    stages.append(("autoencoder", workdir, config, lambda model, b: autoencoder_loss(model, b, kl_weight=kl)))
  if config.decoder.steps:
    stages.append(("decoder", os.path.join(workdir, "decoder"),
                   _stage_config(config, config.decoder.steps, config.decoder.learning_rate),
                   lambda model, b: autoencoder_loss(model, b, kl_weight=kl, decoder_only=True)))
  for name, stage_dir, stage_config, loss_fn in stages:
    trainer = trainer_lib.Trainer(stage_config, stage_dir, model_fn=model_fn, loss_fn=loss_fn)
    if params is not None and not metrics:  # the imported model, before fine-tuning
      metrics["pretrained"] = {"held_out": trainer.evaluate(params, eval_batches())}
    train_ds = data_lib.frame_dataset(recordings, geometry, batch_size=batch, episodes=train_eps,
                                      shuffle_seed=config.seed + len(metrics))
    result = trainer.fit(iter(train_ds), eval_batches, seed=config.seed, init_params=params)
    params = _final_params(trainer, stage_dir)
    held_out = trainer.evaluate(params, eval_batches())
    metrics[name] = {"steps": result["step"], "train": result["train"], "held_out": held_out}
    logging.info("%s stage: held-out reconstruction PSNR %.2f dB (MSE %.5f) after %d steps", name,
                 held_out["psnr"], held_out["mse"], result["step"])
  metrics["final_stage"] = stages[-1][0]
  if not config.init.autoencoder:  # trained here: scale the latents to unit variance, as latent diffusion does
    frames_ds = data_lib.frame_dataset(recordings, geometry, batch_size=batch, episodes=train_eps,
                                       shuffle_seed=config.seed, num_epochs=1, process_index=0, process_count=1)
    model = nnx.merge(trainer.graphdef, params)  # every process measures the same batches
    metrics["scaling_factor"] = latent_scaling_factor(model, itertools.islice(iter(frames_ds), LATENT_STD_BATCHES))
    logging.info("latent scaling factor %.4f (1 / std of the posterior means of %d training batches)",
                 metrics["scaling_factor"], LATENT_STD_BATCHES)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump(metrics, f, indent=2)
  return metrics


LATENT_STD_BATCHES = 8


def latent_scaling_factor(model: Autoencoder, batches) -> float:
  """1 / std of the posterior-mean latents of `batches` (every element together), the factor that gives the
  diffusion model unit-variance latents (Rombach et al. 2022, sec. 4.3.2; SD's 0.18215 was found this way for its
  autoencoder, and is far off for one trained here: its latents came out ~7x too small against unit noise)."""
  encode = jax.jit(lambda x: model.encode(x)[0])
  means = [np.asarray(encode(b["image"])) for b in batches]
  std = float(np.concatenate(means).std())
  if not np.isfinite(std) or std <= 0.0:
    raise ValueError(f"latent std {std}: the autoencoder's latents are degenerate")
  return 1.0 / std


def _final_params(trainer: trainer_lib.Trainer, stage_dir: str):
  ckpt = checkpoint.Checkpointer(os.path.join(stage_dir, "checkpoints"))
  try:
    return ckpt.restore(trainer.abstract_state)[1]["params"]
  finally:
    ckpt.close()


def load(workdir: str) -> tuple[Autoencoder, frames.FrameGeometry]:
  """The final autoencoder of a `gamengen_autoencoder` run (its decoder stage when run) and its geometry, with the
  latent scaling factor the run measured (`metrics.json`) when it trained the autoencoder from scratch."""
  override = {}
  metrics_path = os.path.join(workdir, "metrics.json")
  if os.path.exists(metrics_path):
    with open(metrics_path) as f:
      if "scaling_factor" in (saved := json.load(f)):
        override["scaling_factor"] = float(saved["scaling_factor"])
  build = lambda config: Autoencoder(AutoencoderConfig.from_dict({**config["model"], **override}),  # noqa: E731
                                     rngs=nnx.Rngs(0))
  stage = os.path.join(workdir, "decoder", "checkpoints")
  if not os.path.isdir(stage):
    stage = os.path.join(workdir, "checkpoints")
  try:
    model, config, _ = checkpoint.load_model(stage, build)
  except FileNotFoundError:
    raise FileNotFoundError(
        f"no checkpoint under {stage}: expected the workdir of a gamengen_autoencoder run") from None
  return model, frames.FrameGeometry.from_dict(config["geometry"])
