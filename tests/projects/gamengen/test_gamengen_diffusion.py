"""GameNGen diffusion math: SD schedule, v-parametrisation, noise buckets, context dropout, a loss that learns."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lwjax.projects.gamengen import diffusion as dm


def test_schedule_matches_closed_form():
  acp = dm.ALPHAS_CUMPROD
  assert acp.shape == (1000,) and acp.dtype == np.float32
  betas = [(0.00085 ** 0.5 + (0.012 ** 0.5 - 0.00085 ** 0.5) * i / 999) ** 2 for i in range(1000)]
  expected = np.cumprod([1.0 - b for b in betas])
  np.testing.assert_allclose(acp, expected, rtol=1e-6)
  np.testing.assert_allclose(acp[0], 1 - 0.00085, rtol=1e-7)
  assert np.all(np.diff(acp) < 0)
  np.testing.assert_allclose(acp[-1], 0.0047, atol=1e-4)  # SD v1.4's terminal alpha_bar


def test_v_x0_eps_conversions_invert_each_other():
  k0, k1, k2 = jax.random.split(jax.random.key(0), 3)
  x0 = jax.random.normal(k0, (5, 4, 3, 2))
  eps = jax.random.normal(k1, x0.shape)
  t = jax.random.randint(k2, (5,), 0, 1000)
  x_t = dm.add_noise(x0, eps, t)
  v = dm.v_target(x0, eps, t)
  np.testing.assert_allclose(dm.x0_from_v(x_t, v, t), x0, atol=1e-5)
  np.testing.assert_allclose(dm.eps_from_v(x_t, v, t), eps, atol=1e-5)
  a = dm.ALPHAS_CUMPROD[np.asarray(t)].reshape(-1, 1, 1, 1)
  np.testing.assert_allclose(x_t, np.sqrt(a) * x0 + np.sqrt(1 - a) * eps, atol=1e-6)
  np.testing.assert_allclose(v, np.sqrt(a) * eps - np.sqrt(1 - a) * x0, atol=1e-6)


def test_noise_buckets():
  levels = jnp.array([0.0, 0.069, 0.07, 0.35, 0.6999, 0.7])
  np.testing.assert_array_equal(dm.noise_bucket(levels, 0.7, 10), [0, 0, 1, 5, 9, 9])
  dense = jnp.linspace(0.0, 0.7, 1001)
  buckets = dm.noise_bucket(dense, 0.7, 10)
  assert buckets.dtype == jnp.int32 and np.all(np.diff(buckets) >= 0) and set(np.asarray(buckets)) == set(range(10))
  centres = dm.bucket_level(jnp.arange(10), 0.7, 10)
  np.testing.assert_allclose(centres, 0.035 + 0.07 * np.arange(10), atol=1e-6)
  np.testing.assert_array_equal(dm.noise_bucket(centres, 0.7, 10), np.arange(10))


def test_noise_augment_levels_and_variance():
  z = jax.random.normal(jax.random.key(1), (256, 2, 4, 4, 4))
  noisy, level, bucket = dm.noise_augment(z, jax.random.key(2), max_level=0.7, num_buckets=10)
  assert level.shape == (256,) and float(level.min()) >= 0.0 and float(level.max()) < 0.7
  np.testing.assert_array_equal(bucket, dm.noise_bucket(level, 0.7, 10))
  np.testing.assert_allclose(float(jnp.var(noisy)), 1.0, atol=0.05)  # variance preserving
  clean = dm.corrupt_context(z, jnp.zeros(256), jnp.ones_like(z))
  np.testing.assert_array_equal(clean, z)


def test_drop_context_extremes():
  z = jnp.ones((6, 3, 2, 2, 4))
  kept, dropped = dm.drop_context(z, jax.random.key(0), 0.0)
  np.testing.assert_array_equal(kept, z)
  assert not np.any(dropped)
  gone, dropped = dm.drop_context(z, jax.random.key(0), 1.0)
  assert not np.any(gone) and np.all(dropped)


def test_denoiser_input_order():
  x = jnp.zeros((1, 2, 2, 3))
  context = jnp.arange(1, 4, dtype=jnp.float32).reshape(1, 3, 1, 1, 1) * jnp.ones((1, 3, 2, 2, 3))
  inp = dm.denoiser_input(x, context)
  assert inp.shape == (1, 2, 2, 12)
  np.testing.assert_array_equal(inp[0, 0, 0], [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])


def test_context_dropout_zeroes_dropped_context_and_keeps_actions():
  b, n, c = 64, 3, 2
  target = jax.random.normal(jax.random.key(0), (b, 4, 4, c))
  context = jax.random.normal(jax.random.key(1), (b, n, 4, 4, c)) + 3.0  # never exactly zero
  actions = jnp.arange(b * n, dtype=jnp.int32).reshape(b, n)
  seen = {}

  def denoise(x, t, bucket, acts):
    seen.update(x=x, t=t, bucket=bucket, actions=acts)
    return jnp.zeros(x.shape[:-1] + (c,))

  _, weight, metrics = dm.diffusion_loss(denoise, target, context, actions, jax.random.key(2), noise_aug=False,
                                         context_dropout=0.5)
  ctx = np.asarray(seen["x"][..., c:])
  dropped = ~np.any(ctx.reshape(b, -1), axis=1)
  assert 0 < dropped.sum() < b and dropped.sum() == metrics["context_dropped"] and weight == b
  np.testing.assert_array_equal(ctx[~dropped], np.asarray(dm.denoiser_input(target, context)[..., c:])[~dropped])
  np.testing.assert_array_equal(seen["actions"], actions)
  np.testing.assert_array_equal(seen["bucket"], 0)
  assert seen["t"].shape == (b,) and int(seen["t"].min()) >= 0 and int(seen["t"].max()) < 1000


def test_dropped_context_gets_the_bucket_guidance_uses():
  b, c = 256, 2
  target = jax.random.normal(jax.random.key(0), (b, 4, 4, c))
  context = jax.random.normal(jax.random.key(1), (b, 2, 4, 4, c)) + 3.0
  seen = {}

  def denoise(x, t, bucket, acts):
    seen.update(x=x, bucket=bucket)
    return jnp.zeros(x.shape[:-1] + (c,))

  dm.diffusion_loss(denoise, target, context, jnp.zeros((b, 2), jnp.int32), jax.random.key(2), noise_aug=True,
                    context_dropout=0.3)
  dropped = ~np.any(np.asarray(seen["x"][..., c:]).reshape(b, -1), axis=1)
  buckets = np.asarray(seen["bucket"])
  assert 0 < dropped.sum() < b
  assert (buckets[dropped] == dm.DROPPED_CONTEXT_BUCKET).all() and len(set(buckets[~dropped].tolist())) > 3


def test_loss_is_mean_v_mse_summed_over_batch():
  b, c = 3, 2
  target = jax.random.normal(jax.random.key(0), (b, 4, 4, c))
  context = jnp.zeros((b, 2, 4, 4, c))

  def zero(x, t, bucket, acts):
    return jnp.zeros(x.shape[:-1] + (c,))

  loss_sum, weight, _ = dm.diffusion_loss(zero, target, context, jnp.zeros((b, 2), jnp.int32), jax.random.key(3))
  # With v = 0 the loss is E|v_target|^2 per example; recompute it from the same key split.
  t_key, noise_key, _, _ = jax.random.split(jax.random.key(3), 4)
  t = jax.random.randint(t_key, (b,), 0, 1000, jnp.int32)
  v = dm.v_target(target, jax.random.normal(noise_key, target.shape), t)
  np.testing.assert_allclose(loss_sum, jnp.sum(jnp.mean(v ** 2, axis=(1, 2, 3))), rtol=1e-6)
  assert weight == b


@pytest.mark.timeout(60)
def test_tiny_denoiser_overfits_one_batch():
  """A per-pixel MLP on (x_t, context, t) learns v when the context holds the target (fixed key, one batch)."""
  b, n, c, hidden = 8, 2, 4, 64
  target = jax.random.normal(jax.random.key(0), (b, 8, 8, c))
  context = jnp.stack([target] * n, axis=1)
  actions = jnp.zeros((b, n), jnp.int32)
  k1, k2 = jax.random.split(jax.random.key(1))
  params = {"w1": jax.random.normal(k1, ((1 + n) * c + 2, hidden)) * 0.3, "b1": jnp.zeros(hidden),
            "w2": jax.random.normal(k2, (hidden, c)) * 0.1, "b2": jnp.zeros(c)}

  def denoise(p, x, t, bucket, acts):
    a = jnp.asarray(dm.ALPHAS_CUMPROD)[t]
    feats = jnp.broadcast_to(jnp.stack([jnp.sqrt(a), jnp.sqrt(1 - a)], -1)[:, None, None], x.shape[:-1] + (2,))
    h = jax.nn.gelu(jnp.concatenate([x, feats], -1) @ p["w1"] + p["b1"])
    return h @ p["w2"] + p["b2"]

  def loss(p):
    loss_sum, weight, _ = dm.diffusion_loss(lambda *a: denoise(p, *a), target, context, actions, jax.random.key(2),
                                            noise_aug=False, context_dropout=0.0)
    return loss_sum / weight

  opt = optax.adam(1e-2)

  @jax.jit
  def step(p, s):
    value, grads = jax.value_and_grad(loss)(p)
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s, value

  state, losses = opt.init(params), []
  for _ in range(100):
    params, state, value = step(params, state)
    losses.append(float(value))
  assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])
