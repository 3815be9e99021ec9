"""Metrics against plain numpy references and closed forms."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fpe_jax import metrics


def capacity_reference(w):
  """Scherlis et al., a double loop as written in the paper."""
  out = []
  for i in range(w.shape[0]):
    num = np.dot(w[i], w[i]) ** 2
    den = sum(np.dot(w[i], w[j]) ** 2 for j in range(w.shape[0]))
    out.append(num / den if den > 0 else 0.0)
  return np.array(out)


def elhage_dimensionality_reference(w):
  """Elhage et al.: ||W_i||^2 / sum_j (W_i_hat . W_j)^2."""
  out = []
  for i in range(w.shape[0]):
    unit = w[i] / np.linalg.norm(w[i])
    out.append(np.dot(w[i], w[i]) / sum(np.dot(unit, w[j]) ** 2 for j in range(w.shape[0])))
  return np.array(out)


def test_capacity_matches_reference_and_bounds():
  w = np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32)
  c = np.asarray(metrics.feature_capacity(jnp.asarray(w)))
  np.testing.assert_allclose(c, capacity_reference(w.astype(np.float64)), rtol=1e-5)
  np.testing.assert_allclose(c, elhage_dimensionality_reference(w.astype(np.float64)), rtol=1e-5)
  assert np.all((c >= 0) & (c <= 1)) and c.sum() <= 5 + 1e-5


def test_capacity_closed_forms():
  orthogonal = np.eye(4, 6, dtype=np.float32) * np.array([[1.0], [2.0], [0.5], [3.0]])
  np.testing.assert_allclose(metrics.feature_capacity(jnp.asarray(orthogonal)), 1.0, rtol=1e-6)
  identical = np.tile(np.array([[0.3, -1.0, 2.0]], np.float32), (5, 1))
  np.testing.assert_allclose(metrics.feature_capacity(jnp.asarray(identical)), 1 / 5, rtol=1e-6)
  with_zero = np.array([[1.0, 0.0], [0.0, 0.0]], np.float32)
  np.testing.assert_allclose(metrics.feature_capacity(jnp.asarray(with_zero)), [1.0, 0.0])


def test_dimensions_per_feature():
  w = np.eye(3, 6, dtype=np.float32)
  np.testing.assert_allclose(metrics.dimensions_per_feature(jnp.asarray(w)), 6 / 3)


def test_mean_pairwise_cosine_matches_numpy():
  w = np.random.default_rng(1).normal(size=(7, 6))
  unit = w / np.linalg.norm(w, axis=0)
  cos = unit.T @ unit
  pairs = [cos[i, j] for i in range(6) for j in range(i + 1, 6)]
  np.testing.assert_allclose(metrics.mean_pairwise_cosine(jnp.asarray(w, jnp.float32)),
                             np.mean(pairs), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      metrics.mean_pairwise_cosine(jnp.asarray(w, jnp.float32), absolute=True),
      np.mean(np.abs(pairs)), rtol=1e-5)


def test_mean_pairwise_cosine_closed_forms():
  same = jnp.ones((4, 3))
  np.testing.assert_allclose(metrics.mean_pairwise_cosine(same), 1.0, rtol=1e-6)
  np.testing.assert_allclose(metrics.mean_pairwise_cosine(jnp.eye(5)), 0.0, atol=1e-7)
  with pytest.raises(ValueError, match=">= 2 neurons"):
    metrics.mean_pairwise_cosine(jnp.ones((3, 1)))


def test_clause_load_counts_the_clauses_a_neuron_detects():
  # 3 clauses; neuron 0 fires for clauses 0 and 1, neuron 1 for clause 2, neuron 2 never.
  sat = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0], [0, 0, 0], [1, 1, 0]], bool)
  hidden = np.array([[2.0, 0, 0], [1.8, 0, 0], [0, 3.0, 0], [0.1, 0, 0], [0.1, 0, 0],
                     [5.0, 0, 0]], np.float32)
  load = metrics.clause_load(jnp.asarray(hidden), jnp.asarray(sat))
  np.testing.assert_array_equal(load, [2, 1, 0])


def test_wasserstein_matches_scipy_and_numpy():
  rng = np.random.default_rng(2)
  n = 2000
  y = np.stack([rng.normal(3, 2, n), rng.exponential(1.0, n), np.sign(rng.normal(size=n))], 1)
  wd = np.asarray(metrics.wasserstein_to_gaussian(jnp.asarray(y, jnp.float32)))
  z = (y - y.mean(0)) / y.std(0)
  grid = stats.norm.ppf((np.arange(1, n + 1) - 0.5) / n)
  np.testing.assert_allclose(wd, np.abs(np.sort(z, 0) - grid[:, None]).mean(0), rtol=1e-4)
  # Gaussian ~ 0; an exponential and a two-point (+-1) distribution are far from it.
  assert wd[0] < 0.05 and wd[1] > 0.1
  # An exactly balanced two-point distribution z-scores to -1/+1: the distance is the
  # mean gap between the +-1 steps and the Gaussian quantile grid.
  two_point = np.repeat([-3.0, 5.0], n // 2)[:, None]
  np.testing.assert_allclose(metrics.wasserstein_to_gaussian(jnp.asarray(two_point, jnp.float32)),
                             [np.abs(np.repeat([-1.0, 1.0], n // 2) - grid).mean()], rtol=1e-4)
  # Shape only: affine maps leave the distance unchanged.
  np.testing.assert_allclose(metrics.wasserstein_to_gaussian(jnp.asarray(5 * y + 1, jnp.float32)),
                             wd, rtol=1e-3)
