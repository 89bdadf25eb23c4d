"""The autoencoder job's loss: stage one reconstructs latent samples (noise from the examples' seeds); the
decoder fine-tuning decodes the posterior mean, the latents the denoiser trains on and generates."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lwjax.models.autoencoder import Autoencoder, AutoencoderConfig
from lwjax.projects.gamengen.jobs.train_autoencoder import autoencoder_loss, latent_scaling_factor


def test_decoder_fine_tuning_decodes_the_posterior_mean():
  model = Autoencoder(AutoencoderConfig(block_out_channels=(16, 16), layers_per_block=1, norm_groups=8),
                      rngs=nnx.Rngs(0))
  images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1.0, maxval=1.0)
  batches = [{"image": images, "seed": jnp.array(s, jnp.uint32)} for s in ([1, 2], [3, 4])]
  mean, _ = model.encode(images)
  expected = jnp.sum(jnp.mean((model.decode(mean) - images) ** 2, axis=(1, 2, 3)))
  tuned = [autoencoder_loss(model, b, kl_weight=1e-6, decoder_only=True)[0] for b in batches]
  np.testing.assert_allclose(tuned, [expected, expected], rtol=1e-5)  # no sampling noise
  full = [autoencoder_loss(model, b, kl_weight=0.0)[0] for b in batches]
  assert abs(float(full[0] - full[1])) > 1e-6  # stage one samples, with each example's seed


def test_latent_scaling_factor_gives_unit_variance_latents():
  model = Autoencoder(AutoencoderConfig(block_out_channels=(16, 16), layers_per_block=1, norm_groups=8),
                      rngs=nnx.Rngs(0))
  batches = [{"image": jax.random.uniform(jax.random.key(i), (2, 16, 16, 3), minval=-1.0, maxval=1.0)}
             for i in range(3)]
  factor = latent_scaling_factor(model, batches)
  scaled = np.concatenate([np.asarray(model.encode(b["image"])[0]) for b in batches]) * factor
  assert abs(float(scaled.std()) - 1.0) < 1e-4
