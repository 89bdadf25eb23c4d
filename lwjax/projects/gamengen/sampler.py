"""Real-time GameNGen sampling: few-step DDIM with classifier-free guidance on past frames, and autoregressive
rollouts with the context kept on device (GameNGen, arXiv 2408.14837, sec. 3.2-3.3 and 4).

Callables take parameters as pure pytrees, so NNX modules pass through `nnx.split`:
  denoise(params, x_bhwc, t_b, bucket_b, actions_bn) -> v_bhwc  (x: noisy latent, then context oldest..newest)
  decode(params, z_bhwc) -> images [b, H, W, 3] in [-1, 1]  (z as the denoiser makes it: the decode callable
                                                            undoes the autoencoder's scaling factor)

DDIM (eta = 0) on v-prediction with "trailing" timestep spacing (diffusers' `timestep_spacing="trailing"`):
`round(arange(1000, 0, -1000 / k)) - 1`, so any k starts at t = 999 (4 steps: 999, 749, 499, 249) and one
step is a full-noise-to-image jump, as the paper's 1-step ablation needs; "leading" would start 1 step at t = 0.
The last step goes to alpha_bar = 1 (diffusers' `set_alpha_to_one=True`), i.e. it returns the x0 prediction.

Classifier-free guidance is on the past frames only: `v = v_uncond + g (v_cond - v_uncond)`, uncond = the
context latents replaced by zeros and their bucket by the dropped-context one (what context dropout trains),
actions kept; both halves go through one denoiser call of batch 2b; g == 1 makes one call of batch b. At
inference the context can be noise-augmented at a fixed level with its matching bucket (default 0.0, bucket 0:
the paper does not give an inference level).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lwjax.projects.gamengen.diffusion import (
  ALPHAS_CUMPROD,
  DROPPED_CONTEXT_BUCKET,
  corrupt_context,
  denoiser_input,
  eps_from_v,
  noise_bucket,
  x0_from_v,
)
from lwjax.projects.gamengen.frames import to_uint8

DenoiseFn = Callable[[Any, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]
DecodeFn = Callable[[Any, jax.Array], jax.Array]
# frame(denoise_params, decode_params, context_latents_bthwc, actions_bt, key) -> (latent_bhwc, frame_bHW3)
FrameFn = Callable[[Any, Any, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def ddim_timesteps(steps: int, num_train_steps: int = len(ALPHAS_CUMPROD)) -> np.ndarray:
  """Trailing DDIM timesteps, descending, int32 [steps]."""
  if not 1 <= steps <= num_train_steps:
    raise ValueError(f"steps={steps} outside [1, {num_train_steps}]")
  return (np.round(np.arange(num_train_steps, 0, -num_train_steps / steps)) - 1).astype(np.int32)


def guided_v(denoise: DenoiseFn, params, x_t_bhwc: jax.Array, context_bthwc: jax.Array, t_b: jax.Array,
             bucket_b: jax.Array, actions_bn: jax.Array, guidance: float) -> jax.Array:
  """v with classifier-free guidance on the context; one denoiser call (batch 2b, or b when guidance == 1)."""
  if guidance == 1.0:
    return denoise(params, denoiser_input(x_t_bhwc, context_bthwc), t_b, bucket_b, actions_bn)
  x_2bhwc = jnp.concatenate([denoiser_input(x_t_bhwc, context_bthwc),
                             denoiser_input(x_t_bhwc, jnp.zeros_like(context_bthwc))])
  t_2b, actions_2bn = (jnp.concatenate([a, a]) for a in (t_b, actions_bn))
  bucket_2b = jnp.concatenate([bucket_b, jnp.full_like(bucket_b, DROPPED_CONTEXT_BUCKET)])  # as training drops
  v_cond, v_uncond = jnp.split(denoise(params, x_2bhwc, t_2b, bucket_2b, actions_2bn), 2)
  return v_uncond + guidance * (v_cond - v_uncond)


def ddim_sample(denoise: DenoiseFn, params, context_latents_bthwc: jax.Array, actions_bt: jax.Array,
                key: jax.Array, *, steps: int = 4, guidance: float = 1.5, noise_level: float = 0.0,
                max_noise_level: float = 0.7, num_buckets: int = 10, alphas_cumprod=ALPHAS_CUMPROD,
                unroll: bool = True) -> jax.Array:
  """The next latent [b, h, w, c] given the context latents [b, context, h, w, c] and actions [b, context].

  `unroll`: the steps as straight-line code (XLA:CPU ran a 4-step frame of the cpu-scale model 1.3x faster
  than as a loop; compile time grows with the steps), else a loop whose denoiser compiles once."""
  b, _, h, w, c = context_latents_bthwc.shape
  noise_key, aug_key = jax.random.split(key)
  context = context_latents_bthwc.astype(jnp.float32)
  if noise_level > 0.0:
    level_b = jnp.full((b,), noise_level, jnp.float32)
    context = corrupt_context(context, level_b, jax.random.normal(aug_key, context.shape, jnp.float32))
  bucket_b = jnp.full((b,), noise_bucket(noise_level, max_noise_level, num_buckets), jnp.int32)
  acp = jnp.asarray(alphas_cumprod, jnp.float32)
  x = jax.random.normal(noise_key, (b, h, w, c), jnp.float32)
  timesteps = ddim_timesteps(steps, len(alphas_cumprod))
  # alpha_bar of the step each DDIM update lands on; the last lands on alpha_bar = 1 (the x0 prediction).
  a_prev = np.append(np.asarray(alphas_cumprod, np.float32)[timesteps[1:]], np.float32(1.0))

  def ddim_step(x, step):
    t, a_next = step
    t_b = jnp.full((b,), t, jnp.int32)
    v = guided_v(denoise, params, x, context, t_b, bucket_b, actions_bt, guidance).astype(jnp.float32)
    x0, eps = x0_from_v(x, v, t_b, acp), eps_from_v(x, v, t_b, acp)
    return jnp.sqrt(a_next) * x0 + jnp.sqrt(1.0 - a_next) * eps, None
  x, _ = jax.lax.scan(ddim_step, x, (jnp.asarray(timesteps), jnp.asarray(a_prev)), unroll=unroll)
  return x


def make_frame_fn(denoise: DenoiseFn, decode: DecodeFn, *, steps: int = 4, guidance: float = 1.5,
                  noise_level: float = 0.0, max_noise_level: float = 0.7, num_buckets: int = 10,
                  crop_rows: int | None = None, crop_cols: int | None = None,
                  alphas_cumprod=ALPHAS_CUMPROD, unroll: bool = True) -> FrameFn:
  """One jitted function: `steps` guided denoiser calls, then decode.

  frame(denoise_params, decode_params, context_latents_bthwc, actions_bt, key) -> (latent_bhwc, frame_bHW3)
  where frame is uint8, cropped to `crop_rows` rows and `crop_cols` columns (None keeps all; 240 rows undo
  the paper's 320x240 -> 320x256 padding). It compiles once per input shape. `unroll` as `ddim_sample`'s.
  """
  ddim_timesteps(steps, len(alphas_cumprod))  # fail here, not at the first call, on a bad step count
  if not 0.0 <= noise_level <= max_noise_level:
    raise ValueError(f"noise_level={noise_level} outside [0, max_noise_level={max_noise_level}]")

  def frame(denoise_params, decode_params, context_latents_bthwc, actions_bt, key):
    latent = ddim_sample(denoise, denoise_params, context_latents_bthwc, actions_bt, key, steps=steps,
                         guidance=guidance, noise_level=noise_level, max_noise_level=max_noise_level,
                         num_buckets=num_buckets, alphas_cumprod=alphas_cumprod, unroll=unroll)
    return latent, to_uint8(decode(decode_params, latent), crop_rows, crop_cols)

  return jax.jit(frame)


def push_context(context_latents_bthwc: jax.Array, actions_bt: jax.Array, latent_bhwc: jax.Array,
                 action_b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Shifts the context window by one: drops the oldest slot, appends the new latent and the action held
  from it (actions[:, k] is held from latents[:, k] to the next frame, as in `record.WindowSource`)."""
  new_latent = latent_bhwc[:, None].astype(context_latents_bthwc.dtype)
  latents = jnp.concatenate([context_latents_bthwc[:, 1:], new_latent], axis=1)
  actions = jnp.concatenate([actions_bt[:, 1:], action_b[:, None].astype(actions_bt.dtype)], axis=1)
  return latents, actions


@functools.partial(jax.jit, static_argnums=0)
def rollout(frame: FrameFn, denoise_params, decode_params, context_latents_bthwc: jax.Array,
            context_actions_bt: jax.Array, actions_bn: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Autoregressive generation of n frames, the context window carried on device through a `lax.scan`.

  The starting context is a window as recorded (its last action leads to the first generated frame);
  actions_bn[:, i] is the action held from generated frame i, pushed with it (the last one is not used).
  Step i samples with `fold_in(key, i)`. Returns (latents [b, n, h, w, c], frames uint8 [b, n, H, W, 3]).
  """
  def step(carry, inputs):
    latents, actions = carry
    i, action_b = inputs
    latent, frame_img = frame(denoise_params, decode_params, latents, actions, jax.random.fold_in(key, i))
    return push_context(latents, actions, latent, action_b), (latent, frame_img)

  n = actions_bn.shape[1]
  _, (latents_nb, frames_nb) = jax.lax.scan(step, (context_latents_bthwc, context_actions_bt),
                                            (jnp.arange(n), jnp.swapaxes(actions_bn, 0, 1)))
  return jnp.swapaxes(latents_nb, 0, 1), jnp.swapaxes(frames_nb, 0, 1)
