"""Resampling relevance vectors to a fixed length (LRP4RAG's features): against np.interp, ramps, edge cases."""

import numpy as np
import pytest

from lwjax.relevance.features import resample


@pytest.mark.parametrize(("n", "length"), [(7, 220), (300, 220), (5, 5), (2, 9), (13, 2)])
def test_resample_matches_linear_interpolation(n, length):
  rng = np.random.default_rng(n * 1000 + length)
  vector = rng.standard_normal(n)
  expected = np.interp(np.linspace(0, n - 1, length), np.arange(n), vector)
  out = resample(vector, length)
  assert out.shape == (length,) and out.dtype == np.float32
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  assert out[0] == pytest.approx(vector[0], abs=1e-6) and out[-1] == pytest.approx(vector[-1], abs=1e-6)


def test_resample_keeps_a_ramp_and_the_identity():
  np.testing.assert_allclose(resample(np.arange(4.0), 7), np.arange(7) * 0.5, atol=1e-6)
  vector = np.random.default_rng(0).standard_normal(11)
  np.testing.assert_allclose(resample(vector, 11), vector, atol=1e-6)


def test_resample_works_along_the_last_axis_of_a_batch():
  batch = np.random.default_rng(1).standard_normal((3, 4, 9))
  out = resample(batch, 20)
  assert out.shape == (3, 4, 20)
  np.testing.assert_allclose(out[2, 1], resample(batch[2, 1], 20), atol=1e-6)


def test_resample_edge_cases():
  np.testing.assert_allclose(resample([2.5], 4), [2.5] * 4)
  np.testing.assert_allclose(resample([1.0, 3.0, 5.0], 1), [1.0])
  with pytest.raises(ValueError, match="empty"):
    resample([], 4)
  with pytest.raises(ValueError, match="length"):
    resample([1.0, 2.0], 0)
