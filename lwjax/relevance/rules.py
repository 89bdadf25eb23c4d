"""AttnLRP propagation rules as modified backward passes (Achtibat et al. 2024, "AttnLRP: Attention-Aware
Layer-wise Relevance Propagation for Transformers", ICML 2024, Sec. 3; the rules LRP4RAG, arXiv 2408.15533, uses).

Gradient x Input formulation, as in the LXT library's "efficient" mode: each function computes the ordinary
forward, and its `jax.custom_vjp` backward is rewritten so that relevance is always cotangent x value. If the
cotangent reaching an output y is g_y, its relevance is R_y = y * g_y, and the cotangent g_x returned for an
input x makes R_x = x * g_x the relevance the rule assigns to x. A forward assembled from these functions and
from operations whose plain gradient already is the AttnLRP rule (sums: the epsilon rule of Eq. 8 with
epsilon 0; linear maps without bias such as RoPE, the attention scale and dtype casts: LRP-0), differentiated by
one ordinary `jax.vjp` with the explained logit seeded by 1 (R = the logit), leaves the input relevance as
`x * grad`. Where a tensor feeds several consumers the cotangents add, which is LRP's sum of the messages.

Parameters (weights, norm scales) are constants of the rules: their cotangents are zero.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lwjax.models.gpt import dense

DEFAULT_EPSILON = 1e-6


def stabilize(z, epsilon):
  """z + epsilon * sign(z), with sign(0) = +1: the LRP-epsilon denominator, never zero, same sign as z."""
  return z + jnp.where(z >= 0, epsilon, -epsilon).astype(z.dtype)


def _kept_fraction(g, y, epsilon):
  """g * y / stabilize(y) in float32: the cotangent an epsilon rule passes on (R_y / stabilize(y))."""
  y32 = y.astype(jnp.float32)
  return g.astype(jnp.float32) * y32 / stabilize(y32, epsilon)


# ---- epsilon rule: x @ W (+ b) ----

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _epsilon_dense(x, w, b, epsilon, in_dims):
  y = dense(x, w, in_dims)
  return y if b is None else y + b


def _epsilon_dense_fwd(x, w, b, epsilon, in_dims):
  y = _epsilon_dense(x, w, b, epsilon, in_dims)
  return y, (x, w, b, y)


def _epsilon_dense_bwd(epsilon, in_dims, res, g):
  x, w, b, y = res
  _, vjp = jax.vjp(lambda x_: dense(x_, w, in_dims), x)
  (g_x,) = vjp(_kept_fraction(g, y, epsilon).astype(y.dtype))
  return g_x, jnp.zeros_like(w), None if b is None else jnp.zeros_like(b)


_epsilon_dense.defvjp(_epsilon_dense_fwd, _epsilon_dense_bwd)


def epsilon_dense(x, w, b=None, *, epsilon: float = DEFAULT_EPSILON, in_dims: int = 1):
  """y = x . W (+ b), contracting x's last `in_dims` dims (`lwjax.models.gpt.dense`), under the LRP-epsilon rule.

  AttnLRP Eq. 8 (Bach et al. 2015, Eq. 16): R_i = sum_j x_i W_ij R_j / (y_j + epsilon sign(y_j)). The bias and
  the stabiliser absorb b_j / (y_j + eps sign y_j) and eps / (...) of R_j; nothing else is lost. As a backward:
  g_x = W . (g_y * y / (y + eps sign y)). `epsilon` is a Python float (static), default 1e-6.
  """
  return _epsilon_dense(x, w, b, epsilon, in_dims)


# ---- identity rule: RMSNorm, element-wise nonlinearities ----

@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_norm_identity(x, scale, eps):
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


def _rms_norm_identity_fwd(x, scale, eps):
  x32 = x.astype(jnp.float32)
  inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return _rms_norm_identity(x, scale, eps), (inv_rms, scale)


def _rms_norm_identity_bwd(eps, res, g):
  inv_rms, scale = res
  return (g.astype(jnp.float32) * inv_rms * scale.astype(jnp.float32)).astype(g.dtype), jnp.zeros_like(scale)


_rms_norm_identity.defvjp(_rms_norm_identity_fwd, _rms_norm_identity_bwd)


def rms_norm_identity(x, scale, eps: float):
  """RMSNorm (as `lwjax.models.gpt.RMSNorm`) under the identity rule (AttnLRP Prop. 3.4 and Eq. 9): R_x = R_y.

  The normaliser 1/rms(x) is treated as a constant (the gradient of x * stop_gradient(1/rms) * scale), so
  g_x = g_y * scale / rms(x) and x * g_x = y * g_y element by element.
  """
  return _rms_norm_identity(x, scale, eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def elementwise_identity(fn, x):
  """y = fn(x) for an element-wise fn with fn(0) = 0 (SiLU, GELU, ...), under the identity rule (AttnLRP Eq. 9):
  R_x = R_y element by element, i.e. g_x = g_y * fn(x) / x (0 where x = 0, where R_y = fn(0) g_y = 0 too)."""
  return fn(x)


def _elementwise_identity_fwd(fn, x):
  y = fn(x)
  return y, (x, y)


def _elementwise_identity_bwd(fn, res, g):
  x, y = res
  nonzero = x != 0
  ratio = jnp.where(nonzero, y.astype(jnp.float32) / jnp.where(nonzero, x, 1).astype(jnp.float32), 0.0)
  return ((g.astype(jnp.float32) * ratio).astype(x.dtype),)


elementwise_identity.defvjp(_elementwise_identity_fwd, _elementwise_identity_bwd)


# ---- uniform rule: products of two activations ----

@jax.custom_vjp
def uniform_product(a, b):
  """a * b (element-wise, broadcasting) under the uniform rule (AttnLRP Prop. 3.2): R_a = R_b = R_y / 2.

  g_a = g_y * b / 2, g_b = g_y * a / 2 (the plain gradient would give each factor all of R_y).
  """
  return a * b


def _uniform_product_fwd(a, b):
  return a * b, (a, b)


def _uniform_product_bwd(res, g):
  a, b = res
  _, vjp = jax.vjp(jnp.multiply, a, b)
  return vjp(g / 2)


uniform_product.defvjp(_uniform_product_fwd, _uniform_product_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _uniform_einsum(spec, a, b, epsilon):
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _uniform_einsum_fwd(spec, a, b, epsilon):
  y = _uniform_einsum(spec, a, b, epsilon)
  return y, (a, b, y)


def _uniform_einsum_bwd(spec, epsilon, res, g):
  a, b, y = res
  _, vjp = jax.vjp(functools.partial(jnp.einsum, spec, preferred_element_type=jnp.float32), a, b)
  g_a, g_b = vjp(_kept_fraction(g, y, epsilon) / 2)
  return g_a.astype(a.dtype), g_b.astype(b.dtype)


_uniform_einsum.defvjp(_uniform_einsum_fwd, _uniform_einsum_bwd)


def uniform_einsum(spec: str, a, b, *, epsilon: float = DEFAULT_EPSILON):
  """A bilinear contraction (`jnp.einsum(spec, a, b)`, float32 result) under AttnLRP Prop. 3.3: the epsilon rule
  over the sum, then the uniform rule on each product a_ik b_kj.

  R_a_ik = sum_j a_ik b_kj R_ij / (2 (y_ij + eps sign y_ij)), R_b likewise: g_a = vjp_a(g_y y / (2 stab(y))).
  Used for q . k (the attention scores) and for the attention weights x values.
  """
  return _uniform_einsum(spec, a, b, epsilon)


# ---- softmax ----

@jax.custom_vjp
def softmax_rule(x):
  """softmax over the last axis, under AttnLRP Prop. 3.1 (Deep Taylor decomposition at x, with bias):

    R_x_i = x_i (R_s_i - s_i sum_j R_s_j).

  Not conservative: sum_i R_x_i = sum_i x_i R_s_i - (sum_i s_i x_i) sum_j R_s_j; the rest is the bias term of
  the expansion. Entries masked with a large negative logit have s_i = 0 and get R_x_i = 0 (LXT sets their
  x_i to 0 for the same reason). In the Gradient x Input form g_x = R_s - s sum R_s with R_s = s * g_s, which
  is the ordinary softmax gradient: the rule needs no modification of the backward, spelled out here so that
  every AttnLRP rule is explicit.
  """
  return jax.nn.softmax(x, axis=-1)


def _softmax_rule_fwd(x):
  s = jax.nn.softmax(x, axis=-1)
  return s, s


def _softmax_rule_bwd(s, g):
  r_s = s * g
  return (r_s - s * jnp.sum(r_s, axis=-1, keepdims=True),)


softmax_rule.defvjp(_softmax_rule_fwd, _softmax_rule_bwd)
