"""Tests for fpe_jax.cluster: PCA vs numpy SVD, k-means vs a numpy Lloyd, seeding, router."""

import jax
import numpy as np
import pytest

from fpe_jax import cluster


def blobs(rng, k=4, per=60, dim=6, spread=0.3, sep=10.0):
  centers = rng.normal(size=(k, dim)) * sep
  labels = np.repeat(np.arange(k), per)
  x = centers[labels] + spread * rng.normal(size=(k * per, dim))
  return x.astype(np.float32), labels, centers


def numpy_lloyd(x, centroids, max_iters=100):
  """Plain Lloyd: assign to nearest, move to mean, stop when assignments stop changing."""
  x = x.astype(np.float64)
  c = np.array(centroids, np.float64)
  ids = np.argmin(((x[:, None] - c[None]) ** 2).sum(-1), -1)
  for _ in range(max_iters):
    for j in range(len(c)):
      if (ids == j).any():
        c[j] = x[ids == j].mean(0)
    new = np.argmin(((x[:, None] - c[None]) ** 2).sum(-1), -1)
    if (new == ids).all():
      break
    ids = new
  return c, ids, ((x - c[ids]) ** 2).sum()


def same_partition(a, b):
  """True when two labelings differ only by renaming clusters."""
  pairs = set(zip(a.tolist(), b.tolist(), strict=True))
  return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_pca_matches_numpy_svd():
  rng = np.random.default_rng(0)
  scales = np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.05])
  q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
  x = (rng.normal(size=(500, 8)) * scales) @ q.T + 3.0
  pca = cluster.pca_fit(x.astype(np.float32), n_components=3)
  xc = x - x.mean(0)
  _, s, vt = np.linalg.svd(xc, full_matrices=False)
  want = vt[:3].T
  want = want * np.sign(want[np.argmax(np.abs(want), 0), np.arange(3)])
  np.testing.assert_allclose(pca.components, want, atol=1e-4)
  np.testing.assert_allclose(pca.variance, s[:3] ** 2 / len(x), rtol=1e-4)
  np.testing.assert_allclose(pca.mean, x.mean(0), rtol=1e-5)
  np.testing.assert_allclose(cluster.pca_transform(pca, x), xc @ want, rtol=1e-3, atol=1e-3)


def test_pca_default_is_d_over_32():
  x = np.random.default_rng(1).normal(size=(100, 96)).astype(np.float32)
  assert cluster.pca_fit(x).components.shape == (96, 3)
  assert cluster.default_components(16) == 1


def test_lloyd_matches_numpy_from_the_same_start():
  rng = np.random.default_rng(2)
  x, _, _ = blobs(rng, k=5, spread=2.5, sep=3.0)  # overlapping, so Lloyd has work to do
  init = x[rng.choice(len(x), 5, replace=False)]
  got = jax.jit(cluster.lloyd)(x, init)
  c, ids, inertia = numpy_lloyd(x, init)
  assert int(got.iterations) > 1
  np.testing.assert_array_equal(got.ids, ids)
  np.testing.assert_allclose(got.centroids, c, rtol=1e-4, atol=1e-4)
  assert float(got.inertia) == pytest.approx(inertia, rel=1e-4)


def test_kmeans_recovers_separable_blobs_and_beats_single_numpy_runs():
  rng = np.random.default_rng(3)
  x, labels, centers = blobs(rng, k=4)
  res = cluster.kmeans(jax.random.key(0), x, 4, n_restarts=4)
  assert same_partition(np.asarray(res.ids), labels)
  for j in range(4):
    np.testing.assert_allclose(res.centroids[j], x[np.asarray(res.ids) == j].mean(0), atol=1e-4)
  # The best restart is at least as good as numpy Lloyd from random starts.
  for trial in range(3):
    init = x[np.random.default_rng(trial).choice(len(x), 4, replace=False)]
    assert float(res.inertia) <= numpy_lloyd(x, init)[2] * (1 + 1e-4)


def test_kmeans_plus_plus_seeds_one_point_per_blob():
  rng = np.random.default_rng(4)
  x, labels, _ = blobs(rng, k=6, per=30, sep=50.0, spread=0.1)
  seed_fn = jax.jit(cluster.kmeans_plus_plus, static_argnums=2)
  for i in range(5):
    seeds = np.asarray(seed_fn(jax.random.key(i), x, 6))
    # Every seed is a data point, and D^2 sampling puts one in each far-apart blob.
    rows = [np.flatnonzero((x == s).all(1))[0] for s in seeds]
    assert sorted(labels[rows].tolist()) == list(range(6))


def test_kmeans_is_deterministic_per_key_and_handles_duplicates():
  x = np.repeat(np.array([[0.0, 0.0], [1.0, 1.0]], np.float32), 10, axis=0)
  a = cluster.kmeans(jax.random.key(1), x, 3, n_restarts=2)
  b = cluster.kmeans(jax.random.key(1), x, 3, n_restarts=2)
  np.testing.assert_array_equal(a.centroids, b.centroids)
  assert np.isfinite(np.asarray(a.centroids)).all()
  assert float(a.inertia) == pytest.approx(0.0, abs=1e-6)


def test_router_routes_to_nearest_centroid_in_pca_space():
  rng = np.random.default_rng(5)
  d = 64
  z, labels, _ = blobs(rng, k=4, per=50, dim=2, sep=8.0)
  basis, _ = np.linalg.qr(rng.normal(size=(d, 2)))
  x = (z @ basis.T + 0.05 * rng.normal(size=(len(z), d))).astype(np.float32)
  router, ids = cluster.fit_router(jax.random.key(0), x, 4, n_restarts=3)  # p = 64 // 32
  assert router["components"].shape == (d, 2)
  assert same_partition(np.asarray(ids), labels)
  routed = jax.jit(cluster.route)(router, x)
  np.testing.assert_array_equal(routed, ids)
  # Independent numpy nearest-centroid on fresh points, with a [batch, seq] leading shape.
  fresh = x[:40].reshape(4, 10, d) + 0.05 * rng.normal(size=(4, 10, d)).astype(np.float32)
  proj = (fresh - np.asarray(router["mean"])) @ np.asarray(router["components"])
  want = np.argmin(((proj[..., None, :] - np.asarray(router["centroids"])) ** 2).sum(-1), -1)
  np.testing.assert_array_equal(cluster.route(router, fresh), want)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x: cluster.kmeans(jax.random.key(0), x, 11), "k=11 clusters need"),
        (lambda x: cluster.kmeans(jax.random.key(0), x, 0), "k must be"),
        (lambda x: cluster.fit_router(jax.random.key(0), x, 20), "num_experts=20 exceeds"),
        (lambda x: cluster.pca_fit(x, n_components=9), "n_components"),
        (lambda x: cluster.pca_fit(x[0]), "x must be"),
        (lambda x: cluster.kmeans(jax.random.key(0), x, 2, n_restarts=0), "n_restarts"),
    ],
)
def test_bad_arguments_raise_one_line_errors(call, match):
  x = np.ones((10, 8), np.float32)
  with pytest.raises(ValueError, match=match) as info:
    call(x)
  assert "\n" not in str(info.value)

