"""One-shot pruning of linear layers: SparseGPT, Wanda and magnitude (unstructured and n:m).

All functions take weights in the library layout `w: [d_in, d_out]` (y = x @ w). SparseGPT
(Frantar & Alistarh 2023; ../shared/docs/papers.md, section 2) runs in that layout too: the
paper's W is w.T, its columns (inputs) are the rows of w here, and its "column i" is row i.

Every pruner returns `(w_pruned, mask)`: `mask` is a float 0/1 array of `w`'s shape (1 =
kept) and `w_pruned` is exactly zero wherever `mask` is 0. What "sparsity s" means is each
method's own definition, and it is met exactly (ties broken by position, never by a
threshold that could catch several equal scores):

* magnitude: `floor(s * d_in * d_out)` weights with the smallest |w| in the whole matrix.
* wanda: `floor(s * d_in)` weights of each output (each column of `w`) with the smallest
  score |w_ij| * ||X_i||_2.
* sparsegpt: inputs are processed in blocks of `block_size` (the last one may be narrower);
  in each block of `width` inputs, `floor(s * width * d_out)` weights with the smallest
  w^2 / [H^-1]_ii^2 (in the factored form of the paper) are pruned (the official code prunes
  the scores up to the (floor + 1)-th smallest: one weight more per block).
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
from jax.sharding import NamedSharding, PartitionSpec

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
    grams.append(_gram_rows(x, _placed_like_rows_of(x, padded)))
  return jnp.stack(grams), jnp.asarray(counts)


def _placed_like_rows_of(x, rows: np.ndarray) -> jax.Array:
  """Row indices split over the mesh axes that split x's rows (data-parallel calibration
  tokens), so each device sums the Gram of its share of a group and XLA adds them up;
  unsplit when x is (one device) or when they do not divide the rows."""
  placement = getattr(x, "sharding", None)
  if not isinstance(placement, NamedSharding) or not placement.spec or (
      placement.spec[0] is None):
    return jnp.asarray(rows)
  axes = placement.spec[0] if isinstance(placement.spec[0], tuple) else (placement.spec[0],)
  if rows.size % math.prod(placement.mesh.shape[a] for a in axes):
    return jnp.asarray(rows)
  return jax.device_put(rows, NamedSharding(placement.mesh, PartitionSpec(placement.spec[0])))


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


def _triangular_inverse(upper: jax.Array) -> jax.Array:
  """upper^-1 of an upper triangular [n, n] matrix, by back substitution in a fori_loop.

  Row i of the inverse is (e_i - upper[i] @ inverse) / upper[i, i] once the rows after i are
  known; the rows up to i are still zero then, so the full product is the right sum.
  """
  n = upper.shape[0]
  eye = jnp.eye(n, dtype=upper.dtype)

  def row(t, inverse):
    i = n - 1 - t
    upper_i = jax.lax.dynamic_index_in_dim(upper, i, keepdims=False)
    e_i = jax.lax.dynamic_index_in_dim(eye, i, keepdims=False)
    inverse_i = (e_i - upper_i @ inverse) / jax.lax.dynamic_index_in_dim(upper_i, i, keepdims=False)
    return jax.lax.dynamic_update_index_in_dim(inverse, inverse_i, i, 0)

  return jax.lax.fori_loop(0, n, row, jnp.zeros_like(upper))


class _Factor(NamedTuple):
  """SparseGPT's factor in blocks of `width` inputs (d padded to nb * width).

  Attributes:
    v_blocks: [nb, nb, width, width], v_blocks[b, c] = block (c, b) of V, where
      h + damp I = V V^T with V upper (padding: identity); zero for c > b.
    u_diag: [nb, width, width] the diagonal blocks of U = V^-1 (the inverses of V's).
  """

  v_blocks: jax.Array
  u_diag: jax.Array


def _upper_cholesky(h: jax.Array, damp_abs: jax.Array, width: int) -> tuple[_Factor, jax.Array]:
  """V with h + damp I = V V^T (V upper) in blocks, and whether it is a valid factor.

  The paper's factor U (H^-1 = U^T U, U upper) is V^-1: with J the reversal permutation,
  chol(J h J) = J V J gives h = V V^T, so h^-1 = V^-T V^-1. The paper factors, inverts and
  factors again; `_sparsegpt` needs only V's blocks and the inverses of its diagonal blocks,
  which one blocked pass from the bottom-right corner gives: LAPACK factors only the
  [width, width] diagonal blocks, XLA does the rest (matmuls, back substitution) in
  fori_loops. OpenBLAS's threaded factorisation of a whole matrix is fast on an idle CPU
  but stalls when other processes load it: on the shared 2-core CPU, 20 interleaved calls
  each for a 576 x 576 (1536 x 1536) h took a median of 1.08 s (0.23 s), at most 1.15 s
  (2.7 s), and this pass a median of 22 ms (104 ms), at most 32 ms (167 ms).
  """
  d = h.shape[0]
  num_blocks = -(-d // width)
  d_pad = num_blocks * width
  damped = jnp.pad(h + damp_abs * jnp.eye(d, dtype=h.dtype), ((0, d_pad - d),) * 2)
  damped = damped + jnp.diag(jnp.arange(d_pad) >= d).astype(h.dtype)
  h_cols = damped.reshape(d_pad, num_blocks, width).transpose(1, 0, 2)  # [b]: h[:, block b]
  row_block = jnp.arange(d_pad) // width

  def column(t, carry):
    v_cols, u_diag = carry  # v_cols[c] = V[:, block c], known for c > b
    b = num_blocks - 1 - t
    # V[:, b] V[b, b]^T = h[:, b] - sum_{c > b} V[:, c] V[b, c]^T.
    def minus_later(c, rest):
      return rest - v_cols[c] @ jax.lax.dynamic_slice_in_dim(v_cols[c], b * width, width).T
    rest = jax.lax.fori_loop(b + 1, num_blocks, minus_later, h_cols[b])
    v_bb = jnp.linalg.cholesky(jax.lax.dynamic_slice_in_dim(rest, b * width, width)[::-1, ::-1])
    v_bb = v_bb[::-1, ::-1]
    u_bb = _triangular_inverse(v_bb)
    v_col = jnp.where((row_block < b)[:, None], rest @ u_bb.T, 0.0)
    v_col = jax.lax.dynamic_update_slice_in_dim(v_col, v_bb, b * width, 0)
    return v_cols.at[b].set(v_col), u_diag.at[b].set(u_bb)

  init = (jnp.zeros((num_blocks, d_pad, width), h.dtype),
          jnp.zeros((num_blocks, width, width), h.dtype))
  v_cols, u_diag = jax.lax.fori_loop(0, num_blocks, column, init)
  ok = (jnp.all(jnp.isfinite(v_cols)) & jnp.all(jnp.isfinite(u_diag))
        & jnp.all(jnp.diagonal(u_diag, axis1=-2, axis2=-1) > 0))
  v_blocks = v_cols.reshape(num_blocks, num_blocks, width, width)
  return _Factor(v_blocks, u_diag), ok


def _damped_cholesky(h, damp, damp_growth, max_tries, width):
  """`_upper_cholesky` of h, retrying with growing damping inside a while_loop.

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
    factor, ok = _upper_cholesky(h, damp_at(i + 1) * mean_diag, width)
    return i + 1, factor, ok

  shapes = jax.eval_shape(lambda: _upper_cholesky(h, mean_diag, width)[0])
  init = (jnp.int32(-1), jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
          jnp.asarray(False))
  i, factor, ok = jax.lax.while_loop(cond, body, init)
  return factor, damp_at(i), ok


def _keep_mask_group(scores: jax.Array, n: int) -> jax.Array:
  """0/1 mask over `scores: [m, r]` pruning the n lowest of each column (ties by position).

  Ranks from all m * m comparisons: for SparseGPT's small groups 6x (m = 4) and 10x (m = 8)
  faster on CPU than sorting each of 1536 columns.
  """
  m = scores.shape[0]
  earlier = (jnp.arange(m)[None, :] < jnp.arange(m)[:, None])[:, :, None]  # [j, k, 1]: k < j
  other, this = scores[None, :, :], scores[:, None, :]
  rank = jnp.sum((other < this) | ((other == this) & earlier), axis=1)
  return (rank >= n).astype(jnp.float32)


def _sub_block_size(width: int, n_m) -> int:
  """Inputs per sub-block: the largest divisor of `width` up to 32, a multiple of n:m's m."""
  unit = 1 if n_m is None else n_m[1]
  return unit * max(g for g in range(1, max(32 // unit, 1) + 1) if (width // unit) % g == 0)


def _prune_block(w1, u1, num_prune, valid, *, n_m, sub):
  """SparseGPT's input-by-input OBS updates inside one block (library layout).

  Sub-blocks of `sub` inputs run in turn, and inside one the inputs (left-looking): an input's
  current value is its value at the sub-block's start minus the errors of the sub-block's
  earlier inputs times its column of U, one [sub] x [sub, d_out] product. A sub-block's errors
  then update the block's later inputs in one matmul. The paper's loop instead rewrites the
  whole [d_out, width] block after every input.

  Args:
    w1: [width, d_out] the block's weights after the updates from earlier blocks.
    u1: [width, width] the block's diagonal block of U (upper triangular).
    num_prune: [] int, weights to prune in the block (unstructured only).
    valid: [] int, inputs of the block that are real (the rest pad the last block).
    n_m: static (n, m) or None.
    sub: static sub-block size, dividing width (and a multiple of m).

  Returns:
    (w1, mask1), each [width, d_out]: the pruned and updated weights and the 0/1 mask.
  """
  width, d_out = w1.shape
  diag = jnp.diagonal(u1)
  if n_m is None:
    scores = jnp.where(jnp.arange(width)[:, None] < valid, (w1 / diag[:, None]) ** 2, jnp.inf)
    # Ties go by position in the paper's layout [d_out, width], as the reference breaks them.
    keep = _keep_mask_lowest_flat(scores.T, num_prune).T
  else:
    keep = jnp.ones_like(w1)
  n, m = n_m if n_m is not None else (0, 1)
  subs = np.arange(width) // sub
  u_later_t = (u1 * jnp.asarray(subs[None, :] > subs[:, None], u1.dtype)).T

  def sub_block(j, carry):
    w1, keep = carry
    j1 = j * sub
    start = jax.lax.dynamic_slice_in_dim(w1, j1, sub)  # [sub, d_out]
    u_sub = jax.lax.dynamic_slice(u1, (j1, j1), (sub, sub))

    def group(g, state):  # the m inputs of an n:m group (one input when unstructured)
      current, errs, keep = state
      i0 = g * m
      if n_m is None:
        keep_group = jax.lax.dynamic_slice_in_dim(keep, j1 + i0, 1)
      else:
        # A group's mask is chosen when the loop reaches its first input, from the weights
        # as updated by the inputs before it (as in the reference implementation).
        cols = jax.lax.dynamic_slice_in_dim(u_sub, i0, m, axis=1)  # [sub, m]
        values = jax.lax.dynamic_slice_in_dim(start, i0, m) - cols.T @ errs
        diag_group = jax.lax.dynamic_slice_in_dim(jnp.diagonal(u_sub), i0, m)
        keep_group = _keep_mask_group((values / diag_group[:, None]) ** 2, n)
        keep = jax.lax.dynamic_update_slice_in_dim(keep, keep_group, j1 + i0, 0)
      for k in range(m):
        i = i0 + k
        u_col = jax.lax.dynamic_index_in_dim(u_sub, i, 1, keepdims=False)  # [sub]
        x = jax.lax.dynamic_index_in_dim(start, i, 0, keepdims=False) - u_col @ errs
        err = x * (1.0 - keep_group[k]) / jax.lax.dynamic_index_in_dim(u_col, i, 0, False)
        current = jax.lax.dynamic_update_index_in_dim(current, x, i, 0)
        errs = jax.lax.dynamic_update_index_in_dim(errs, err, i, 0)
      return current, errs, keep

    zeros = jnp.zeros((sub, d_out), w1.dtype)
    current, errs, keep = jax.lax.fori_loop(0, sub // m, group, (zeros, zeros, keep))
    w1 = w1 - jax.lax.dynamic_slice_in_dim(u_later_t, j1, sub, axis=1) @ errs
    w1 = jax.lax.dynamic_update_slice_in_dim(w1, current, j1, 0)
    return w1, keep

  w1, keep = jax.lax.fori_loop(0, -(-valid // sub), sub_block, (w1, keep))
  return w1 * keep, keep


@functools.partial(jax.jit, static_argnames=("n_m", "block_size"))
def _sparsegpt(w, h, damp, damp_growth, max_tries, num_prune, *, n_m, block_size):
  """num_prune: [2] int32, weights pruned in a full block and in the narrower last one.

  Blocks run in a `fori_loop` (one compiled body whatever d_in), the last one padded to the
  block width with zero weights on an identity factor. The paper applies each block's errors
  to all later inputs at once (W[:, i2:] -= Err1 U[i1:i2, i2:]), which needs U = V^-1. Here
  block b instead gathers the updates of the earlier blocks c when it starts (left-looking).
  With P = E U (the total update of every input, P_c = W0_c - pruned W_c once block c is
  done) and U V = I, P_b = sum_{c<b} E_c U[c, b] + E_b U[b, b] and P V = E give
  sum_{c<b} E_c U[c, b] = -(sum_{c<b} P_c V[c, b]) U[b, b]: one [width, width] matmul per
  pair c < b, and only V's diagonal blocks inverted.
  """
  d_in, d_out = w.shape
  w = w.astype(jnp.float32)
  h = h.astype(jnp.float32)
  dead = jnp.diagonal(h) == 0
  h = h + jnp.diag(dead.astype(h.dtype))
  width = min(block_size, d_in)
  factor, damp_used, ok = _damped_cholesky(h, damp, damp_growth, max_tries, width)

  num_blocks = -(-d_in // width)
  d_pad = num_blocks * width
  last = d_in - (num_blocks - 1) * width
  weights = jnp.pad(jnp.where(dead[:, None], 0.0, w), ((0, d_pad - d_in), (0, 0)))
  blocks = jnp.arange(num_blocks)
  weight_blocks = weights.reshape(num_blocks, width, d_out)
  counts = jnp.where(blocks == num_blocks - 1, num_prune[1] if last < width else num_prune[0],
                     num_prune[0])
  sub = _sub_block_size(width, n_m)

  def block(b, carry):
    received, pruned, mask = carry  # received[c] = P_c^T for c < b
    gathered = jax.lax.fori_loop(0, b, lambda c, acc: acc + factor.v_blocks[b, c].T @ received[c],
                                 jnp.zeros((width, d_out), jnp.float32))
    u1 = factor.u_diag[b]
    valid = jnp.where(b == num_blocks - 1, last, width)
    w1, mask1 = _prune_block(weight_blocks[b] + u1.T @ gathered, u1, counts[b], valid,
                             n_m=n_m, sub=sub)
    # P_b = (E U)[:, b] is everything that moved block b's weights: W0_b - (pruned W_b).
    received = received.at[b].set(weight_blocks[b] - w1)
    return received, pruned.at[b].set(w1), mask.at[b].set(mask1)

  zeros = jnp.zeros_like(weight_blocks)
  _, pruned, mask = jax.lax.fori_loop(0, num_blocks, block, (zeros, zeros, zeros))
  pruned = jnp.where(dead[:, None], 0.0, pruned.reshape(d_pad, d_out)[:d_in])
  return SparseGPTResult(pruned, mask.reshape(d_pad, d_out)[:d_in], damp_used, ok)


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
  damp * mean(diag h) * I; when its Cholesky factorisation fails or is not finite (small
  clusters give singular or numerically indefinite Hessians), it is retried with
  max(damp, 0.01) * damp_growth**i for i = 1 .. max_damp_tries - 1, inside one jitted
  `lax.while_loop`. Called eagerly, a total failure raises; inside a caller's
  jit/vmap it cannot, so use `sparsegpt_with_info` there and check `ok`.

  Args:
    w: [d_in, d_out] weights.
    h: [d_in, d_in] input Hessian, mean of x x^T over calibration inputs (any positive
      scale gives the same result).
    sparsity: fraction in [0, 1): floor(sparsity * width * d_out) weights pruned in each
      block of `width` inputs. Ignored when `n_m` is given.
    n_m: optional (n, m), 0 <= n < m: prune the n lowest of every m consecutive inputs of
      each output (d_in and block_size must be multiples of m).
    block_size: inputs per block (the paper's B = 128); the blocks run in one compiled
      loop whatever d_in / block_size. It is also the width of the diagonal blocks that
      LAPACK factors, and a sequential loop runs over each block's inputs, so very large
      blocks are slow.
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
