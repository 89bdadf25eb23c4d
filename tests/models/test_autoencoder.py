"""KL autoencoder (GameNGen §3.2, SD-v1.4's VAE): 8x-down NHWC shapes, SD's parameter count, logical axes, bf16."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

import configs.autoencoder
import configs.mesh
from lwjax.config import ConfigError, validate
from lwjax.models import logical
from lwjax.models.autoencoder import CONFIG_SCHEMA, Autoencoder, AutoencoderConfig

SD14_VAE_PARAMS = 83_653_863  # diffusers `AutoencoderKL` of CompVis/stable-diffusion-v1-4


def _config(name, **overrides):
  return AutoencoderConfig.from_dict(configs.autoencoder.get(name, **overrides))


def _build(cfg):
  # Threefry's CPU compile costs about a second per parameter shape; the rbg generator keeps init quick.
  return Autoencoder(cfg, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))


@functools.lru_cache
def _abstract_params(cfg):
  return nnx.state(nnx.eval_shape(lambda: Autoencoder(cfg, rngs=nnx.Rngs(0))), nnx.Param)


@nnx.jit
def _forward(model, x, key):
  return model(x, key)


@pytest.fixture(scope="module")
def tiny():
  return _build(_config("ae_tiny"))


@pytest.mark.parametrize("name, expected", [("sd14", SD14_VAE_PARAMS), ("ae_small", 5_252_487),
                                            ("ae_tiny", 316_695)])
def test_preset_parameter_counts(name, expected):
  cfg = _config(name)
  assert sum(x.size for x in jax.tree.leaves(_abstract_params(cfg))) == expected
  assert (cfg.downsample_factor, cfg.latent_channels) == (8, 4)


def test_every_parameter_has_logical_axes():
  for path, variable in nnx.to_flat_state(_abstract_params(_config("sd14"))):
    axes = variable.get_metadata().get("logical_axes")
    assert axes is not None and len(axes) == len(variable.shape), path


def test_shapes_are_nhwc_and_8x_down(tiny):
  x = jax.random.uniform(jax.random.key(0), (2, 32, 48, 3), minval=-1.0, maxval=1.0)
  recon, mean, logvar = _forward(tiny, x, jax.random.key(1))
  assert mean.shape == logvar.shape == (2, 4, 6, 4)
  assert recon.shape == x.shape and recon.dtype == jnp.float32
  assert np.isfinite(np.asarray(recon)).all()
  # The sampled latent is used: another key gives another reconstruction.
  assert np.abs(np.asarray(_forward(tiny, x, jax.random.key(2))[0] - recon)).max() > 1e-6


def test_batch_sharded_forward_matches(tiny):
  """Under logical-axis rules the activations are constrained and attention runs per batch shard."""
  mesh = Mesh(np.array(jax.devices()[:2]).reshape(2, 1, 1), ("data", "fsdp", "tensor"))
  x = jax.random.uniform(jax.random.key(0), (2, 32, 48, 3), minval=-1.0, maxval=1.0)
  want = _forward(tiny, x, jax.random.key(1))
  with logical.axis_rules(mesh, configs.mesh.DEFAULT_RULES):
    got = nnx.jit(lambda model, x, key: model(x, key))(tiny, x, jax.random.key(1))  # a new trace, with rules
  for g, w in zip(got, want, strict=False):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_bfloat16_compute_with_float32_params(tiny):
  model = _build(_config("ae_tiny", dtype="bfloat16"))
  assert model.encoder.conv_in.kernel[...].dtype == jnp.float32
  x = jax.random.uniform(jax.random.key(0), (1, 16, 16, 3), minval=-1.0, maxval=1.0)
  recon, mean, _ = _forward(model, x, jax.random.key(1))
  ref_recon, ref_mean, _ = _forward(tiny, x, jax.random.key(1))  # same init, float32 compute
  assert recon.dtype == jnp.float32 and np.isfinite(np.asarray(recon)).all()
  np.testing.assert_allclose(mean, ref_mean, atol=0.05 * float(jnp.abs(ref_mean).max()))
  np.testing.assert_allclose(recon, ref_recon, atol=0.05 * float(jnp.abs(ref_recon).max()))


def test_sample_latent_draws_from_the_gaussian():
  mean, logvar = jnp.full((4000,), 3.0), jnp.full((4000,), np.log(4.0))
  z = Autoencoder.sample_latent(mean, logvar, jax.random.key(0))
  assert abs(float(z.mean()) - 3.0) < 0.1 and abs(float(z.std()) - 2.0) < 0.1


def test_rejects_wrong_shapes(tiny):
  with pytest.raises(ValueError, match="multiples of 8"):
    tiny.encode(jnp.zeros((1, 20, 16, 3)))
  with pytest.raises(ValueError, match="latent channels"):
    tiny.decode(jnp.zeros((1, 2, 2, 3)))


def test_config_validation():
  for name in configs.autoencoder.PRESETS:
    config = configs.autoencoder.get(name)
    validate(config, CONFIG_SCHEMA)
    assert AutoencoderConfig.from_dict(config) == configs.autoencoder.PRESETS[name]
  with pytest.raises(ConfigError, match="block_out_channels"):
    validate(configs.autoencoder.get("ae_tiny", block_out_channels=(16, 0)), CONFIG_SCHEMA)
  with pytest.raises(ValueError, match="norm_groups"):
    AutoencoderConfig(block_out_channels=(16, 24), norm_groups=16)
  with pytest.raises(ValueError, match="unknown autoencoder preset"):
    configs.autoencoder.get("sd15")
