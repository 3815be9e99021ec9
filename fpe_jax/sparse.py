"""One-shot pruning of linear layers: SparseGPT, Wanda and magnitude (unstructured and n:m).

All functions take weights in the library layout `w: [d_in, d_out]` (y = x @ w). SparseGPT
(Frantar & Alistarh 2023) is written in the paper's layout internally (`W = w.T`, rows are
outputs, columns are inputs) so that the code reads like the paper; see
../shared/docs/papers.md, section 2.

Every pruner returns `(w_pruned, mask)`: `mask` is a float 0/1 array of `w`'s shape (1 =
kept) and `w_pruned` is exactly zero wherever `mask` is 0. What "sparsity s" means is each
method's own definition, and it is met exactly (ties broken by position, never by a
threshold that could catch several equal scores):

* magnitude: `floor(s * d_in * d_out)` weights with the smallest |w| in the whole matrix.
* wanda: `floor(s * d_in)` weights of each output (each column of `w`) with the smallest
  score |w_ij| * ||X_i||_2.
* sparsegpt: inputs are processed in blocks of `block_size` (the last one may be narrower);
  in each block of `width` inputs, `floor(s * width * d_out)` weights with the smallest
  w^2 / [H^-1]_ii^2 (in the factored form of the paper) are pruned.
* n:m (all three): in every group of m consecutive inputs, the n lowest scores of each
  output are pruned, so every group keeps exactly m - n weights per output.

The input Hessian `h: [d_in, d_in]` is the mean of x x^T over calibration inputs (the paper's
2/n sum x x^T up to a factor 2; SparseGPT's result does not depend on the scale of `h`).
`hessian_from_inputs` and the running `hessian_init` / `hessian_update` build it, per group of
tokens (experts) when `group_ids` is given.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Retries of the damped Cholesky factorisation: retry i (i >= 1) uses
# max(damp, _MIN_RETRY_DAMP) * DAMP_GROWTH**i. The floor makes damp=0 retry too.
DAMP_GROWTH = 10.0
MAX_DAMP_TRIES = 8
_MIN_RETRY_DAMP = 0.01


# --------------------------------------------------------------------------------------
# Argument checks (host side, before anything is traced).


def _check_sparsity(sparsity: float) -> float:
  try:
    sparsity = float(sparsity)
  except (TypeError, ValueError):
    raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from None
  if not 0.0 <= sparsity < 1.0:
    raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
  return sparsity


def _check_n_m(n_m, d_in: int) -> tuple[int, int] | None:
  if n_m is None:
    return None
  try:
    n, m = (int(v) for v in n_m)
  except (TypeError, ValueError):
    msg = f"n_m must be a pair (n, m) of integers with 0 <= n < m, got {n_m!r}"
    raise ValueError(msg) from None
  if not 0 <= n < m:
    raise ValueError(f"n_m=(n, m) needs 0 <= n < m, got n_m={n_m!r}")
  if d_in % m:
    raise ValueError(f"n_m: d_in={d_in} is not a multiple of m={m}")
  return n, m


def _check_w(w) -> None:
  if jnp.ndim(w) != 2:
    raise ValueError(f"w must be a matrix [d_in, d_out], got shape {jnp.shape(w)}")


# --------------------------------------------------------------------------------------
# Exact selection helpers (jit-able; counts may be traced).


# Pruning counts are computed on the host (exact integer floors) and passed as traced int32,
# so a sweep over sparsities reuses one compilation.


def _bisect(count_at_most, target, lo: int, hi: int):
  """Smallest integer t in [lo, hi] with count_at_most(t) >= target (count non-decreasing).

  Runs the ceil(log2(hi - lo + 1)) halvings of a fixed-trip `fori_loop`; `hi` is returned
  when no t qualifies.
  """
  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    enough = count_at_most(mid) >= target
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  steps = max(int(hi - lo).bit_length(), 1)
  return jax.lax.fori_loop(0, steps, halve, (jnp.int32(lo), jnp.int32(hi)))[0]


def _keep_mask_lowest_flat(scores: jax.Array, num_prune: jax.Array) -> jax.Array:
  """0/1 mask over all of `scores` (>= 0) pruning exactly `num_prune` lowest (ties by position).

  A threshold search instead of a sort (XLA's CPU sort took ~0.15 s for a 1536 x 128 SparseGPT
  block; this takes a few ms): non-negative floats order as their int32 bit patterns, so the
  num_prune-th smallest score is found by bisecting its bits (31 counting passes), and when
  several scores equal it, the last pruned position among them by bisecting positions.
  """
  flat = jnp.abs(scores.reshape(-1))  # -0.0 -> +0.0 (bits 0), the only change for scores >= 0
  bits = jax.lax.bitcast_convert_type(flat, jnp.int32)
  thresh = _bisect(lambda t: jnp.sum(bits <= t), num_prune, 0, 0x7F800000)  # up to +inf
  below, at = bits < thresh, bits == thresh
  ties_pruned = num_prune - jnp.sum(below)
  pos = jnp.arange(flat.size, dtype=jnp.int32)
  last_tie = jax.lax.cond(
      jnp.sum(at) > ties_pruned,
      lambda: _bisect(lambda p: jnp.sum(at & (pos <= p)), ties_pruned, 0, flat.size - 1),
      lambda: jnp.int32(flat.size - 1))
  prune = (below | (at & (pos <= last_tie))) & (num_prune > 0)
  return (~prune).astype(jnp.float32).reshape(scores.shape)


def _keep_mask_lowest_rows(scores: jax.Array, num_prune) -> jax.Array:
  """0/1 mask pruning exactly `num_prune` lowest entries of each row of `scores: [r, c]`."""
  ranks = jnp.argsort(jnp.argsort(scores, axis=-1, stable=True), axis=-1, stable=True)
  return (ranks >= num_prune).astype(jnp.float32)


def _keep_mask_n_m(scores: jax.Array, n: int, m: int) -> jax.Array:
  """0/1 mask over `scores: [r, c]`: in each row, the n lowest of every m consecutive go."""
  r, c = scores.shape
  grouped = scores.reshape(r, c // m, m)
  return _keep_mask_lowest_rows(grouped, n).reshape(r, c)


# --------------------------------------------------------------------------------------
# Magnitude and Wanda.


@functools.partial(jax.jit, static_argnames=("n_m",))
def _magnitude(w, num_prune, *, n_m):
  scores = jnp.abs(w).T  # [d_out, d_in]: n:m groups run along the inputs of each output.
  if n_m is None:
    keep = _keep_mask_lowest_flat(scores, num_prune)
  else:
    keep = _keep_mask_n_m(scores, *n_m)
  mask = keep.T
  return w * mask.astype(w.dtype), mask


def magnitude(w: jax.Array, *, sparsity: float = 0.0, n_m=None) -> tuple[jax.Array, jax.Array]:
  """Magnitude pruning: one |w| threshold for the whole matrix (or n:m per output).

  Args:
    w: [d_in, d_out] weights.
    sparsity: fraction in [0, 1); exactly floor(sparsity * w.size) weights are pruned.
      Ignored when `n_m` is given.
    n_m: optional (n, m): prune the n smallest |w| of every m consecutive inputs per output.

  Returns:
    (w_pruned, mask), both [d_in, d_out]; mask is float 0/1 (1 = kept).
  """
  _check_w(w)
  sparsity = _check_sparsity(sparsity)
  n_m = _check_n_m(n_m, w.shape[0])
  num_prune = jnp.int32(math.floor(sparsity * w.size))
  return _magnitude(jnp.asarray(w), num_prune, n_m=n_m)


@functools.partial(jax.jit, static_argnames=("n_m",))
def _wanda(w, x_norm, num_prune, *, n_m):
  scores = (jnp.abs(w) * x_norm[:, None]).T  # [d_out, d_in]
  if n_m is None:
    keep = _keep_mask_lowest_rows(scores, num_prune)
  else:
    keep = _keep_mask_n_m(scores, *n_m)
  mask = keep.T
  return w * mask.astype(w.dtype), mask


def wanda(
    w: jax.Array, x_norm: jax.Array, *, sparsity: float = 0.0, n_m=None
) -> tuple[jax.Array, jax.Array]:
  """Wanda (Sun et al. 2023): score |w_ij| * ||X_i||_2, keep the top (1 - s) of each output.

  Args:
    w: [d_in, d_out] weights.
    x_norm: [d_in] L2 norm of each input feature over the calibration tokens (any positive
      common factor gives the same mask, e.g. sqrt(diag(h))).
    sparsity: fraction in [0, 1); exactly floor(sparsity * d_in) weights of each output
      are pruned. Ignored when `n_m` is given.
    n_m: optional (n, m): prune the n lowest scores of every m consecutive inputs per output.

  Returns:
    (w_pruned, mask), both [d_in, d_out]; mask is float 0/1 (1 = kept).
  """
  _check_w(w)
  sparsity = _check_sparsity(sparsity)
  n_m = _check_n_m(n_m, w.shape[0])
  if jnp.shape(x_norm) != (w.shape[0],):
    raise ValueError(f"x_norm must have shape [d_in]={(w.shape[0],)}, got {jnp.shape(x_norm)}")
  num_prune = jnp.int32(math.floor(sparsity * w.shape[0]))
  return _wanda(jnp.asarray(w), jnp.asarray(x_norm, w.dtype), num_prune, n_m=n_m)


# --------------------------------------------------------------------------------------
# Hessians.


class HessianState(NamedTuple):
  """Running mean of x x^T.

  Attributes:
    h: [d_in, d_in] (or [groups, d_in, d_in]) mean of x x^T over the rows seen so far
      (zero for a group with no rows).
    count: [] (or [groups]) number of rows seen, float32.
  """

  h: jax.Array
  count: jax.Array


def hessian_init(d_in: int, num_groups: int | None = None) -> HessianState:
  """An empty running Hessian, optionally one per group (expert)."""
  lead = () if num_groups is None else (int(num_groups),)
  return HessianState(jnp.zeros(lead + (d_in, d_in), jnp.float32), jnp.zeros(lead, jnp.float32))


@jax.jit
def _gram(x):
  x = x.astype(jnp.float32)
  return x.T @ x


@jax.jit
def _gram_rows(x, rows):
  # Rows past the end of x are read as zeros and add nothing to the sum.
  x_rows = jnp.take(x, rows, axis=0, mode="fill", fill_value=0).astype(jnp.float32)
  return x_rows.T @ x_rows


def _grouped_gram(x, group_ids, num_groups):
  """Per-group sums of x x^T at the cost of one ungrouped Gram matrix.

  Groups have data-dependent sizes, so this runs on the host: each group's rows are gathered
  and padded to a power of two (few distinct shapes, few compilations). A one-hot version
  under jit would cost num_groups times the FLOPs (and XLA's CPU ragged_dot was slower still).
  """
  ids = np.asarray(group_ids).reshape(-1)
  if ids.size and (ids.min() < 0 or ids.max() >= num_groups):
    raise ValueError(f"group_ids must be in [0, {num_groups}), got [{ids.min()}, {ids.max()}]")
  counts = np.bincount(ids, minlength=num_groups).astype(np.float32)
  d_in = x.shape[-1]
  grams = []
  for k in range(num_groups):
    rows = np.flatnonzero(ids == k)
    if rows.size == 0:
      grams.append(jnp.zeros((d_in, d_in), jnp.float32))
      continue
    padded = np.full(max(64, 1 << int(rows.size - 1).bit_length()), x.shape[0], np.int32)
    padded[: rows.size] = rows
    grams.append(_gram_rows(x, jnp.asarray(padded)))
  return jnp.stack(grams), jnp.asarray(counts)


@jax.jit
def _merge(state, gram, count):
  total = state.count + count
  safe = jnp.maximum(total, 1.0)
  w_old = (state.count / safe)[..., None, None]
  return HessianState(state.h * w_old + gram / safe[..., None, None], total)


def hessian_update(
    state: HessianState, x: jax.Array, group_ids: jax.Array | None = None
) -> HessianState:
  """Adds a batch of inputs to a running Hessian.

  Args:
    state: from `hessian_init` (grouped iff `group_ids` is given).
    x: [..., d_in] inputs (leading axes are flattened into tokens).
    group_ids: optional [...] int group (expert) of each token.

  Returns:
    The updated state; `state.h` stays the mean of x x^T per group. With `group_ids`, this
    runs on the host (data-dependent group sizes) and cannot be traced.
  """
  d_in = state.h.shape[-1]
  if jnp.shape(x)[-1] != d_in:
    raise ValueError(f"x: last axis must be d_in={d_in}, got shape {jnp.shape(x)}")
  grouped = state.h.ndim == 3
  if grouped != (group_ids is not None):
    raise ValueError("group_ids must be given exactly when the state is grouped (num_groups)")
  x = jnp.reshape(x, (-1, d_in))
  if grouped:
    group_ids = jnp.reshape(group_ids, (-1,))
    if group_ids.shape[0] != x.shape[0]:
      raise ValueError(f"group_ids: {group_ids.shape[0]} ids for {x.shape[0]} tokens")
    gram, count = _grouped_gram(x, group_ids, state.h.shape[0])
  else:
    gram, count = _gram(x), jnp.float32(x.shape[0])
  return _merge(state, gram, count)


def hessian_from_inputs(
    x: jax.Array, group_ids: jax.Array | None = None, num_groups: int | None = None
) -> jax.Array:
  """Mean of x x^T over tokens: [d_in, d_in], or [num_groups, d_in, d_in] per group.

  Args:
    x: [..., d_in] inputs.
    group_ids: optional [...] int group of each token; needs `num_groups`.
    num_groups: number of groups when `group_ids` is given.
  """
  if (group_ids is None) != (num_groups is None):
    raise ValueError("group_ids and num_groups must be given together")
  state = hessian_init(jnp.shape(x)[-1], num_groups)
  return hessian_update(state, x, group_ids).h


def input_norms(state: HessianState) -> jax.Array:
  """||X_i||_2 over all rows seen, from a running Hessian: [d_in] (or [groups, d_in])."""
  diag = jnp.diagonal(state.h, axis1=-2, axis2=-1)
  return jnp.sqrt(jnp.maximum(diag, 0.0) * state.count[..., None])


# --------------------------------------------------------------------------------------
# SparseGPT.


class SparseGPTResult(NamedTuple):
  """What `sparsegpt_with_info` returns.

  Attributes:
    w: [d_in, d_out] pruned and updated weights (exactly zero where mask is 0 and on dead
      inputs).
    mask: [d_in, d_out] float 0/1, 1 = kept.
    damp: [] the relative damping that succeeded (h + damp * mean(diag h) * I was factored).
    ok: [] bool, False when every damping in the schedule failed (w is then not usable).
  """

  w: jax.Array
  mask: jax.Array
  damp: jax.Array
  ok: jax.Array


def _upper_cholesky_of_inverse(h: jax.Array, damp_abs: jax.Array) -> tuple[jax.Array, jax.Array]:
  """U with (h + damp I)^-1 = U^T U (U upper), and whether it is a valid factor.

  One Cholesky instead of the paper's three steps (factor, invert, factor again): with J
  the reversal permutation, chol(J h J) = J V J gives h = V V^T with V upper, so
  h^-1 = V^-T V^-1 and U = V^-1.
  """
  d = h.shape[0]
  eye = jnp.eye(d, dtype=h.dtype)
  lower_rev = jnp.linalg.cholesky((h + damp_abs * eye)[::-1, ::-1])
  upper_v = lower_rev[::-1, ::-1]
  upper = jax.scipy.linalg.solve_triangular(upper_v, eye, lower=False)
  ok = jnp.all(jnp.isfinite(upper)) & jnp.all(jnp.diagonal(upper) > 0)
  return upper, ok


def _damped_inverse_factor(h, damp, damp_growth, max_tries):
  """Cholesky of the damped inverse, retrying with growing damping inside a while_loop.

  A while_loop (not a host loop) keeps SparseGPT jit-able and vmap-able over experts: under
  vmap it runs until every expert's factorisation succeeded, each keeping its first success.
  """
  mean_diag = jnp.mean(jnp.diagonal(h))

  def damp_at(i):
    retry = jnp.maximum(damp, _MIN_RETRY_DAMP) * damp_growth ** i.astype(h.dtype)
    return jnp.where(i == 0, jnp.asarray(damp, h.dtype), retry)

  def cond(state):
    i, _, ok = state
    return (~ok) & (i < max_tries - 1)

  def body(state):
    i, _, _ = state
    upper, ok = _upper_cholesky_of_inverse(h, damp_at(i + 1) * mean_diag)
    return i + 1, upper, ok

  init = (jnp.int32(-1), jnp.zeros_like(h), jnp.asarray(False))
  i, upper, ok = jax.lax.while_loop(cond, body, init)
  return upper, damp_at(i), ok


def _prune_block(w1, u1, num_prune, *, n_m):
  """Column-by-column OBS updates inside one block (paper layout).

  Args:
    w1: [rows, width] the block's weights after the lazy updates of earlier blocks.
    u1: [width, width] the block's diagonal part of U (upper triangular).
    num_prune: [] int, weights to prune in the block (unstructured only).
    n_m: static (n, m) or None.

  Returns:
    (w1, mask1, err1): w1 with every column updated (pruned entries not yet zeroed),
    mask1 [rows, width] 0/1, err1 [rows, width] the scaled errors for the lazy update.
  """
  rows, width = w1.shape
  diag = jnp.diagonal(u1)
  if n_m is None:
    mask1 = _keep_mask_lowest_flat(w1**2 / diag[None, :] ** 2, num_prune)
  else:
    mask1 = jnp.ones_like(w1)
  n, m = n_m if n_m is not None else (0, 1)

  def body(i, carry):
    w1, mask1, err1 = carry
    if n_m is not None:
      # A group's mask is chosen when the loop reaches its first column, from the weights
      # as updated by the columns before it (as in the reference implementation).
      group = jax.lax.dynamic_slice(w1, (0, i), (rows, m)) ** 2
      group = group / jax.lax.dynamic_slice(diag, (i,), (m,))[None, :] ** 2
      updated = jax.lax.dynamic_update_slice(mask1, _keep_mask_lowest_rows(group, n), (0, i))
      mask1 = jnp.where(i % m == 0, updated, mask1)
    col = w1[:, i]
    err = col * (1.0 - mask1[:, i]) / u1[i, i]
    # u1 is upper triangular, so the rank-one update leaves columns before i untouched.
    w1 = w1 - err[:, None] * u1[i][None, :]
    return w1, mask1, err1.at[:, i].set(err)

  w1, mask1, err1 = jax.lax.fori_loop(0, width, body, (w1, mask1, jnp.zeros_like(w1)))
  return w1, mask1, err1


@functools.partial(jax.jit, static_argnames=("n_m", "block_size"))
def _sparsegpt(w, h, damp, damp_growth, max_tries, num_prune, *, n_m, block_size):
  """num_prune: [2] int32, weights pruned in a full block and in the narrower last one."""
  d_in, d_out = w.shape
  w = w.astype(jnp.float32)
  h = h.astype(jnp.float32)
  dead = jnp.diagonal(h) == 0
  h = h + jnp.diag(dead.astype(h.dtype))
  weights = jnp.where(dead[None, :], 0.0, w.T)  # paper layout [rows = d_out, cols = d_in]
  upper, damp_used, ok = _damped_inverse_factor(h, damp, damp_growth, max_tries)

  # Blocks are unrolled with static slices, so each lazy update is one matmul over only
  # the columns after its block (no masked full-width update, no special last block), at
  # one compiled body per block (d_in / block_size: 5 and 12 for SmolLM2). On CPU the
  # time is ~90% the column loop inside the blocks (`_prune_block`), not these matmuls.
  width = min(block_size, d_in)
  mask = jnp.ones_like(weights)
  for i1 in range(0, d_in, width):
    i2 = min(i1 + width, d_in)
    w1, mask1, err1 = _prune_block(weights[:, i1:i2], upper[i1:i2, i1:i2],
                                   num_prune[0 if i2 - i1 == width else 1], n_m=n_m)
    weights = weights.at[:, i1:i2].set(w1 * mask1)
    mask = mask.at[:, i1:i2].set(mask1)
    if i2 < d_in:
      weights = weights.at[:, i2:].add(-err1 @ upper[i1:i2, i2:])
  weights = jnp.where(dead[None, :], 0.0, weights)
  return SparseGPTResult(weights.T, mask.T, damp_used, ok)


def sparsegpt_with_info(
    w: jax.Array,
    h: jax.Array,
    *,
    sparsity: float = 0.0,
    n_m=None,
    block_size: int = 128,
    damp: float = 0.01,
    damp_growth: float = DAMP_GROWTH,
    max_damp_tries: int = MAX_DAMP_TRIES,
) -> SparseGPTResult:
  """SparseGPT, also returning the damping used and whether factorisation succeeded.

  Jit-able and vmap-able (e.g. over experts' weights and Hessians); no host sync. See
  `sparsegpt` for the arguments.
  """
  _check_w(w)
  d_in = w.shape[0]
  sparsity = _check_sparsity(sparsity)
  n_m = _check_n_m(n_m, d_in)
  if jnp.shape(h) != (d_in, d_in):
    raise ValueError(f"h must have shape [d_in, d_in]={(d_in, d_in)}, got {jnp.shape(h)}")
  if not isinstance(block_size, int) or block_size <= 0:
    raise ValueError(f"block_size must be a positive int, got {block_size!r}")
  if n_m is not None and min(block_size, d_in) % n_m[1]:
    raise ValueError(f"block_size={block_size} must be a multiple of n_m's m={n_m[1]}")
  try:
    damp, damp_growth = float(damp), float(damp_growth)
  except (TypeError, ValueError):
    msg = f"damp and damp_growth must be numbers, got {damp!r}, {damp_growth!r}"
    raise ValueError(msg) from None
  if not damp >= 0:
    raise ValueError(f"damp must be >= 0, got {damp}")
  if not damp_growth > 1:
    raise ValueError(f"damp_growth must be > 1, got {damp_growth}")
  if not (isinstance(max_damp_tries, int) and max_damp_tries >= 1):
    raise ValueError(f"max_damp_tries must be an int >= 1, got {max_damp_tries!r}")
  d_out = w.shape[1]
  width = min(block_size, d_in)
  num_prune = [math.floor(sparsity * d_out * width), math.floor(sparsity * d_out * (d_in % width))]
  return _sparsegpt(
      jnp.asarray(w),
      jnp.asarray(h),
      jnp.float32(damp),
      jnp.float32(damp_growth),
      jnp.int32(max_damp_tries),
      jnp.asarray(num_prune, jnp.int32),
      n_m=n_m,
      block_size=block_size,
  )


def sparsegpt(
    w: jax.Array,
    h: jax.Array,
    *,
    sparsity: float = 0.0,
    n_m=None,
    block_size: int = 128,
    damp: float = 0.01,
    damp_growth: float = DAMP_GROWTH,
    max_damp_tries: int = MAX_DAMP_TRIES,
) -> tuple[jax.Array, jax.Array]:
  """SparseGPT one-shot pruning (Frantar & Alistarh 2023) with lazy block updates.

  Dead inputs (h_ii = 0) get h_ii = 1 and a zero row in the result. h is damped with
  damp * mean(diag h) * I; when the Cholesky factorisation of the damped h or of its
  inverse fails (small clusters give singular or numerically indefinite Hessians), it is
  retried with max(damp, 0.01) * damp_growth**i for i = 1 .. max_damp_tries - 1, inside
  one jitted `lax.while_loop`. Called eagerly, a total failure raises; inside a caller's
  jit/vmap it cannot, so use `sparsegpt_with_info` there and check `ok`.

  Args:
    w: [d_in, d_out] weights.
    h: [d_in, d_in] input Hessian, mean of x x^T over calibration inputs (any positive
      scale gives the same result).
    sparsity: fraction in [0, 1): floor(sparsity * width * d_out) weights pruned in each
      block of `width` inputs. Ignored when `n_m` is given.
    n_m: optional (n, m), 0 <= n < m: prune the n lowest of every m consecutive inputs of
      each output (d_in and block_size must be multiples of m).
    block_size: inputs per block (the paper's B = 128). Blocks are unrolled at trace
      time, so compile time grows with d_in / block_size (prefer 32 or more).
    damp: relative damping (the paper's 0.01).
    damp_growth: factor between retries.
    max_damp_tries: number of dampings tried, the first included.

  Returns:
    (w_pruned, mask): [d_in, d_out] float32 weights and float 0/1 mask (1 = kept).
  """
  res = sparsegpt_with_info(
      w,
      h,
      sparsity=sparsity,
      n_m=n_m,
      block_size=block_size,
      damp=damp,
      damp_growth=damp_growth,
      max_damp_tries=max_damp_tries,
  )
  try:
    failed = not bool(res.ok)
  except jax.errors.ConcretizationTypeError:
    failed = False  # traced inside a caller's jit/vmap: the caller checks sparsegpt_with_info
  if failed:
    raise ValueError(
        f"h: Cholesky factorisation failed for every damping up to {float(res.damp):g} "
        f"(max_damp_tries={max_damp_tries}); h must be symmetric positive semi-definite"
    )
  return res.w, res.mask
