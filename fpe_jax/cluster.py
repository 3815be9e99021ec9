"""Clustering for Sparse Expansion: PCA, k-means (k-means++ seeding, restarts), routers.

A router is a plain dict of arrays (a pytree that checkpoints like params):
`{"mean": [d], "components": [d, p], "centroids": [k, p]}`; tokens go to the nearest
centroid in PCA space (hard top-1), as in Sparse Expansion (papers.md, section 2).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

Router = dict  # {"mean": [d], "components": [d, p], "centroids": [k, p]}


class PCA(NamedTuple):
  """A fitted PCA.

  Attributes:
    mean: [d] the data mean.
    components: [d, p] orthonormal principal directions (columns), by decreasing variance;
      each column's entry of largest magnitude is positive (a deterministic sign).
    variance: [p] the variance along each direction.
  """

  mean: jax.Array
  components: jax.Array
  variance: jax.Array


class KMeansResult(NamedTuple):
  """The best of the k-means restarts.

  Attributes:
    centroids: [k, p].
    ids: [n] int32 nearest centroid of each point.
    inertia: [] sum of squared distances of points to their centroids.
    iterations: [] Lloyd iterations the best restart ran.
  """

  centroids: jax.Array
  ids: jax.Array
  inertia: jax.Array
  iterations: jax.Array


def default_components(d: int) -> int:
  """The paper's PCA size: d / 32 dimensions (at least 1)."""
  return max(1, d // 32)


def _check_points(x, name="x") -> None:
  if jnp.ndim(x) != 2:
    raise ValueError(f"{name} must be [num_points, dim], got shape {jnp.shape(x)}")


@functools.partial(jax.jit, static_argnames=("n_components",))
def _pca_fit(x, n_components):
  x = x.astype(jnp.float32)
  mean = x.mean(0)
  xc = x - mean
  cov = xc.T @ xc / x.shape[0]
  eigval, eigvec = jnp.linalg.eigh(cov)  # ascending
  eigval = eigval[::-1][:n_components]
  eigvec = eigvec[:, ::-1][:, :n_components]
  rows = jnp.argmax(jnp.abs(eigvec), axis=0)
  signs = jnp.sign(eigvec[rows, jnp.arange(n_components)])
  return PCA(mean, eigvec * signs[None, :], jnp.maximum(eigval, 0.0))


def pca_fit(x: jax.Array, n_components: int | None = None) -> PCA:
  """Fits PCA by an eigendecomposition of the [d, d] covariance (cheap for many tokens).

  Args:
    x: [n, d] points.
    n_components: p, default d // 32 (the paper's choice), at most d.
  """
  _check_points(x)
  d = x.shape[1]
  n_components = default_components(d) if n_components is None else n_components
  if not (isinstance(n_components, int) and 1 <= n_components <= d):
    raise ValueError(f"n_components must be an int in [1, {d}], got {n_components!r}")
  return _pca_fit(jnp.asarray(x), n_components)


def pca_transform(pca: PCA, x: jax.Array) -> jax.Array:
  """Projects `x: [..., d]` to `[..., p]`."""
  return (x - pca.mean) @ pca.components


def _sq_distances(x, centroids):
  """[n, k] squared distances, clipped at 0 against cancellation."""
  d2 = (
      jnp.sum(x * x, -1, keepdims=True)
      - 2.0 * x @ centroids.T
      + jnp.sum(centroids * centroids, -1)[None, :]
  )
  return jnp.maximum(d2, 0.0)


def kmeans_plus_plus(key: jax.Array, x: jax.Array, k: int) -> jax.Array:
  """k-means++ seeding (Arthur & Vassilvitskii 2007): [k, p] centroids drawn from `x`.

  The first centroid is uniform over points, each next one is drawn with probability
  proportional to the squared distance to the nearest centroid chosen so far.
  """
  n = x.shape[0]
  key_first, key_rest = jax.random.split(key)
  first = x[jax.random.randint(key_first, (), 0, n)]
  centroids = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(first)
  min_d2 = _sq_distances(x, first[None, :])[:, 0]

  def body(j, carry):
    centroids, min_d2 = carry
    # If every point coincides with a centroid already, fall back to uniform.
    logits = jnp.where(jnp.sum(min_d2) > 0, jnp.log(min_d2), 0.0)
    pick = jax.random.categorical(jax.random.fold_in(key_rest, j), logits)
    centroids = centroids.at[j].set(x[pick])
    return centroids, jnp.minimum(min_d2, _sq_distances(x, x[pick][None, :])[:, 0])

  centroids, _ = jax.lax.fori_loop(1, k, body, (centroids, min_d2))
  return centroids


def lloyd(x: jax.Array, centroids: jax.Array, max_iters: int = 100) -> KMeansResult:
  """Lloyd iterations from given centroids until no assignment changes (or `max_iters`).

  A cluster that loses all its points keeps its previous centroid.

  Args:
    x: [n, p] points.
    centroids: [k, p] initial centroids.
    max_iters: bound on the number of assignment/update rounds.
  """
  k = centroids.shape[0]

  def update(centroids, ids):
    sums = jax.ops.segment_sum(x, ids, num_segments=k)
    counts = jax.ops.segment_sum(jnp.ones(x.shape[0], x.dtype), ids, num_segments=k)
    return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centroids)

  def cond(state):
    i, _, _, changed = state
    return changed & (i < max_iters)

  def body(state):
    i, centroids, ids, _ = state
    centroids = update(centroids, ids)
    new_ids = jnp.argmin(_sq_distances(x, centroids), -1).astype(jnp.int32)
    return i + 1, centroids, new_ids, jnp.any(new_ids != ids)

  ids = jnp.argmin(_sq_distances(x, centroids), -1).astype(jnp.int32)
  i, centroids, ids, _ = jax.lax.while_loop(cond, body, (jnp.int32(0), centroids, ids, True))
  # Direct differences: the expanded form used for assignment loses precision in a sum.
  inertia = jnp.sum((x - centroids[ids]) ** 2)
  return KMeansResult(centroids, ids, inertia, i)


@functools.partial(jax.jit, static_argnames=("k", "n_restarts", "max_iters"))
def _kmeans(key, x, *, k, n_restarts, max_iters):
  x = x.astype(jnp.float32)

  def one_restart(key):
    return lloyd(x, kmeans_plus_plus(key, x, k), max_iters)

  # lax.map, not vmap: restarts run one after another, so memory stays that of one
  # [n, k] distance matrix however many restarts there are.
  runs = jax.lax.map(one_restart, jax.random.split(key, n_restarts))
  best = jnp.argmin(runs.inertia)
  return jax.tree.map(lambda a: a[best], runs)


def kmeans(
    key: jax.Array, x: jax.Array, k: int, *, n_restarts: int = 10, max_iters: int = 100
) -> KMeansResult:
  """k-means with k-means++ seeding; the restart with the lowest inertia wins.

  Args:
    key: PRNG key.
    x: [n, p] points.
    k: number of clusters, 1 <= k <= n.
    n_restarts: independent seedings (the authors' code used 100; default 10).
    max_iters: Lloyd rounds per restart at most.
  """
  _check_points(x)
  n = x.shape[0]
  if not isinstance(k, int) or k < 1:
    raise ValueError(f"k must be a positive int, got {k!r}")
  if k > n:
    raise ValueError(f"k={k} clusters need at least k calibration points, got {n}")
  if not isinstance(n_restarts, int) or n_restarts < 1:
    raise ValueError(f"n_restarts must be a positive int, got {n_restarts!r}")
  if not isinstance(max_iters, int) or max_iters < 1:
    raise ValueError(f"max_iters must be a positive int, got {max_iters!r}")
  return _kmeans(key, jnp.asarray(x), k=k, n_restarts=n_restarts, max_iters=max_iters)


def fit_router(
    key: jax.Array,
    x: jax.Array,
    num_experts: int,
    *,
    n_components: int | None = None,
    n_restarts: int = 10,
    max_iters: int = 100,
) -> tuple[Router, jax.Array]:
  """PCA to `n_components` (default d // 32), then k-means with `num_experts` clusters.

  Args:
    key: PRNG key for k-means.
    x: [n, d] calibration inputs of the layer (tokens).
    num_experts: K, at most n.
    n_components: PCA size, default d // 32.
    n_restarts, max_iters: see `kmeans`.

  Returns:
    (router, ids): the router dict and [n] int32 cluster of each calibration token.
  """
  _check_points(x)
  if isinstance(num_experts, int) and num_experts > x.shape[0]:
    raise ValueError(
        f"num_experts={num_experts} exceeds the {x.shape[0]} calibration tokens available"
    )
  pca = pca_fit(x, n_components)
  z = pca_transform(pca, jnp.asarray(x, jnp.float32))
  result = kmeans(key, z, num_experts, n_restarts=n_restarts, max_iters=max_iters)
  router = {"mean": pca.mean, "components": pca.components, "centroids": result.centroids}
  return router, result.ids


def route(router: Router, x: jax.Array) -> jax.Array:
  """Hard top-1 routing: [...] int32 id of the nearest centroid in PCA space of `x: [..., d]`.

  Jit-able and vmap-able.
  """
  z = (x.astype(jnp.float32) - router["mean"]) @ router["components"]
  lead = z.shape[:-1]
  d2 = _sq_distances(z.reshape(-1, z.shape[-1]), router["centroids"])
  return jnp.argmin(d2, -1).astype(jnp.int32).reshape(lead)
