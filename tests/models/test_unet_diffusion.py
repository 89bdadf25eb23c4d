"""GameNGen UNet (arXiv 2408.14837 §3.2): SD-v1.4's parameter count, conditioning paths, gradients, bf16."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs.unet
from lwjax.config import ConfigError, validate
from lwjax.models.unet_diffusion import CONFIG_SCHEMA, UNet, UNetConfig, timestep_embedding

SD14_UNET_PARAMS = 859_520_964  # diffusers `UNet2DConditionModel` of CompVis/stable-diffusion-v1-4


def _config(name, **overrides):
  return UNetConfig.from_dict(configs.unet.get(name, **overrides))


def _build(cfg):
  # Threefry's CPU compile costs about a second per parameter shape; the rbg generator keeps init quick.
  return UNet(cfg, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))


@functools.lru_cache
def _abstract_params(cfg):
  return nnx.state(nnx.eval_shape(lambda: UNet(cfg, rngs=nnx.Rngs(0))), nnx.Param)


def _count(cfg):
  return sum(x.size for x in jax.tree.leaves(_abstract_params(cfg)))


def _loss(model, x, t, bucket, actions):
  out = model(x, t, bucket, actions)
  return jnp.mean(jnp.square(out)), out


_loss_and_grad = nnx.jit(nnx.value_and_grad(_loss, has_aux=True))


def _inputs(cfg):
  """A batch of 2 at 8x8 latents (one shape for every test, so the jitted functions compile once)."""
  keys = jax.random.split(jax.random.key(0), 2)
  x = jax.random.normal(keys[0], (2, 8, 8, cfg.in_channels))
  actions = jax.random.randint(keys[1], (2, cfg.context_frames), 0, cfg.num_actions)
  return x, jnp.array([10, 700]), jnp.array([0, 7]), actions


@pytest.fixture(scope="module")
def tiny():
  return _build(_config("unet_tiny"))


def test_sd14_parameter_count():
  cfg = _config("sd14")
  assert (cfg.in_channels, cfg.context_frames, cfg.cross_attention_dim) == (260, 64, 768)
  expected = (SD14_UNET_PARAMS
              + (cfg.in_channels - 4) * 3 * 3 * 320  # conv_in reads 64 context latents besides the noisy one
              + cfg.num_actions * 768 + cfg.context_frames * 768  # action and context-slot embeddings
              + cfg.num_noise_buckets * 1280)  # noise-bucket embedding, added to the time embedding
  assert expected == 860_333_252
  assert _count(cfg) == expected


@pytest.mark.parametrize("name, expected", [("unet_small", 35_014_596), ("unet_tiny", 206_820)])
def test_small_preset_parameter_counts(name, expected):
  assert _count(_config(name)) == expected


def test_every_parameter_has_logical_axes():
  for path, variable in nnx.to_flat_state(_abstract_params(_config("sd14"))):
    axes = variable.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == len(variable.shape), path


def test_output_shape_and_finite_gradient(tiny):
  x, t, bucket, actions = _inputs(tiny.cfg)
  (loss, out), grads = _loss_and_grad(tiny, x, t, bucket, actions)
  assert out.shape == (2, 8, 8, tiny.cfg.latent_channels) and out.dtype == jnp.float32
  leaves = jax.tree.leaves(grads)
  assert np.isfinite(float(loss)) and all(np.isfinite(np.asarray(g)).all() for g in leaves)
  # Every parameter gets a gradient (no disconnected block), the action table only at the ids used.
  zero = [p for p, g in nnx.to_flat_state(grads) if not np.any(np.asarray(g.get_value())) and "action" not in p[0]]
  assert zero == []
  assert np.any(np.asarray(grads["action_embedding"]["embedding"][...]))


def test_output_depends_on_every_conditioning_input(tiny):
  cfg = tiny.cfg
  x, t, bucket, actions = _inputs(cfg)
  base = np.asarray(_loss_and_grad(tiny, x, t, bucket, actions)[0][1])
  ctx = cfg.latent_channels  # channels [0, latent) hold the noisy latent, the rest the past frames
  variants = {
      "noisy latent": (x.at[..., :ctx].add(1.0), t, bucket, actions),
      "context frames": (x.at[..., ctx:].add(1.0), t, bucket, actions),
      "timestep": (x, t + 100, bucket, actions),
      "noise bucket": (x, t, bucket + 1, actions),
      "last action": (x, t, bucket, actions.at[:, -1].set((actions[:, -1] + 1) % cfg.num_actions)),
      "action order": (x, t, bucket, actions[:, ::-1]),
  }
  for name, args in variants.items():
    out = np.asarray(_loss_and_grad(tiny, *args)[0][1])
    assert np.abs(out - base).max() > 1e-4, f"output does not depend on the {name}"


def test_bfloat16_compute_with_float32_params(tiny):
  model = _build(_config("unet_tiny", dtype="bfloat16"))
  assert model.conv_in.kernel[...].dtype == jnp.float32
  args = _inputs(model.cfg)
  out = nnx.jit(lambda m, *a: m(*a))(model, *args)
  ref = _loss_and_grad(tiny, *args)[0][1]
  assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
  np.testing.assert_allclose(out, ref, atol=0.05 * float(jnp.abs(ref).max()))


def test_timestep_embedding_is_diffusers_sinusoid():
  t = jnp.array([0.0, 3.0, 999.0])
  emb = timestep_embedding(t, 8)  # flip_sin_to_cos: [cos | sin]
  freqs = np.exp(-math.log(10000.0) * np.arange(4) / 4)
  angles = np.asarray(t)[:, None] * freqs
  np.testing.assert_allclose(emb, np.concatenate([np.cos(angles), np.sin(angles)], 1), atol=1e-4)
  np.testing.assert_allclose(timestep_embedding(t, 8, flip_sin_to_cos=False)[:, :4], np.sin(angles), atol=1e-4)


def test_rejects_wrong_inputs(tiny):
  x, t, bucket, actions = _inputs(tiny.cfg)
  with pytest.raises(ValueError, match="in_channels|multiples"):
    tiny(x[..., :4], t, bucket, actions)
  with pytest.raises(ValueError, match="actions"):
    tiny(x, t, bucket, actions[:, :2])


def test_config_validation():
  for name in configs.unet.PRESETS:
    config = configs.unet.get(name)
    validate(config, CONFIG_SCHEMA)
    assert UNetConfig.from_dict(config) == configs.unet.PRESETS[name]
  with pytest.raises(ConfigError, match="attention_levels"):
    validate(configs.unet.get("unet_tiny", attention_levels=(1, 0)), CONFIG_SCHEMA)
  with pytest.raises(ValueError, match="one entry per"):
    _config("unet_tiny", attention_levels=(True,))
  with pytest.raises(ValueError, match="num_heads"):
    _config("unet_tiny", num_heads=3)
