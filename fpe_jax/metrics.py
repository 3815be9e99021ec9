"""Interference and entanglement metrics: feature capacity, neuron cosine, clause load, WD,
and the block density a block-skipping kernel sees.

Conventions: `w: [d_in, d_hidden]` is a layer's weight in the library layout
(y = x @ w), so row `w[i]` is input feature i's embedding across the hidden neurons and
column `w[:, j]` is hidden neuron j's incoming weight vector.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtri


def _safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def feature_capacity(w: jax.Array) -> jax.Array:
  """Per-feature capacity (Scherlis et al. 2022): how much of a neuron each feature owns.

  `C_i = (w_i . w_i)^2 / sum_j (w_i . w_j)^2` over the rows w_i of `w`. 0 <= C_i <= 1 and
  sum_i C_i <= d_hidden. 1 means feature i shares its directions with no other feature;
  n identical features get 1/n each. A zero row gets capacity 0.

  This is the same quantity as Elhage et al.'s feature dimensionality
  `D_i = ||w_i||^2 / sum_j (w_i_hat . w_j)^2` ("Toy Models of Superposition"):
  expanding the unit vector shows the two formulas are algebraically equal.

  Args:
    w: [d_in, d_hidden].

  Returns:
    [d_in] capacities.
  """
  gram = w @ w.T
  return _safe_divide(jnp.diagonal(gram) ** 2, jnp.sum(gram**2, axis=1))


def dimensions_per_feature(w: jax.Array) -> jax.Array:
  """Elhage et al.'s aggregate `d_hidden / ||W||_F^2`: hidden dimensions per feature."""
  return w.shape[1] / jnp.sum(w**2)


def mean_pairwise_cosine(w: jax.Array, *, absolute: bool = False) -> jax.Array:
  """Mean cosine similarity between hidden neurons' incoming weight vectors.

  Args:
    w: [d_in, d_hidden]; column j is neuron j's incoming vector.
    absolute: average |cos| instead of cos. The signed mean of random-ish directions is
      about 0 whatever the interference, so |cos| is the one that moves with FPE.

  Returns:
    A scalar: the mean over the d_hidden * (d_hidden - 1) / 2 pairs j < k. Zero columns
    (dead or fully pruned neurons) contribute cosine 0.
  """
  d_hidden = w.shape[1]
  if d_hidden < 2:
    raise ValueError(f"mean_pairwise_cosine needs >= 2 neurons, got w of shape {w.shape}")
  norms = jnp.linalg.norm(w, axis=0)
  unit = _safe_divide(w, norms[None, :])
  cos = unit.T @ unit
  if absolute:
    cos = jnp.abs(cos)
  upper = jnp.triu(jnp.ones((d_hidden, d_hidden), bool), k=1)
  return jnp.sum(jnp.where(upper, cos, 0.0)) / (d_hidden * (d_hidden - 1) / 2)


def clause_load(
    hidden: jax.Array, clause_sat: jax.Array, *, threshold: float = 0.5
) -> jax.Array:
  """Per-neuron clause load: how many clauses a hidden neuron responds to.

  A neuron's response to clause c is its mean activation over the examples where c is
  the ONLY satisfied clause, minus its mean activation over the negatives (no clause
  satisfied). The neuron responds to c when that response exceeds `threshold` times the
  largest response of any neuron to any clause (one global scale, so a neuron that
  responds to nothing has load 0). Clauses with no single-clause example count as 0.

  Args:
    hidden: [n, d_hidden] post-activation hidden outputs.
    clause_sat: [n, n_clauses] bool, which clauses each example satisfies.
    threshold: fraction of the largest response that counts as responding.

  Returns:
    [d_hidden] int32 clause counts.
  """
  clause_sat = clause_sat.astype(bool)
  only = clause_sat & (jnp.sum(clause_sat, axis=1, keepdims=True) == 1)  # [n, c]
  negatives = ~jnp.any(clause_sat, axis=1)  # [n]
  base = _safe_divide(negatives.astype(hidden.dtype) @ hidden, jnp.sum(negatives))
  counts = jnp.sum(only, axis=0)  # [c]
  per_clause = _safe_divide(only.T.astype(hidden.dtype) @ hidden, counts[:, None])  # [c, h]
  response = jnp.where(counts[:, None] > 0, per_clause - base[None, :], 0.0)
  scale = jnp.max(response)
  responds = (response > threshold * scale) & (scale > 0)
  return jnp.sum(responds, axis=0).astype(jnp.int32)


def wasserstein_to_gaussian(y: jax.Array) -> jax.Array:
  """1-Wasserstein distance of each neuron's z-scored output distribution to N(0, 1).

  Deterministic quantile form: `mean_k |sort(z)_k - Phi^-1((k - 1/2) / n)|`, z the
  per-neuron z-scored outputs (population std), so only the distribution's shape counts.
  A constant neuron (std 0) has z = 0 and distance E|g| to the quantile grid.

  Args:
    y: [tokens, neurons] outputs (pre-activations) over the calibration tokens.

  Returns:
    [neurons] distances.
  """
  n = y.shape[0]
  if n < 2:
    raise ValueError(f"wasserstein_to_gaussian needs >= 2 tokens, got y of shape {y.shape}")
  y = y.astype(jnp.float32)
  centred = y - jnp.mean(y, axis=0)
  z = _safe_divide(centred, jnp.std(y, axis=0))
  quantiles = ndtri((jnp.arange(1, n + 1, dtype=jnp.float32) - 0.5) / n)
  return jnp.mean(jnp.abs(jnp.sort(z, axis=0) - quantiles[:, None]), axis=0)


def block_density(mask, block_shape: tuple[int, int] = (128, 128)) -> float:
  """Share of the (bk, bn) blocks of a [K, N] 0/1 mask that hold a non-zero (the last
  row- and column-blocks zero-padded): what a block-skipping kernel still multiplies."""
  mask = np.asarray(mask) != 0
  bk, bn = block_shape
  k, n = mask.shape
  padded = np.zeros((-(-k // bk) * bk, -(-n // bn) * bn), bool)
  padded[:k, :n] = mask
  blocks = padded.reshape(padded.shape[0] // bk, bk, padded.shape[1] // bn, bn)
  return float(blocks.any(axis=(1, 3)).mean())
