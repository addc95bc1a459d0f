"""Distances between two sets of image features: the Fréchet distance (FID on Inception features) and the kernel
distance (KID), and the feature statistics that reference sets are saved as.

Both work on any features [N, D]. With the FID Inception network's pool features (jdiff/metrics/inception.py) they
are FID and KID; with the feature network that jdiff trains on a dataset (jdiff/metrics/features.py) they are the
Fréchet and kernel distances on that dataset's features, which are comparable only with themselves.

The Fréchet distance between N(mu1, S1) and N(mu2, S2) is |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)). The trace
of the square root is computed in float64 as the sum of the square roots of the eigenvalues of the symmetric
S1^(1/2) S2 S1^(1/2), which has the same eigenvalues as S1 S2 and, unlike scipy's sqrtm of S1 S2, stays real and
exact for singular covariances (fewer images than feature dimensions).

The kernel distance is the unbiased estimate of the squared maximum mean discrepancy with the polynomial kernel
k(x, y) = (x.y / D + 1)^3 (Binkowski et al., 2018), averaged over random subsets; its standard deviation over the
subsets comes with it.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

STATS_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class FeatureStats:
  """Mean [D], covariance [D, D] (float64) and count of a set of features, and the feature space they live in.

  features: the features themselves (float32 [N, D]), kept when the kernel distance is wanted, which needs them.
  space: names the feature network (and its weights); statistics of different spaces are never compared.
  """
  mean: np.ndarray
  cov: np.ndarray
  count: int
  space: str
  features: np.ndarray | None = None

  @classmethod
  def of(cls, features: np.ndarray, space: str, keep_features: bool = True) -> "FeatureStats":
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or len(features) < 2:
      raise ValueError(f"need features [N >= 2, D], got shape {features.shape}")
    return cls(mean=features.mean(axis=0), cov=np.cov(features, rowvar=False), count=len(features), space=space,
               features=features.astype(np.float32) if keep_features else None)

  def save(self, path: str) -> None:
    """Writes an .npz file: mean, cov, count, space, format and, if kept, features."""
    if not path.endswith(".npz"):
      raise ValueError(f"statistics are saved as .npz files; got {path!r}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    extra = {} if self.features is None else {"features": self.features}
    np.savez(path, mean=self.mean, cov=self.cov, count=self.count, space=self.space, format=STATS_FORMAT, **extra)

  @classmethod
  def load(cls, path: str) -> "FeatureStats":
    if not os.path.isfile(path):
      raise FileNotFoundError(f"no statistics file {path!r}: write one with `jdiff-evaluate --workdir DIR "
                              f"--write_reference {path}`")
    with np.load(path, allow_pickle=False) as data:
      missing = {"mean", "cov", "count", "space"} - set(data.files)
      if missing:
        raise ValueError(f"{path!r} is not a jdiff statistics file: it lacks {', '.join(sorted(missing))}")
      return cls(mean=data["mean"].astype(np.float64), cov=data["cov"].astype(np.float64), count=int(data["count"]),
                 space=str(data["space"]), features=data["features"] if "features" in data.files else None)

  def check_comparable(self, other: "FeatureStats") -> None:
    if self.space != other.space:
      raise ValueError(f"statistics from different feature networks cannot be compared: {self.space!r} against "
                       f"{other.space!r}; compute the reference with the same features")


def sqrt_trace_product(cov1: np.ndarray, cov2: np.ndarray) -> float:
  """tr((cov1 cov2)^(1/2)) for symmetric positive semi-definite matrices, in float64."""
  cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
  lam, u = np.linalg.eigh((cov1 + cov1.T) / 2)
  root1 = (u * np.sqrt(np.maximum(lam, 0.0))) @ u.T
  inner = root1 @ cov2 @ root1
  return float(np.sum(np.sqrt(np.maximum(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0))))


def frechet_distance(mean1, cov1, mean2, cov2) -> float:
  """The Fréchet (2-Wasserstein) distance squared between N(mean1, cov1) and N(mean2, cov2)."""
  mean1, mean2 = np.asarray(mean1, np.float64), np.asarray(mean2, np.float64)
  if mean1.shape != mean2.shape or np.shape(cov1) != np.shape(cov2) or np.shape(cov1) != mean1.shape * 2:
    raise ValueError(f"means {mean1.shape} / {mean2.shape} and covariances {np.shape(cov1)} / {np.shape(cov2)} "
                     "do not describe two distributions of one dimension")
  distance = (np.sum(np.square(mean1 - mean2)) + np.trace(cov1) + np.trace(cov2)
              - 2.0 * sqrt_trace_product(cov1, cov2))
  return float(max(distance, 0.0))


def stats_distance(stats: FeatureStats, reference: FeatureStats) -> float:
  """The Fréchet distance between two sets' statistics of the same feature space."""
  stats.check_comparable(reference)
  return frechet_distance(stats.mean, stats.cov, reference.mean, reference.cov)


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """(x.y / D + 1)^3 for every pair of rows, in float64."""
  k = np.asarray(x, np.float64) @ np.asarray(y, np.float64).T / x.shape[1] + 1.0
  return k * k * k  # numpy's ** 3 goes through pow(), ten times slower


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
  """The unbiased estimate of MMD^2 between the distributions of the rows of x [m, D] and y [n, D]."""
  m, n = len(x), len(y)
  kxx, kyy = polynomial_kernel(x, x), polynomial_kernel(y, y)
  within = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)))
  return float(within - 2.0 * polynomial_kernel(x, y).mean())


def kernel_distance(x: np.ndarray, y: np.ndarray, *, num_subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
  """(mean, std) over `num_subsets` random subsets of the unbiased MMD^2 between features x [N, D] and y [M, D].

  Each subset draws min(subset_size, N, M) rows of each set without replacement. Identical distributions give 0 in
  expectation; the estimate can then be slightly negative.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
    raise ValueError(f"need two feature sets [N, D] of one dimension, got {x.shape} and {y.shape}")
  size = min(subset_size, len(x), len(y))
  if size < 2:
    raise ValueError(f"the kernel distance needs at least 2 features per set, got {len(x)} and {len(y)}")
  rng = np.random.default_rng(seed)
  values = [mmd2_unbiased(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
            for _ in range(num_subsets)]
  return float(np.mean(values)), float(np.std(values))
