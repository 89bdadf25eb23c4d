"""GroupNorm of the diffusion blocks (SD's ResNet and attention norms) against a plain-JAX reference and torch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lwjax.models.diffusion_blocks import GroupNorm, Numerics


def _reference(x, scale, bias, groups, eps):
  """The textbook form: one reduction over a `[b, ..., groups, c / groups]` view."""
  c = x.shape[-1]
  g = x.reshape(*x.shape[:-1], groups, c // groups)
  axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
  mean = g.mean(axes, keepdims=True)
  var = jnp.square(g - mean).mean(axes, keepdims=True)
  return ((g - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape) * scale + bias


def _norm(channels, groups, seed=0):
  norm = GroupNorm(channels, Numerics(), groups=groups, eps=1e-6, rngs=nnx.Rngs(seed))
  key1, key2 = jax.random.split(jax.random.key(seed + 1))
  norm.scale[...] = 1 + 0.3 * jax.random.normal(key1, (channels,))
  norm.bias[...] = 0.3 * jax.random.normal(key2, (channels,))
  return norm


@pytest.mark.parametrize("shape,groups", [((2, 6, 10, 16), 8), ((3, 5, 32), 32), ((2, 4, 4, 2, 12), 3), ((4, 8), 2)])
def test_matches_reference_forward_and_gradients(shape, groups):
  norm = _norm(shape[-1], groups)
  # An offset mean: a one-pass E[x^2] - E[x]^2 would lose digits here; the two-pass form must not.
  x = 3 * jax.random.normal(jax.random.key(2), shape) + 20
  scale, bias = norm.scale[...], norm.bias[...]
  np.testing.assert_allclose(norm(x), _reference(x, scale, bias, groups, 1e-6), atol=2e-5, rtol=1e-5)
  cotangent = jax.random.normal(jax.random.key(3), shape)
  grad_norm, grad_x = nnx.grad(lambda m, x: (m(x) * cotangent).sum(), argnums=(0, 1))(norm, x)
  want = jax.grad(lambda *a: (_reference(*a, groups, 1e-6) * cotangent).sum(), argnums=(0, 1, 2))(x, scale, bias)
  for got, expected in zip((grad_x, grad_norm.scale[...], grad_norm.bias[...]), want, strict=True):
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=1e-4)


def test_matches_torch_group_norm():
  torch = pytest.importorskip("torch")
  norm = _norm(32, 8)
  x = np.array(2 * jax.random.normal(jax.random.key(4), (2, 7, 9, 32)) - 1)
  want = torch.nn.functional.group_norm(torch.from_numpy(x).permute(0, 3, 1, 2), 8,
                                        torch.from_numpy(np.array(norm.scale[...])),
                                        torch.from_numpy(np.array(norm.bias[...])), eps=1e-6)
  np.testing.assert_allclose(norm(jnp.asarray(x)), want.permute(0, 2, 3, 1).numpy(), atol=1e-5, rtol=1e-5)


def test_bfloat16_output_dtype():
  norm = GroupNorm(16, Numerics(dtype="bfloat16", param_dtype="float32"), groups=4, rngs=nnx.Rngs(0))
  y = norm(jnp.ones((1, 3, 3, 16), jnp.bfloat16) * jnp.arange(16, dtype=jnp.bfloat16))
  assert y.dtype == jnp.bfloat16 and bool(jnp.isfinite(y.astype(jnp.float32)).all())
