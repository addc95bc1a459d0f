"""Full-reference image quality: PSNR and SSIM of uint8 images against the real ones they should reproduce.

SSIM is Wang, Bovik, Sheikh and Simoncelli (2004): local means, variances and covariance under an 11x11 Gaussian
window (sigma 1.5) over the positions where the whole window fits ('valid', as their reference code filters),
C1 = (0.01 L)^2, C2 = (0.03 L)^2 with L = 255; the image's SSIM is the mean of the map, averaged over channels.
Both metrics are computed per image and averaged over the images.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

WINDOW, SIGMA, K1, K2, PEAK = 11, 1.5, 0.01, 0.03, 255.0


def psnr(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """Per-image PSNR in dB [N] of uint8 images [N, H, W, C] against uint8 references of the same shape (inf where an
  image equals its reference)."""
  x, y = _pair(images, reference)
  mse = np.mean((x - y) ** 2, axis=(1, 2, 3))
  with np.errstate(divide="ignore"):
    return 10.0 * np.log10(PEAK**2 / mse)


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA) -> np.ndarray:
  """[size, size] Gaussian weights summing to 1."""
  offsets = np.arange(size) - (size - 1) / 2
  g = np.exp(-offsets**2 / (2 * sigma**2))
  return np.outer(g, g) / np.sum(g) ** 2


def ssim_map(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """SSIM at each valid window position, [N, H - 10, W - 10, C], of uint8 images [N, H, W, C] (H, W >= 11)."""
  x, y = _pair(images, reference)
  if min(x.shape[1:3]) < WINDOW:
    raise ValueError(f"SSIM's {WINDOW}x{WINDOW} window needs images of at least that size, got {x.shape[1:3]}")
  w = gaussian_window()
  filt = lambda a: np.einsum("nhwcij,ij->nhwc", sliding_window_view(a, (WINDOW, WINDOW), axis=(1, 2)), w)
  mu_x, mu_y = filt(x), filt(y)
  var_x, var_y = filt(x * x) - mu_x**2, filt(y * y) - mu_y**2
  cov = filt(x * y) - mu_x * mu_y
  c1, c2 = (K1 * PEAK) ** 2, (K2 * PEAK) ** 2
  return ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))


def ssim(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """Per-image SSIM [N]: the mean of `ssim_map` over positions and channels."""
  return ssim_map(images, reference).mean(axis=(1, 2, 3))


def _pair(images, reference) -> tuple[np.ndarray, np.ndarray]:
  images, reference = np.asarray(images), np.asarray(reference)
  if images.dtype != np.uint8 or reference.dtype != np.uint8 or images.shape != reference.shape \
      or images.ndim != 4:
    raise ValueError(f"expected two uint8 arrays [N, H, W, C] of one shape, got {images.dtype} {images.shape} and "
                     f"{reference.dtype} {reference.shape}")
  return images.astype(np.float64), reference.astype(np.float64)
