"""The Fréchet and kernel distances on closed forms, and reference statistics files."""
import numpy as np
import pytest
import scipy.linalg

from jdiff.metrics import fid


def random_cov(rng, d, rank=None):
  a = rng.standard_normal((d, rank or d))
  return a @ a.T / d


def test_identical_statistics_give_zero_also_for_singular_covariances():
  rng = np.random.default_rng(0)
  features = rng.standard_normal((20, 64))  # fewer samples than dimensions: a singular covariance
  stats = fid.FeatureStats.of(features, "f")
  assert np.linalg.matrix_rank(stats.cov) == 19
  assert fid.stats_distance(stats, stats) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_closed_forms():
  rng = np.random.default_rng(1)
  m1, m2 = rng.standard_normal(6), rng.standard_normal(6)
  a, b = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)
  # Commuting covariances: |m1 - m2|^2 + sum (sqrt(a) - sqrt(b))^2.
  expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert fid.frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
  # Against the identity: tr(I + S - 2 S^(1/2)) = sum (1 - sqrt(lambda))^2.
  s = random_cov(rng, 6)
  expected = np.sum((1 - np.sqrt(np.linalg.eigvalsh(s))) ** 2)
  assert fid.frechet_distance(m1, np.eye(6), m1, s) == pytest.approx(expected, rel=1e-10)
  # General position, against scipy's matrix square root of the product.
  s1, s2 = random_cov(rng, 6), random_cov(rng, 6)
  expected = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
  assert fid.frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_samples_approaches_the_gaussians():
  rng = np.random.default_rng(2)
  m1, m2, s1, s2 = rng.standard_normal(4), rng.standard_normal(4), random_cov(rng, 4), random_cov(rng, 4)
  x, y = rng.multivariate_normal(m1, s1, 50_000), rng.multivariate_normal(m2, s2, 50_000)
  estimate = fid.stats_distance(fid.FeatureStats.of(x, "f"), fid.FeatureStats.of(y, "f"))
  assert estimate == pytest.approx(fid.frechet_distance(m1, s1, m2, s2), rel=0.02)


def expected_kernel(a, A, b, B):
  """E[(x.y / d + 1)^3] for independent x ~ N(a, A), y ~ N(b, B), from the moments of x.y."""
  d, ab = len(a), a @ b
  second = np.trace((A + np.outer(a, a)) @ (B + np.outer(b, b)))
  third = ab**3 + 3 * ab * (a @ B @ a + b @ A @ b + np.trace(A @ B)) + 6 * a @ B @ A @ b
  return third / d**3 + 3 * second / d**2 + 3 * ab / d + 1


def test_kernel_distance_matches_the_mmd_of_two_gaussians():
  rng = np.random.default_rng(3)
  d = 4
  m1, m2 = 0.5 * rng.standard_normal(d), 0.5 * rng.standard_normal(d)
  s1, s2 = 0.5 * random_cov(rng, d), 0.5 * random_cov(rng, d)
  exact = expected_kernel(m1, s1, m1, s1) + expected_kernel(m2, s2, m2, s2) - 2 * expected_kernel(m1, s1, m2, s2)
  x, y = rng.multivariate_normal(m1, s1, 3000), rng.multivariate_normal(m2, s2, 3000)
  mean, std = fid.kernel_distance(x, y, num_subsets=20, subset_size=1000)
  assert exact > 10 * std  # the distributions differ clearly at this size
  assert mean == pytest.approx(exact, abs=std)


def test_kernel_distance_of_one_distribution_is_zero_within_its_spread():
  rng = np.random.default_rng(4)
  x, y = rng.standard_normal((2000, 8)), rng.standard_normal((2000, 8))
  mean, std = fid.kernel_distance(x, y, num_subsets=20, subset_size=500)
  assert abs(mean) < std and std < 1e-2
  assert fid.mmd2_unbiased(x, x) == pytest.approx(fid.mmd2_unbiased(x, x.copy()))


def test_statistics_round_trip_and_refuse_another_feature_space(tmp_path):
  rng = np.random.default_rng(5)
  stats = fid.FeatureStats.of(rng.standard_normal((50, 3)), "digits-features-abc")
  stats.save(str(tmp_path / "ref.npz"))
  loaded = fid.FeatureStats.load(str(tmp_path / "ref.npz"))
  np.testing.assert_array_equal(loaded.cov, stats.cov)
  np.testing.assert_array_equal(loaded.features, stats.features)
  assert (loaded.count, loaded.space) == (50, "digits-features-abc")
  with pytest.raises(ValueError, match="different feature networks"):
    fid.stats_distance(fid.FeatureStats.of(rng.standard_normal((50, 3)), "inception"), loaded)
  with pytest.raises(FileNotFoundError, match="--write_reference"):
    fid.FeatureStats.load(str(tmp_path / "absent.npz"))
