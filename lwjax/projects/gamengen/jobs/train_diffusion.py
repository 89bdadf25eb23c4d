"""The `gamengen_diffusion` job: trains the action-conditioned denoiser on latent windows (arXiv 2408.14837,
sec. 3.2 and 4.2).

The frozen autoencoder of `autoencoder.workdir` encodes every recorded frame once into `<workdir>/latents`
(`latents.build_cache`); windows of `model.context_frames` latents and actions, with the next latent as the
target, feed the core `Trainer`: v-prediction, context latents noise-augmented at a level ~U(0, 0.7)
bucketed into 10, context dropped with p = 0.1 (`diffusion.diffusion_loss`); Adafactor at lr 2e-5 by default.
The last `data.held_out_episodes` episodes give the evaluation loss, and after each evaluation
TensorBoard gets `samples/next_frame`: teacher-forced predictions (4-step DDIM, guidance 1.5) above
their targets for a few held-out windows.
"""

from __future__ import annotations

import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from lwjax.config import ConfigError, Field, non_negative_int, positive_int, validate as validate_schema
from lwjax.data.pipeline import take_padded
from lwjax.models import diffusers_import
from lwjax.models.unet_diffusion import CONFIG_SCHEMA as UNET_SCHEMA, UNet, UNetConfig
from lwjax.projects.gamengen import data as data_lib, diffusion, frames, latents as latents_lib
from lwjax.projects.gamengen.jobs import train_autoencoder
from lwjax.projects.gamengen.record import EpisodeWindows, WindowSource, split_episodes
from lwjax.projects.gamengen.world_model import SampleSettings, WorldModel
from lwjax.training import mesh, optim, trainer as trainer_lib

SCHEMA = {
    "job": Field(str), "seed": Field(int, min=0),
    "data": {
        "recordings": Field((list, tuple), doc="directories written by gamengen_record (or an agent run)"),
        "held_out_episodes": non_negative_int("last episodes kept out of training, for evaluation"),
        "encode_batch_size": positive_int("frames per autoencoder call when building the latent cache"),
        "frame_stride": positive_int("records between the model's frames: 1 = every tic, tics_per_action = "
                                     "one frame per agent step"),
    },
    "autoencoder": {"workdir": Field(str, doc="workdir of the gamengen_autoencoder run whose latents to use"),
                    "geometry": frames.SCHEMA},
    "model": UNET_SCHEMA,
    "init": {"unet": Field(str, doc="a diffusers UNet2DConditionModel directory (SD-v1.4's unet/) to start from: "
                                    "conv_in widened with zeros for the context, noise-bucket embedding zero, "
                                    "action embeddings fresh; empty = from scratch")},
    "diffusion": {
        "noise_augmentation": Field(bool, doc="noise the context latents (sec. 3.2.1); False = the ablation"),
        "max_noise_level": Field(float, min=0.0, max=1.0),
        "context_dropout": Field(float, min=0.0, max=1.0, doc="p of replacing the context by zeros (for CFG)"),
    },
    "sample": {"steps": positive_int("DDIM steps of the TensorBoard samples"), "guidance": Field(float, min=0.0),
               "num_images": non_negative_int("held-out windows shown per evaluation; 0 = none")},
    "train": trainer_lib.SCHEMA, "optim": optim.SCHEMA, "mesh": mesh.SCHEMA,
}


def validate(config) -> None:
  validate_schema(config, SCHEMA)
  try:
    UNetConfig.from_dict(config.model)
  except ValueError as e:
    raise ConfigError("model", str(e), "see lwjax/models/unet_diffusion.py") from None
  if not config.data.recordings:
    raise ConfigError("data.recordings", "empty", "directories holding index.json of recorded frames")
  if not config.autoencoder.workdir:
    raise ConfigError("autoencoder.workdir", "empty", "the workdir of a finished gamengen_autoencoder run")
  if config.init.unet:
    diffusers_import.check_unet_dir(config.init.unet, UNetConfig.from_dict(config.model), key="init.unet")


def initial_unet_params(config):
  """The pretrained UNet of `init.unet` as the Trainer's `init_params` (None: from scratch)."""
  if not config.init.unet:
    return None
  cfg = UNetConfig.from_dict(config.model)
  try:
    model = diffusers_import.load_unet(config.init.unet, cfg, seed=config.seed)
  except ValueError as e:
    raise ConfigError("init.unet", str(e), "SD-v1.4's unet/ directory (or one save_unet wrote) for this model "
                      "config") from None
  logging.info("gamengen diffusion: starting from the pretrained UNet in %s", config.init.unet)
  return nnx.to_pure_dict(nnx.state(model))


def diffusion_loss_fn(config):
  """loss_fn(model, batch) for the Trainer: the batch's first seed keys the whole batch's noise."""
  d = config.diffusion

  def loss_fn(model: UNet, batch: dict):
    key = jax.random.key(batch["seed"][0])
    return diffusion.diffusion_loss(model, batch["target"], batch["context"], batch["actions"], key,
                                    noise_aug=d.noise_augmentation, max_noise_level=d.max_noise_level,
                                    num_buckets=model.cfg.num_noise_buckets, context_dropout=d.context_dropout)
  return loss_fn


def aot_step(config, devices):
  """The denoiser's train step for ahead-of-time compilation (`lwjax.launch.compile`) on a mesh of `devices`:
  latent windows of the autoencoder's grid (its checkpoint's geometry when `autoencoder.workdir` holds one, else
  `autoencoder.geometry`; every autoencoder here downsamples 8x). Model FLOPs: three UNet forward passes (XLA's
  count of the unsharded forward) per example. Returns a `compile.AotStep`."""
  from lwjax.launch.compile import AotStep
  from lwjax.training import checkpoint
  cfg = UNetConfig.from_dict(config.model)
  path = os.path.join(config.autoencoder.workdir, "checkpoints")
  geometry_dict = (checkpoint.load_config(path)["geometry"] if config.autoencoder.workdir and os.path.isdir(path)
                   else config.autoencoder.geometry)
  h, w, c = frames.FrameGeometry.from_dict(geometry_dict).latent_shape(cfg.latent_channels)
  b, k = config.train.global_batch_size, cfg.context_frames
  batch = {"target": ((b, h, w, c), jnp.float32), "context": ((b, k, h, w, c), jnp.float32),
           "actions": ((b, k), jnp.int32), "seed": ((b,), jnp.uint32)}
  trainer = trainer_lib.Trainer(config, "/tmp/lwjax-compile-unused", model_fn=lambda rngs: UNet(cfg, rngs=rngs),
                                loss_fn=diffusion_loss_fn(config), mesh=mesh.make_mesh(config.mesh.shape, devices))
  abstract = {name: jax.ShapeDtypeStruct((1, *shape[1:]), dtype) for name, (shape, dtype) in batch.items()}

  def forward(params, example):
    model = nnx.merge(trainer.graphdef, params)
    return diffusion.diffusion_loss(model, example["target"], example["context"], example["actions"],
                                    jax.random.key(0), noise_aug=False, max_noise_level=0.0,
                                    num_buckets=cfg.num_noise_buckets, context_dropout=0.0)[0]
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), trainer.abstract_state["params"])
  cost = jax.jit(forward).lower(params, abstract).cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return AotStep(trainer, batch, 3.0 * float(cost["flops"]) * b,
                 f"{b} windows of {k} + 1 latents {h}x{w}x{c}")


def _image_hook(config, workdir: str, graphdef, autoencoder, geometry, eval_windows: WindowSource):
  """eval_hook writing predicted next frames above their targets to TensorBoard."""
  from tensorboardX import SummaryWriter
  n = min(config.sample.num_images, len(eval_windows))
  if not n or jax.process_index():
    return None
  picks = np.linspace(0, len(eval_windows) - 1, n).astype(int)
  windows = [eval_windows[int(j)] for j in picks]
  writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
  settings = SampleSettings(steps=config.sample.steps, guidance=config.sample.guidance)
  model = None  # built once, so its jitted frame function compiles once

  def hook(step: int, params) -> None:
    nonlocal model
    if model is None:
      model = WorldModel(nnx.merge(graphdef, params), autoencoder, geometry, settings)
    model.unet_params = params
    context = jnp.stack([model.encode(w["frames"]) for w in windows])
    actions = jnp.asarray(np.stack([w["actions"] for w in windows]), jnp.int32)
    _, predicted = model.next_frame(context, actions, jax.random.key(step))
    targets = geometry.shrink(np.stack([w["target"] for w in windows]))
    grid = np.concatenate([np.concatenate(list(np.asarray(predicted)), 1), np.concatenate(list(targets), 1)], 0)
    writer.add_image("samples/next_frame", grid, step, dataformats="HWC")
    writer.flush()
  return hook


def run(config, workdir: str) -> dict:
  """Builds (or reuses) the latent cache, trains to `train.steps` (resuming); returns the trainer's result."""
  cfg = UNetConfig.from_dict(config.model)
  autoencoder, geometry = train_autoencoder.load(config.autoencoder.workdir)
  recordings = list(config.data.recordings)
  ae_graphdef, ae_params = nnx.split(autoencoder)
  scale = autoencoder.cfg.scaling_factor
  encode_fn = jax.jit(lambda params, x: nnx.merge(ae_graphdef, params).encode(x)[0] * scale)
  encode = functools.partial(encode_fn, ae_params)
  cache_dir = os.path.join(workdir, "latents")
  if jax.process_index() == 0:  # one process encodes; the others wait for the whole cache
    latents_lib.build_cache(recordings, cache_dir, encode, geometry, batch_size=config.data.encode_batch_size,
                            encoder=f"{latents_lib.fingerprint(ae_params)}x{scale:.6g}")  # weights and latent scale
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("gamengen latent cache")
  num_episodes = len(EpisodeWindows(recordings, context=0).all_episodes)
  train_eps, eval_eps = split_episodes(num_episodes, config.data.held_out_episodes)
  eval_eps = eval_eps or train_eps
  batch, context = config.train.global_batch_size, cfg.context_frames
  stride = config.data.frame_stride
  train_ds = data_lib.latent_window_dataset(cache_dir, context, batch_size=batch, episodes=train_eps, stride=stride,
                                            shuffle_seed=config.seed)
  if not len(latents_lib.LatentWindowSource(cache_dir, context, episodes=train_eps, stride=stride)):
    raise ConfigError("data.recordings", f"no training window of {context} + 1 frames {stride} apart in an episode",
                      "longer episodes, or a smaller model.context_frames")

  def eval_batches():
    ds = data_lib.latent_window_dataset(cache_dir, context, batch_size=batch, episodes=eval_eps, stride=stride,
                                        shuffle_seed=None, num_epochs=1)
    return take_padded(iter(ds), config.train.eval_steps)

  trainer = trainer_lib.Trainer(config, workdir, model_fn=lambda rngs: UNet(cfg, rngs=rngs),
                                loss_fn=diffusion_loss_fn(config))
  hook = _image_hook(config, workdir, trainer.graphdef, autoencoder, geometry,
                     WindowSource(recordings, context, episodes=eval_eps, stride=stride))
  result = trainer.fit(iter(train_ds), eval_batches, seed=config.seed, eval_hook=hook,
                       init_params=initial_unet_params(config))
  logging.info("gamengen diffusion: %d steps, held-out v-loss %s", result["step"], result["eval"].get("loss"))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "metrics.json"), "w") as f:
      json.dump(result, f, indent=2)
  return result
