"""GameNGen diffusion training math: noise schedule, v-prediction, noise augmentation, context dropout
(GameNGen, arXiv 2408.14837, sec. 3.2-3.2.1).

The denoiser sees the noisy target latent concatenated on channels with the `context` past-frame latents
(oldest..newest), a diffusion timestep, a noise-augmentation bucket and the past actions, and predicts v
(Salimans & Ho 2022). Everything here is a pure function of arrays and explicit PRNG keys, written against
a denoiser callable `denoise(x_bhwc, t_b, bucket_b, actions_bn) -> v_bhwc`, so any model plugs in.

Noise augmentation (sec. 3.2.1): per example a level `a ~ U(0, max_level)`; the context latents become
`sqrt(1 - a) * z + sqrt(a) * eps`, i.e. `a` is the fraction of the variance that is noise. We chose this
variance-preserving form (the forward-diffusion form with alpha_bar = 1 - a) over the additive `z + a * eps`
because it keeps unit-variance (scaled) latents at unit variance at every level, so the context channels'
statistics do not depend on the level, and a = 0 leaves the context exactly clean. The level is discretised
into `num_buckets` buckets whose index the model embeds (the paper adds a learned bucket embedding to the
timestep embedding). Context dropout (p = 0.1) replaces an example's whole past-frame latent block by zeros,
after augmentation, keeps its actions and gives it the bucket `DROPPED_CONTEXT_BUCKET`: the sampler's
classifier-free guidance on past frames uses the same zeros and the same bucket as its unconditional input.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_STEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012  # Stable Diffusion v1.4 "scaled_linear" schedule

# denoise(x_bhwc, t_b, bucket_b, actions_bn) -> v_bhwc; x has (1 + context) * latent channels.
Denoiser = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def sd_alphas_cumprod(num_steps: int = NUM_TRAIN_STEPS, beta_start: float = BETA_START,
                      beta_end: float = BETA_END) -> np.ndarray:
  """alpha_bar_t = prod_{s<=t} (1 - beta_s) with betas linear in sqrt space ("scaled_linear"); [num_steps]."""
  betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=np.float64) ** 2
  return np.cumprod(1.0 - betas).astype(np.float32)


ALPHAS_CUMPROD = sd_alphas_cumprod()  # [1000] float32


def _coefs(t_b: jax.Array, alphas_cumprod, ndim: int) -> tuple[jax.Array, jax.Array]:
  """sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t) for timesteps [b], shaped to broadcast over [b, ...]."""
  a_b = jnp.asarray(alphas_cumprod, jnp.float32)[t_b].reshape(-1, *([1] * (ndim - 1)))
  return jnp.sqrt(a_b), jnp.sqrt(1.0 - a_b)


def add_noise(x0: jax.Array, noise: jax.Array, t_b: jax.Array, alphas_cumprod=ALPHAS_CUMPROD) -> jax.Array:
  """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps."""
  s, n = _coefs(t_b, alphas_cumprod, x0.ndim)
  return s * x0 + n * noise


def v_target(x0: jax.Array, noise: jax.Array, t_b: jax.Array, alphas_cumprod=ALPHAS_CUMPROD) -> jax.Array:
  """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0."""
  s, n = _coefs(t_b, alphas_cumprod, x0.ndim)
  return s * noise - n * x0


def x0_from_v(x_t: jax.Array, v: jax.Array, t_b: jax.Array, alphas_cumprod=ALPHAS_CUMPROD) -> jax.Array:
  """x0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v."""
  s, n = _coefs(t_b, alphas_cumprod, x_t.ndim)
  return s * x_t - n * v


def eps_from_v(x_t: jax.Array, v: jax.Array, t_b: jax.Array, alphas_cumprod=ALPHAS_CUMPROD) -> jax.Array:
  """eps = sqrt(1 - alpha_bar_t) x_t + sqrt(alpha_bar_t) v."""
  s, n = _coefs(t_b, alphas_cumprod, x_t.ndim)
  return n * x_t + s * v


# The bucket of a dropped (all-zero) context, in training and in the unconditional half of guidance: the zeros
# carry no noise level, so both sides agree on one fixed bucket rather than a random one.
DROPPED_CONTEXT_BUCKET = 0


def noise_bucket(level: jax.Array, max_level: float = 0.7, num_buckets: int = 10) -> jax.Array:
  """Bucket index int32 of noise levels in [0, max_level]: equal-width bins, max_level in the last one."""
  bucket = jnp.floor(jnp.asarray(level, jnp.float32) / max_level * num_buckets).astype(jnp.int32)
  return jnp.clip(bucket, 0, num_buckets - 1)


def bucket_level(bucket: jax.Array, max_level: float = 0.7, num_buckets: int = 10) -> jax.Array:
  """The centre noise level of a bucket (float32), the inverse of `noise_bucket` up to the bin width."""
  return (jnp.asarray(bucket, jnp.float32) + 0.5) * (max_level / num_buckets)


def corrupt_context(context_bthwc: jax.Array, level_b: jax.Array, noise_bthwc: jax.Array) -> jax.Array:
  """sqrt(1 - a) z + sqrt(a) eps per example (the variance-preserving parametrisation, see module doc)."""
  a_b = jnp.asarray(level_b, jnp.float32).reshape(-1, *([1] * (context_bthwc.ndim - 1)))
  return jnp.sqrt(1.0 - a_b) * context_bthwc + jnp.sqrt(a_b) * noise_bthwc


def noise_augment(context_bthwc: jax.Array, key: jax.Array, *, max_level: float = 0.7,
                  num_buckets: int = 10) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Corrupts each example's context at a level ~ U(0, max_level); returns (context, level_b, bucket_b)."""
  level_key, noise_key = jax.random.split(key)
  level_b = jax.random.uniform(level_key, context_bthwc.shape[:1], jnp.float32, 0.0, max_level)
  noise = jax.random.normal(noise_key, context_bthwc.shape, jnp.float32)
  return corrupt_context(context_bthwc, level_b, noise), level_b, noise_bucket(level_b, max_level, num_buckets)


def drop_context(context_bthwc: jax.Array, key: jax.Array, p: float) -> tuple[jax.Array, jax.Array]:
  """Zeroes the whole context block of each example with probability p; returns (context, dropped_b)."""
  dropped_b = jax.random.bernoulli(key, p, context_bthwc.shape[:1])
  keep = (~dropped_b).astype(context_bthwc.dtype).reshape(-1, *([1] * (context_bthwc.ndim - 1)))
  return context_bthwc * keep, dropped_b


def denoiser_input(x_t_bhwc: jax.Array, context_bthwc: jax.Array) -> jax.Array:
  """[b, h, w, (1 + context) * c]: the noisy target's channels, then the context's, oldest..newest."""
  b, n, h, w, c = context_bthwc.shape
  context_bhwc = jnp.transpose(context_bthwc, (0, 2, 3, 1, 4)).reshape(b, h, w, n * c)
  return jnp.concatenate([x_t_bhwc, context_bhwc.astype(x_t_bhwc.dtype)], axis=-1)


def diffusion_loss(denoise: Denoiser, target_latent_bhwc: jax.Array, context_latents_bthwc: jax.Array,
                   actions_bn: jax.Array, key: jax.Array, *, noise_aug: bool = True, max_noise_level: float = 0.7,
                   num_buckets: int = 10, context_dropout: float = 0.1,
                   alphas_cumprod=ALPHAS_CUMPROD) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
  """v-prediction MSE on the target latent given augmented, sometimes dropped context latents.

  target_latent_bhwc: [b, h, w, c] (already scaled by the autoencoder's scaling factor);
  context_latents_bthwc: [b, context, h, w, c], oldest first; actions_bn: int [b, context].
  Returns (loss_sum, weight, metrics): the per-example MSE (mean over h, w, c) summed over the batch, the
  batch size, and metric sums {"context_dropped", "noise_level"}, for a trainer that divides by the weight.
  """
  b = target_latent_bhwc.shape[0]
  t_key, noise_key, aug_key, drop_key = jax.random.split(key, 4)
  t_b = jax.random.randint(t_key, (b,), 0, len(alphas_cumprod), jnp.int32)
  x0 = target_latent_bhwc.astype(jnp.float32)
  noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
  x_t = add_noise(x0, noise, t_b, alphas_cumprod)
  context = context_latents_bthwc.astype(jnp.float32)
  if noise_aug:
    context, level_b, bucket_b = noise_augment(context, aug_key, max_level=max_noise_level, num_buckets=num_buckets)
  else:
    level_b, bucket_b = jnp.zeros((b,), jnp.float32), jnp.zeros((b,), jnp.int32)
  context, dropped_b = drop_context(context, drop_key, context_dropout)
  bucket_b = jnp.where(dropped_b, DROPPED_CONTEXT_BUCKET, bucket_b)  # what guidance's unconditional half gets
  v = denoise(denoiser_input(x_t, context), t_b, bucket_b, actions_bn).astype(jnp.float32)
  mse_b = jnp.mean(jnp.square(v - v_target(x0, noise, t_b, alphas_cumprod)), axis=(1, 2, 3))
  metrics = {"context_dropped": jnp.sum(dropped_b.astype(jnp.float32)), "noise_level": jnp.sum(level_b)}
  return jnp.sum(mse_b), jnp.asarray(b, jnp.float32), metrics
