"""Sampling: greedy and its limits, the top-k / top-p support, the distribution, seeds."""

import jax
import numpy as np
import pytest

from lwjax.serving.sampling import SamplingParams, batch_arrays, sample


def _sample(logits, params, seeds=None, steps=None):
  n = len(params)
  return np.asarray(sample(np.asarray(logits, np.float32),
                           *batch_arrays(params, seeds or [0] * n, steps or [0] * n)))


def test_greedy_top_k_1_and_tiny_top_p_all_take_the_argmax():
  logits = jax.random.normal(jax.random.key(0), (5, 50))
  argmax = np.argmax(logits, -1)
  for p in (SamplingParams(temperature=0.0), SamplingParams(top_k=1), SamplingParams(top_p=1e-6)):
    np.testing.assert_array_equal(_sample(logits, [p] * 5, seeds=list(range(5))), argmax)


def test_support_is_limited_by_top_k_and_top_p():
  logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 400))
  top2 = set(_sample(logits, [SamplingParams(top_k=2)] * 400, seeds=list(range(400))))
  assert top2 == {0, 1}
  # Nucleus 0.7: {0.5, 0.3} reach it; token 2 and 3 are never drawn.
  nucleus = set(_sample(logits, [SamplingParams(top_p=0.7)] * 400, seeds=list(range(400))))
  assert nucleus == {0, 1}


def test_temperature_one_follows_the_softmax():
  probs = np.array([0.6, 0.3, 0.1])
  n = 4000
  draws = _sample(np.log(np.tile(probs, (n, 1))), [SamplingParams()] * n, seeds=list(range(n)))
  freq = np.bincount(draws, minlength=3) / n
  np.testing.assert_allclose(freq, probs, atol=0.03)  # ~4 standard errors at n = 4000


def test_a_request_draw_depends_only_on_its_seed_and_step():
  logits = jax.random.normal(jax.random.key(1), (3, 100))
  params = [SamplingParams(temperature=1.5)] * 3
  a = _sample(logits, params, seeds=[7, 8, 9], steps=[0, 1, 2])
  b = _sample(logits[::-1], params, seeds=[9, 8, 7], steps=[2, 1, 0])[::-1]
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, _sample(logits, params, seeds=[7, 8, 9], steps=[1, 2, 3]))


@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("temperature", -1.0), ("top_p", 0.0),
                                         ("top_k", -1), ("n", 0), ("stop", ("",))])
def test_bad_parameters_name_the_field(field, value):
  with pytest.raises(ValueError, match=f"^{field}:"):
    SamplingParams(**{field: value})
