"""The trained GameNGen world model: autoencoder + action-conditioned denoiser + real-time sampler, and the
neural game engine built on it (arXiv 2408.14837, sec. 3.3: the model is the game engine).

`WorldModel` binds the two networks' parameters (pure pytrees, so one jitted frame function serves every
call) to `sampler.make_frame_fn`; `bound_frame_fn` compiles them into the program for play. `NeuralEngine`
is a `play.FrameEngine`: its context ring buffer (latents [1, context, h, w, c] and actions [1, context])
stays on device, `reset` starts from a recorded window (the paper's model needs a context to start from),
and `step(action)` makes one frame: k guided DDIM steps + decode, one compiled call with the parameters
compiled in.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lwjax.models.autoencoder import Autoencoder
from lwjax.models.unet_diffusion import UNet, UNetConfig
from lwjax.projects.gamengen import sampler
from lwjax.projects.gamengen.frames import FrameGeometry
from lwjax.projects.gamengen.record import WindowSource
from lwjax.training import checkpoint


@dataclasses.dataclass(frozen=True)
class SampleSettings:
  """Inference settings of the paper (sec. 3.3, 5.2.1): 4 DDIM steps, guidance 1.5 on past frames."""
  steps: int = 4
  guidance: float = 1.5
  noise_level: float = 0.0
  max_noise_level: float = 0.7
  num_buckets: int = 10
  unroll: bool = True  # the DDIM steps as straight-line code (`sampler.ddim_sample`); False: a loop


# Parameters up to this many bytes are compiled into the played frame program as constants
# (`WorldModel.bound_frame_fn`); larger ones (SD-1.4's 3.4 GB) are passed to it as arguments.
BIND_MAX_BYTES = 64 * 2 ** 20


class _PlainParams:
  """An attribute holding parameters as plain nested dicts of arrays: jit flattens those in C++, where an
  nnx.State's Variables are flattened in Python (~0.2 ms of each frame call of the cpu-scale model). Setting
  it drops the frame functions compiled with the old parameters (`WorldModel.bound_frame_fn`)."""

  def __set_name__(self, owner, name):
    self.slot = "_" + name

  def __get__(self, obj, objtype=None):
    return self if obj is None else getattr(obj, self.slot)

  def __set__(self, obj, params):
    setattr(obj, self.slot, nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params)
    obj.__dict__["_bound_frame_fns"] = {}


class WorldModel:
  """Encode frames to latents, predict the next frame from a context of latents and actions."""

  unet_params = _PlainParams()
  ae_params = _PlainParams()

  def __init__(self, unet: UNet, autoencoder: Autoencoder, geometry: FrameGeometry,
               settings: SampleSettings = SampleSettings()):
    self.cfg, self.geometry, self.settings = unet.cfg, geometry, settings
    self.scale = autoencoder.cfg.scaling_factor
    self.unet_graphdef, self.unet_params = nnx.split(unet)
    self.ae_graphdef, self.ae_params = nnx.split(autoencoder)
    self._encode = jax.jit(lambda params, x: nnx.merge(self.ae_graphdef, params).encode(x)[0] * self.scale)
    self._frame_fns = {}

  @property
  def context(self) -> int:
    return self.cfg.context_frames

  def denoise(self, params, x_bhwc, t_b, bucket_b, actions_bn):
    return nnx.merge(self.unet_graphdef, params)(x_bhwc, t_b, bucket_b, actions_bn)

  def decode(self, params, z_bhwc):
    return nnx.merge(self.ae_graphdef, params).decode(z_bhwc / self.scale)

  def encode(self, frames_uint8: np.ndarray) -> jax.Array:
    """Recorded frames [n, 240, 320, 3] uint8 -> scaled posterior-mean latents [n, h, w, c]."""
    return self._encode(self.ae_params, jnp.asarray(self.geometry.to_model(frames_uint8)))

  def reconstruct(self, frames_uint8: np.ndarray) -> np.ndarray:
    """The autoencoder's own reconstruction at model resolution (the quality ceiling), uint8."""
    return np.asarray(self.geometry.to_uint8(self.decode(self.ae_params, self.encode(frames_uint8))))

  def frame_fn(self, steps: int | None = None, guidance: float | None = None) -> sampler.FrameFn:
    """The jitted frame function for `steps` DDIM steps and `guidance` (default: the settings')."""
    s = self.settings
    key = (steps or s.steps, s.guidance if guidance is None else guidance)
    if key not in self._frame_fns:
      rows, cols, _ = self.geometry.frame_shape
      self._frame_fns[key] = sampler.make_frame_fn(
          self.denoise, self.decode, steps=key[0], guidance=key[1], noise_level=s.noise_level,
          max_noise_level=s.max_noise_level, num_buckets=s.num_buckets, crop_rows=rows, crop_cols=cols,
          unroll=s.unroll)
    return self._frame_fns[key]

  def bound_frame_fn(self, steps: int | None = None, guidance: float | None = None):
    """`frame_fn` with this model's parameters bound: fn(context_bthwc, actions_bt, key) -> (latent, frame).

    What `NeuralEngine` plays. Parameters up to BIND_MAX_BYTES are compiled in as constants (as inductor's
    `freezing` does for PyTorch): a call then hands XLA three arrays instead of one per parameter (~400 at the
    cpu scale, about 1 ms of a 12 ms frame on 2 cores), and XLA folds what depends on the parameters and the
    fixed timesteps alone. Larger models pass their parameters as arguments. Setting `unet_params` or
    `ae_params` drops these functions; the next call compiles with the new parameters.
    """
    s = self.settings
    key = (steps or s.steps, s.guidance if guidance is None else guidance)
    if key not in self._bound_frame_fns:
      frame, params = self.frame_fn(*key), (self.unet_params, self.ae_params)
      if sum(x.nbytes for x in jax.tree.leaves(params)) <= BIND_MAX_BYTES:
        self._bound_frame_fns[key] = jax.jit(lambda context, actions, rng: frame(*params, context, actions, rng))
      else:
        self._bound_frame_fns[key] = lambda context, actions, rng: frame(*params, context, actions, rng)
    return self._bound_frame_fns[key]

  def next_frame(self, context_bthwc, actions_bt, key, *, steps: int | None = None,
                 guidance: float | None = None) -> tuple[jax.Array, jax.Array]:
    """(latent [b, h, w, c], frame uint8 [b, rows, cols, 3]) after the context."""
    return self.frame_fn(steps, guidance)(self.unet_params, self.ae_params, context_bthwc, actions_bt, key)

  def rollout(self, context_bthwc, context_actions_bt, actions_bn, key) -> tuple[jax.Array, jax.Array]:
    """Autoregressive frames under `actions_bn` from a recorded context (`sampler.rollout`)."""
    return sampler.rollout(self.frame_fn(), self.unet_params, self.ae_params, context_bthwc, context_actions_bt,
                           actions_bn, key)


class NeuralEngine:
  """A `play.FrameEngine` whose frames come from the world model, starting from recorded windows."""

  def __init__(self, model: WorldModel, windows: WindowSource, seed: int = 0):
    if windows.context != model.context:
      raise ValueError(f"windows of context {windows.context} for a model of context {model.context}")
    if not len(windows):
      raise ValueError(f"no start window in {windows}: record longer episodes")
    self.model, self.windows = model, windows
    self.frame_shape = model.geometry.frame_shape
    self._key, self._step = jax.random.key(seed), 0
    self._latents = self._actions = None

  def reset(self, seed: int) -> np.ndarray:
    window = self.windows[int(np.random.default_rng(seed).integers(len(self.windows)))]
    self._latents = self.model.encode(window["frames"])[None]
    self._actions = jnp.asarray(window["actions"], jnp.int32)[None]
    self._key, self._step = jax.random.key(seed), 0
    return self.model.geometry.shrink(window["frames"][-1])

  def step(self, action: int) -> np.ndarray:
    if self._latents is None:
      raise RuntimeError("reset() the engine before stepping it")
    # The newest context slot's action is the one held from the last frame shown to the next.
    actions = self._actions.at[0, -1].set(action)
    latent, frame = self.model.bound_frame_fn()(self._latents, actions, jax.random.fold_in(self._key, self._step))
    self._latents, self._actions = sampler.push_context(self._latents, actions, latent, jnp.asarray([action]))
    self._step += 1
    return np.asarray(frame[0])


def load(diffusion_workdir: str, settings: SampleSettings = SampleSettings()) -> tuple[WorldModel, dict]:
  """The world model of a `gamengen_diffusion` run (latest checkpoint) and that run's config."""
  from lwjax.projects.gamengen.jobs import train_autoencoder  # the autoencoder run named in the config

  unet, config, _ = checkpoint.load_model(
      os.path.join(diffusion_workdir, "checkpoints"),
      lambda c: UNet(UNetConfig.from_dict(c["model"]), rngs=nnx.Rngs(0)))
  autoencoder, geometry = train_autoencoder.load(config["autoencoder"]["workdir"])
  return WorldModel(unet, autoencoder, geometry, settings), config
