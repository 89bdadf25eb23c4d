"""Frame-quality metrics for GameNGen evaluation: PSNR and SSIM per frame (GameNGen, arXiv 2408.14837, sec. 4).

Inputs are frames [..., H, W, C], uint8 (data range 255) or float in [0, 1] (data range 1); both metrics
reduce the last three axes and return one value per frame, so the paper's figures are `metric(...).mean()`.
SSIM follows scikit-image's `structural_similarity(a, b, gaussian_weights=True, channel_axis=-1,
data_range=R)`: Gaussian window sigma 1.5 truncated at 3.5 sigma (11 taps), K1 = 0.01, K2 = 0.03, sample
covariance (N / (N - 1), N = 121), the mean over the positions whose window lies inside the image, averaged
over channels. `paired_bootstrap` gives a percentile interval for the mean difference of two methods scored on
the same windows, resampling episodes as clusters. LPIPS and FVD are not provided: they need pretrained
networks (AlexNet/VGG for LPIPS, I3D for FVD) whose weights cannot be downloaded here, and a metric on
untrained features would not be comparable.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SSIM_SIGMA, SSIM_TRUNCATE, SSIM_K1, SSIM_K2 = 1.5, 3.5, 0.01, 0.03


def _as_unit(a, b, data_range: float | None) -> tuple[jax.Array, jax.Array]:
  """Both frames as float32 divided by their data range (255 for uint8, else 1 unless given)."""
  a, b = jnp.asarray(a), jnp.asarray(b)
  if a.shape != b.shape:
    raise ValueError(f"frames differ in shape: {a.shape} vs {b.shape}")
  if data_range is None:
    if (a.dtype == jnp.uint8) != (b.dtype == jnp.uint8):
      raise ValueError(f"mixed dtypes {a.dtype} and {b.dtype}: pass data_range")
    data_range = 255.0 if a.dtype == jnp.uint8 else 1.0
  return a.astype(jnp.float32) / data_range, b.astype(jnp.float32) / data_range


def psnr(a, b, data_range: float | None = None) -> jax.Array:
  """Peak signal-to-noise ratio in dB per frame, 10 log10(R^2 / MSE); inf for identical frames."""
  a, b = _as_unit(a, b, data_range)
  mse = jnp.mean(jnp.square(a - b), axis=(-3, -2, -1))
  return 10.0 * jnp.log10(1.0 / mse)


def gaussian_window(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> np.ndarray:
  """Normalised 1-D Gaussian taps of radius int(truncate * sigma + 0.5), as scipy.ndimage uses."""
  radius = int(truncate * sigma + 0.5)
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  w = np.exp(-0.5 * (x / sigma) ** 2)
  return (w / w.sum()).astype(np.float32)


def _filter_valid(x_nhwc: jax.Array, w: np.ndarray) -> jax.Array:
  """Separable filter over H and W keeping only positions whose whole window lies inside the image."""
  r = len(w)
  h, wd = x_nhwc.shape[1] - r + 1, x_nhwc.shape[2] - r + 1
  x_nhwc = sum(float(w[k]) * x_nhwc[:, k:k + h] for k in range(r))
  return sum(float(w[k]) * x_nhwc[:, :, k:k + wd] for k in range(r))


def ssim(a, b, data_range: float | None = None, *, sigma: float = SSIM_SIGMA, k1: float = SSIM_K1,
         k2: float = SSIM_K2, sample_covariance: bool = True) -> jax.Array:
  """Mean structural similarity per frame (Gaussian-weighted, per channel, averaged over channels).

  Filtering without padding over the valid positions equals scikit-image's reflect-padded filtering
  followed by its crop of (win - 1) / 2 border pixels. sample_covariance=False matches Wang et al. (2004).
  """
  a, b = _as_unit(a, b, data_range)
  w = gaussian_window(sigma)
  if min(a.shape[-3:-1]) < len(w):
    raise ValueError(f"frames {a.shape[-3:-1]} smaller than the {len(w)}-pixel SSIM window")
  lead = a.shape[:-3]
  x, y = a.reshape(-1, *a.shape[-3:]), b.reshape(-1, *b.shape[-3:])
  cov_norm = len(w) ** 2 / (len(w) ** 2 - 1) if sample_covariance else 1.0
  ux, uy = _filter_valid(x, w), _filter_valid(y, w)
  vx = cov_norm * (_filter_valid(x * x, w) - ux * ux)
  vy = cov_norm * (_filter_valid(y * y, w) - uy * uy)
  vxy = cov_norm * (_filter_valid(x * y, w) - ux * uy)
  c1, c2 = k1 ** 2, k2 ** 2  # data range 1 after _as_unit; SSIM is invariant to the common scale
  s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
  return jnp.mean(s, axis=(1, 2, 3)).reshape(lead)


def paired_bootstrap(diff, episodes=None, *, num_resamples: int = 2000, seed: int = 0) -> dict:
  """95% percentile bootstrap interval of the mean of paired differences `diff` [n] (method A minus method B,
  window by window).

  With `episodes` [n] naming two or more episodes, a two-stage cluster bootstrap: each resample draws as many
  episodes as there are, with replacement, then within each drawn episode as many of its windows as it has,
  with replacement; windows of one episode are correlated (one map position, one stretch of play), so
  resampling them as independent understates the spread. With one episode (or none given) the windows
  are resampled. Returns {"mean_diff": mean over windows, "ci95": [low, high], "n_windows", "n_episodes",
  "resampled": "episodes, then windows within them" or "windows", "num_resamples"}.
  """
  diff = np.asarray(diff, np.float64).reshape(-1)
  if not len(diff) or not np.isfinite(diff).all():
    raise ValueError(f"paired_bootstrap needs finite differences; got {len(diff)} with "
                     f"{int((~np.isfinite(diff)).sum())} not finite")
  ids = np.zeros(len(diff), np.int64) if episodes is None else np.asarray(episodes).reshape(-1)
  if len(ids) != len(diff):
    raise ValueError(f"{len(diff)} differences but {len(ids)} episode ids")
  order = np.argsort(ids, kind="stable")
  diff = diff[order]
  _, starts, sizes = np.unique(ids[order], return_index=True, return_counts=True)
  rng = np.random.default_rng(seed)
  if len(sizes) == 1:
    means = diff[rng.integers(0, len(diff), (num_resamples, len(diff)))].mean(axis=1)
  else:
    means = np.empty(num_resamples)
    for b in range(num_resamples):
      drawn = rng.integers(0, len(sizes), len(sizes))
      size = np.repeat(sizes[drawn], sizes[drawn])
      within = (rng.random(len(size)) * size).astype(np.int64)
      means[b] = diff[np.repeat(starts[drawn], sizes[drawn]) + within].mean()
  low, high = np.percentile(means, [2.5, 97.5])
  return {"mean_diff": float(diff.mean()), "ci95": [float(low), float(high)], "n_windows": len(diff),
          "n_episodes": len(sizes), "resampled": "windows" if len(sizes) == 1 else "episodes, then windows within them",
          "num_resamples": num_resamples}
