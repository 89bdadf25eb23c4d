"""The decoder's nearest 2x upsample + 3x3 conv, computed as four 2x2 phase convolutions, against the form as
written (repeat, then convolve) and against torch's nearest interpolation + conv2d."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lwjax.models import diffusion_blocks
from lwjax.models.diffusion_blocks import Numerics, Upsample, nearest_upsample_conv, nearest_upsample_conv_reference


@pytest.mark.parametrize("shape,out", [((2, 5, 7, 3), 4), ((1, 1, 1, 2), 3), ((1, 8, 12, 16), 16), ((3, 4, 9, 6), 2)])
def test_matches_reference(shape, out):
  kx, kw = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, shape)
  kernel = jax.random.normal(kw, (3, 3, shape[-1], out)) / 3
  got = jax.jit(nearest_upsample_conv)(x, kernel)
  assert got.shape == (shape[0], 2 * shape[1], 2 * shape[2], out)
  np.testing.assert_allclose(got, nearest_upsample_conv_reference(x, kernel), atol=1e-5, rtol=1e-5)


def test_gradients_are_the_reference_gradients():  # differentiated, it runs the reference (a custom VJP)
  kx, kw, kc = jax.random.split(jax.random.key(1), 3)
  x, kernel = jax.random.normal(kx, (2, 3, 5, 4)), jax.random.normal(kw, (3, 3, 4, 6)) / 3
  cotangent = jax.random.normal(kc, (2, 6, 10, 6))
  got, want = (jax.grad(lambda x, k, f=f: (f(x, k) * cotangent).sum(), argnums=(0, 1))(x, kernel)
               for f in (nearest_upsample_conv, nearest_upsample_conv_reference))
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
  value, _ = jax.value_and_grad(lambda x: (nearest_upsample_conv(x, kernel) * cotangent).sum())(x)
  np.testing.assert_allclose(value, (nearest_upsample_conv_reference(x, kernel) * cotangent).sum(), rtol=1e-5)


@pytest.mark.parametrize("min_work", [0, 2 ** 40])  # the phase form, and the repeat-then-convolve form
def test_module_is_the_same_function_on_both_sides_of_the_size_threshold(monkeypatch, min_work):
  monkeypatch.setattr(diffusion_blocks, "SUBPIXEL_MIN_WORK", min_work)
  up = Upsample(8, Numerics(), rngs=nnx.Rngs(0))
  up.conv.bias[...] = jax.random.normal(jax.random.key(1), (8,))
  x = jax.random.normal(jax.random.key(2), (2, 3, 5, 8))
  want = nearest_upsample_conv_reference(x, up.conv.kernel[...]) + up.conv.bias[...]
  np.testing.assert_allclose(up(x), want, atol=1e-5, rtol=1e-5)


def test_matches_torch_interpolate_and_conv2d():
  torch = pytest.importorskip("torch")
  x = np.asarray(jax.random.normal(jax.random.key(3), (2, 6, 10, 5)))
  kernel = np.asarray(jax.random.normal(jax.random.key(4), (3, 3, 5, 7)) / 4)
  xt = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), scale_factor=2.0, mode="nearest")
  want = torch.nn.functional.conv2d(xt, torch.from_numpy(kernel).permute(3, 2, 0, 1), padding=1)
  np.testing.assert_allclose(nearest_upsample_conv(jnp.asarray(x), jnp.asarray(kernel)),
                             want.permute(0, 2, 3, 1).numpy(), atol=1e-5, rtol=1e-5)
