"""PSNR and SSIM: known values, and SSIM against an independent SciPy implementation of scikit-image's."""

import numpy as np
import pytest
from scipy import ndimage

from lwjax.projects.gamengen import metrics


def gaussian_filter(im):
  return ndimage.gaussian_filter(im, sigma=1.5, truncate=3.5, mode="reflect")


def reference_ssim(a, b, data_range, sample_covariance=True):
  """skimage.metrics.structural_similarity(a, b, gaussian_weights=True, channel_axis=-1, data_range=...)
  for one frame [H, W, C]: reflect-padded Gaussian filtering, then the border of 5 pixels cropped."""
  values = []
  for ch in range(a.shape[-1]):
    x, y = a[..., ch].astype(np.float64), b[..., ch].astype(np.float64)
    cov_norm = 121 / 120 if sample_covariance else 1.0
    f = gaussian_filter
    ux, uy = f(x), f(y)
    vx, vy, vxy = cov_norm * (f(x * x) - ux * ux), cov_norm * (f(y * y) - uy * uy), cov_norm * (f(x * y) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    values.append(s[5:-5, 5:-5].mean())
  return np.mean(values)


def frames(rng, shape=(2, 24, 30, 3)):
  """Smoothed random frames: structure at several scales, not just pixel noise."""
  return ndimage.uniform_filter(rng.integers(0, 256, shape).astype(float), size=(1, 5, 5, 1)).round().astype(np.uint8)


def degrade(rng, a, noise):
  return np.clip(a + rng.normal(0, noise, a.shape), 0, 255).astype(np.uint8)


def test_psnr_known_mse():
  a = np.zeros((2, 8, 8, 3), np.uint8)
  b = a + np.uint8(10)  # MSE 100
  np.testing.assert_allclose(metrics.psnr(a, b), [10 * np.log10(255 ** 2 / 100)] * 2, rtol=1e-6)
  np.testing.assert_allclose(metrics.psnr(a / 255.0, b / 255.0), 10 * np.log10(255 ** 2 / 100), rtol=1e-5)
  assert np.isinf(metrics.psnr(a, a)).all()
  assert metrics.psnr(a[0], b[0]).shape == ()


def test_psnr_needs_a_data_range_for_mixed_dtypes():
  a = np.zeros((8, 8, 3), np.uint8)
  with pytest.raises(ValueError, match="data_range"):
    metrics.psnr(a, a.astype(np.float32))
  np.testing.assert_allclose(metrics.psnr(a, a.astype(np.float32) + 10, data_range=255), 28.1308, atol=1e-3)


def test_ssim_of_identical_frames_is_one():
  a = frames(np.random.default_rng(0))
  np.testing.assert_allclose(metrics.ssim(a, a), [1.0, 1.0], atol=1e-6)


@pytest.mark.parametrize("sample_covariance", [True, False])
def test_ssim_matches_reference(sample_covariance):
  rng = np.random.default_rng(1)
  for noise in (5, 40):
    a = frames(rng)
    b = degrade(rng, a, noise)
    got = np.asarray(metrics.ssim(a, b, sample_covariance=sample_covariance))
    want = [reference_ssim(a[i], b[i], 255, sample_covariance) for i in range(len(a))]
    np.testing.assert_allclose(got, want, atol=2e-5)
    got_unit = metrics.ssim(a / 255.0, b / 255.0, sample_covariance=sample_covariance)
    np.testing.assert_allclose(got_unit, want, atol=2e-5)


def test_ssim_falls_with_noise_and_checks_size():
  rng = np.random.default_rng(2)
  a = frames(rng)
  slightly, very = degrade(rng, a, 5), degrade(rng, a, 60)
  assert np.all(metrics.ssim(a, very) < metrics.ssim(a, slightly))
  with pytest.raises(ValueError, match="window"):
    metrics.ssim(a[:, :10], a[:, :10])


def test_gaussian_window():
  w = metrics.gaussian_window()
  assert w.shape == (11,)
  np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(w, w[::-1])


def correlated_windows(rng, num_episodes=10, windows_per_episode=20, true_diff=0.3):
  """Differences whose windows share their episode's offset (sd 1) beside their own noise (sd 0.2)."""
  episodes = np.repeat(np.arange(num_episodes), windows_per_episode)
  offset = rng.normal(0.0, 1.0, num_episodes)[episodes]
  return true_diff + offset + rng.normal(0.0, 0.2, len(episodes)), episodes


def covers(interval, value):
  return interval["ci95"][0] <= value <= interval["ci95"][1]


def test_paired_bootstrap_covers_the_true_difference_about_95_percent_of_the_time():
  rng = np.random.default_rng(0)
  independent = [covers(metrics.paired_bootstrap(rng.normal(0.3, 1.0, 60), num_resamples=500, seed=i), 0.3)
                 for i in range(100)]
  assert 0.88 <= np.mean(independent) <= 1.0
  clustered, naive = [], []
  for i in range(60):
    diff, episodes = correlated_windows(rng)
    clustered.append(covers(metrics.paired_bootstrap(diff, episodes, num_resamples=300, seed=i), 0.3))
    naive.append(covers(metrics.paired_bootstrap(diff, num_resamples=300, seed=i), 0.3))
  assert np.mean(clustered) >= 0.8 and np.mean(naive) <= 0.6  # windows as independent: far too narrow


def test_cluster_bootstrap_is_wider_than_the_naive_one_when_episodes_are_correlated():
  diff, episodes = correlated_windows(np.random.default_rng(1))
  cluster = metrics.paired_bootstrap(diff, episodes)
  naive = metrics.paired_bootstrap(diff)
  width = {name: r["ci95"][1] - r["ci95"][0] for name, r in (("cluster", cluster), ("naive", naive))}
  assert width["cluster"] > 2 * width["naive"]
  assert cluster["mean_diff"] == pytest.approx(diff.mean()) == naive["mean_diff"]
  assert (cluster["n_windows"], cluster["n_episodes"], cluster["resampled"]) == (
      200, 10, "episodes, then windows within them")
  assert cluster == metrics.paired_bootstrap(diff, episodes)  # a fixed seed: the same interval


def test_bootstrap_of_one_episode_resamples_windows_and_refuses_non_finite_differences():
  diff = np.random.default_rng(2).normal(0.3, 1.0, 40)
  one = metrics.paired_bootstrap(diff, np.full(40, 7))
  assert one["resampled"] == "windows" and one["n_episodes"] == 1 and one == metrics.paired_bootstrap(diff)
  with pytest.raises(ValueError, match="1 not finite"):
    metrics.paired_bootstrap(np.append(diff, np.inf))
