"""GameNGen sampler: trailing DDIM on v, guidance on past frames, one compiled frame function, rollouts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lwjax.projects.gamengen import sampler as sm
from lwjax.projects.gamengen.diffusion import ALPHAS_CUMPROD, DROPPED_CONTEXT_BUCKET, denoiser_input

B, T, H, W, C = 2, 3, 4, 4, 2
ACP = jnp.asarray(ALPHAS_CUMPROD)


def oracle_v(x_t, t, x0):
  """The v that makes x0_from_v(x_t, v, t) == x0."""
  a = ACP[t].reshape(-1, 1, 1, 1)
  return (jnp.sqrt(a) * x_t - x0) / jnp.sqrt(1 - a)


def context_denoise(params, x, t, bucket, actions):
  """Depends on x_t, the context, the bucket and the actions, so guidance changes its output."""
  context = x[..., C:].reshape(*x.shape[:-1], T, C)
  return 0.3 * x[..., :C] + params * context.mean(-2) + 0.01 * (bucket + actions[:, -1]).reshape(-1, 1, 1, 1)


def decode(params, z):
  """[b, h, w, c] -> [b, 2h, 2w, 3] in [-1, 1]."""
  img = jnp.tanh(jnp.repeat(jnp.repeat(z, 2, 1), 2, 2))
  return jnp.concatenate([img, img[..., :1]], -1)


def inputs(seed=0):
  k0, k1 = jax.random.split(jax.random.key(seed))
  return jax.random.normal(k0, (B, T, H, W, C)), jax.random.randint(k1, (B, T), 0, 5)


def test_trailing_timesteps():
  np.testing.assert_array_equal(sm.ddim_timesteps(1), [999])
  np.testing.assert_array_equal(sm.ddim_timesteps(2), [999, 499])
  np.testing.assert_array_equal(sm.ddim_timesteps(4), [999, 749, 499, 249])
  np.testing.assert_array_equal(sm.ddim_timesteps(3), [999, 666, 332])
  with pytest.raises(ValueError, match="steps=0"):
    sm.ddim_timesteps(0)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_ddim_with_oracle_recovers_x0(steps):
  x0 = jax.random.normal(jax.random.key(7), (B, H, W, C))
  context, actions = inputs()

  def oracle(p, x, t, bucket, a):  # guidance calls it with batch 2b: cond and uncond halves agree
    return oracle_v(x[..., :C], t, jnp.concatenate([p] * (len(x) // B)))

  sample = jax.jit(lambda p, c, a, k: sm.ddim_sample(oracle, p, c, a, k, steps=steps, guidance=1.5))
  np.testing.assert_allclose(sample(x0, context, actions, jax.random.key(1)), x0, atol=1e-4)


def test_guidance_one_is_the_conditional_prediction_in_one_call():
  context, actions = inputs()
  x, t, bucket = jax.random.normal(jax.random.key(3), (B, H, W, C)), jnp.full((B,), 500), jnp.full((B,), 2)
  shapes = []

  def counting(params, inp, *rest):
    shapes.append(inp.shape)
    return context_denoise(params, inp, *rest)

  v = sm.guided_v(counting, 0.5, x, context, t, bucket, actions, 1.0)
  np.testing.assert_array_equal(v, context_denoise(0.5, denoiser_input(x, context), t, bucket, actions))
  assert shapes == [(B, H, W, (1 + T) * C)]


def test_guidance_batches_cond_and_uncond_and_follows_the_formula():
  context, actions = inputs()
  x, t, bucket = jax.random.normal(jax.random.key(3), (B, H, W, C)), jnp.full((B,), 500), jnp.full((B,), 2)
  shapes = []

  def counting(params, inp, *rest):
    shapes.append(inp.shape)
    return context_denoise(params, inp, *rest)

  v = sm.guided_v(counting, 0.5, x, context, t, bucket, actions, 1.5)
  v_cond = context_denoise(0.5, denoiser_input(x, context), t, bucket, actions)
  # The unconditional half: zero context and the dropped-context bucket, as training's dropped examples.
  v_uncond = context_denoise(0.5, denoiser_input(x, jnp.zeros_like(context)), t,
                             jnp.full_like(bucket, DROPPED_CONTEXT_BUCKET), actions)
  np.testing.assert_allclose(v, v_uncond + 1.5 * (v_cond - v_uncond), atol=1e-6)
  assert not np.allclose(v, v_cond, atol=1e-3)
  assert shapes == [(2 * B, H, W, (1 + T) * C)]


def test_frame_fn_compiles_once_is_deterministic_and_crops():
  traces = []

  def counting(params, *args):
    traces.append(1)
    return context_denoise(params, *args)

  frame = sm.make_frame_fn(counting, decode, steps=4, guidance=1.5, noise_level=0.3, crop_rows=6, crop_cols=7)
  context, actions = inputs()
  latent, img = frame(0.5, None, context, actions, jax.random.key(0))
  assert latent.shape == (B, H, W, C) and img.shape == (B, 6, 7, 3) and img.dtype == jnp.uint8
  assert len(traces) == 1  # the DDIM steps are a scan (unrolled when lowered): the denoiser is traced once
  context2, actions2 = inputs(1)
  frame(0.7, None, context2, actions2, jax.random.key(5))
  again, img_again = frame(0.5, None, context, actions, jax.random.key(0))
  assert len(traces) == 1
  np.testing.assert_array_equal(again, latent)
  np.testing.assert_array_equal(img_again, img)
  other, _ = frame(0.5, None, context, actions, jax.random.key(1))
  assert not np.allclose(other, latent)
  looped = sm.make_frame_fn(counting, decode, steps=4, guidance=1.5, noise_level=0.3, crop_rows=6, crop_cols=7,
                            unroll=False)
  np.testing.assert_allclose(looped(0.5, None, context, actions, jax.random.key(0))[0], latent, atol=1e-5)


def test_to_uint8():
  images = jnp.array([-1.5, -1.0, 0.0, 1.0, 2.0]).reshape(1, 5, 1, 1) * jnp.ones((1, 5, 2, 3))
  frames = sm.to_uint8(images, crop_rows=4, crop_cols=1)
  assert frames.shape == (1, 4, 1, 3) and frames.dtype == jnp.uint8
  np.testing.assert_array_equal(frames[0, :, 0, 0], [0, 0, 128, 255])


def test_rollout_shifts_the_context_ring_buffer():
  """x0 = (oldest latent + 1, oldest action): the outputs spell out the order of the context slots."""
  def oldest(params, x, t, bucket, actions):
    context = x[..., C:].reshape(*x.shape[:-1], T, C)
    oldest_action = jnp.broadcast_to(actions[:, 0, None, None].astype(jnp.float32), x.shape[:-1])
    x0 = jnp.stack([context[..., 0, 0] + 1, oldest_action], -1)
    return oracle_v(x[..., :C], t, x0)

  frame = sm.make_frame_fn(oldest, decode, steps=1, guidance=1.0)
  context = jnp.broadcast_to(jnp.array([0.0, 10.0, 20.0]).reshape(1, T, 1, 1, 1), (B, T, H, W, C))
  context_actions = jnp.broadcast_to(jnp.array([5, 6, 7]), (B, T))
  drive = jnp.broadcast_to(jnp.array([1, 2, 3, 4, 9]), (B, 5))
  latents, frames = sm.rollout(frame, None, None, context, context_actions, drive, jax.random.key(0))
  assert latents.shape == (B, 5, H, W, C) and frames.shape == (B, 5, 2 * H, 2 * W, 3)
  # buffers: [0,10,20] -> [10,20,1] -> [20,1,11] -> [1,11,21] -> [11,21,2]; actions [5,6,7] -> [6,7,1] -> ...
  np.testing.assert_allclose(latents[:, :, 0, 0, 0], [[1, 11, 21, 2, 12]] * B, atol=1e-3)
  np.testing.assert_allclose(latents[:, :, 0, 0, 1], [[5, 6, 7, 1, 2]] * B, atol=1e-3)
  np.testing.assert_array_equal(frames[:, 0], sm.to_uint8(decode(None, latents[:, 0])))
  again, _ = sm.rollout(frame, None, None, context, context_actions, drive, jax.random.key(0))
  np.testing.assert_array_equal(again, latents)


def test_rollout_is_deterministic_per_seed():
  frame = sm.make_frame_fn(context_denoise, decode, steps=2, guidance=1.5)
  context, actions = inputs()
  drive = jnp.zeros((B, 3), jnp.int32)
  a, fa = sm.rollout(frame, 0.5, None, context, actions, drive, jax.random.key(0))
  b, fb = sm.rollout(frame, 0.5, None, context, actions, drive, jax.random.key(0))
  c, _ = sm.rollout(frame, 0.5, None, context, actions, drive, jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(fa, fb)
  assert not np.allclose(a, c)


@pytest.mark.parametrize("level,bucket", [(0.0, 0), (0.3, 4)])
def test_inference_noise_level_noises_context_and_passes_its_bucket(level, bucket):
  context, actions = inputs()
  seen = {}

  def capture(params, x, t, buckets, acts):
    seen.update(x=x, bucket=buckets, actions=acts)
    return jnp.zeros(x.shape[:-1] + (C,))

  with jax.disable_jit():  # the DDIM steps are a scan: run it eagerly so `capture` sees concrete arrays
    sm.ddim_sample(capture, None, context, actions, jax.random.key(0), steps=1, guidance=1.0, noise_level=level)
  np.testing.assert_array_equal(seen["bucket"], [bucket] * B)
  np.testing.assert_array_equal(seen["actions"], actions)
  passed = seen["x"][..., C:]
  clean = denoiser_input(jnp.zeros((B, H, W, C)), context)[..., C:]
  if level == 0.0:
    np.testing.assert_array_equal(passed, clean)
  else:
    np.testing.assert_allclose(float(jnp.var(passed - np.sqrt(1 - level) * clean)), level, rtol=0.2)


def test_frame_fn_validates_its_settings():
  with pytest.raises(ValueError, match="steps=0"):
    sm.make_frame_fn(context_denoise, decode, steps=0)
  with pytest.raises(ValueError, match="noise_level=0.8"):
    sm.make_frame_fn(context_denoise, decode, noise_level=0.8)
