"""Routed sparse-expert matmul: each token times its own expert's block-sparse weight.

Tokens are grouped by expert (each group padded to whole row tiles), every group is
multiplied by its expert's masked weight in ONE kernel launch whose row tiles carry
their expert id (the block-sparse kernels' grouped-rows layout, through the public
`block_sparse.grouped` calls), and the results are scattered back to token order. An
expert with no tokens costs one tile of zero rows; an all-zero weight block of any
expert is never loaded or multiplied.

`implementation` is one of kernels_pallas.implementations.IMPLEMENTATIONS: "xla" sorts
tokens and calls `jax.lax.ragged_dot` on the masked weights (XLA's grouped matmul);
"pallas" runs the kernel of the platform the computation is lowered for (interpreted on
CPU; `block_sparse.grouped.on_lowering_platform`); "auto" is the kernel on TPU and GPU,
"xla" on CPU, also chosen at lowering. `reference.expert_matmul_reference` is the
independent one-hot check.
"""

from __future__ import annotations

import functools
from typing import Annotated

import jax
import jax.numpy as jnp

from kernels_pallas import implementations
from kernels_pallas.block_sparse import grouped
from kernels_pallas.block_sparse.layout import RowLayout, max_routed_tiles, routed_layout
from kernels_pallas.block_sparse.metadata import BlockMetadata, BlockSparseMask


def _routed_xla(x, expert_ids, w, dense_masks):
  order = jnp.argsort(expert_ids, stable=True)
  sizes = jnp.bincount(expert_ids, length=w.shape[0]).astype(jnp.int32)
  y_sorted = jax.lax.ragged_dot(x[order], w * dense_masks.astype(w.dtype), sizes)
  return jnp.zeros_like(y_sorted).at[order].set(y_sorted)


def _scatter_rows(a: jax.Array, row: jax.Array, num_rows: int, width: int) -> jax.Array:
  return jnp.zeros((num_rows, width), a.dtype).at[row, :a.shape[1]].set(a)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _routed_matmul(cfg: grouped.KernelConfig, bm: int, x, w, meta: BlockMetadata,
                   layout: RowLayout, row):
  return _routed_matmul_fwd(cfg, bm, x, w, meta, layout, row)[0]


def _routed_matmul_fwd(cfg, bm, x, w, meta, layout, row):
  (_, k), (e, _, n) = x.shape, w.shape
  kp, np_ = grouped.padded_dims(meta, k, n)
  x_rows = _scatter_rows(x, row, layout.tile_group.shape[0] * bm, kp)
  w_p = grouped.pad_to(w, (e, kp, np_))
  y_rows = grouped.forward(cfg, x_rows, w_p, meta, layout, bm=bm)
  # x itself rides along only for its static shape (the gradient must be cut back to K).
  return y_rows[row, :n], (x_rows, w, w_p, meta, layout, row, x)


def _routed_matmul_bwd(cfg, bm, residuals, dy):
  x_rows, w, w_p, meta, layout, row, x = residuals
  (_, k), (_, _, n) = x.shape, w.shape
  dy_rows = _scatter_rows(dy.astype(x_rows.dtype), row, x_rows.shape[0], w_p.shape[2])
  dx_rows = grouped.input_grad(cfg, dy_rows, w_p, meta, layout, bm=bm)
  dw = grouped.weight_grad(cfg, x_rows, dy_rows, meta, layout, bm=bm, out_dtype=w_p.dtype)
  return dx_rows[row, :k], dw[:, :k, :n], None, None, None


_routed_matmul.defvjp(_routed_matmul_fwd, _routed_matmul_bwd)


def expert_matmul(
    x: Annotated[jax.Array, "t k"],
    expert_ids: Annotated[jax.Array, "t"],
    w: Annotated[jax.Array, "e k n"],
    expert_masks: BlockSparseMask,
    *,
    implementation: implementations.Implementation = "auto",
    backend: implementations.PallasBackend | None = None,
    block_m: int = grouped.DEFAULT_BLOCK_M,
    premasked: bool = False,
) -> Annotated[jax.Array, "t n"]:
  """y[t] = x[t] @ (w[e_t] * mask[e_t]) with each expert's empty blocks skipped.

  Args:
    x: [T, K] tokens (f32 or bf16).
    expert_ids: [T] int expert of each token, in [0, E) (ids out of range
      are clipped into range).
    w: [E, K, N] expert weights.
    expert_masks: BlockSparseMask built by `BlockSparseMask.from_masks(masks[E, K, N])`.
    implementation: one of kernels_pallas.implementations.IMPLEMENTATIONS.
    backend: with "pallas", force the "tpu" or "gpu" kernel (interpreted on CPU).
    block_m: row tile cap (shrunk for few tokens).
    premasked: promise that w is already zero off the masks (as pruned experts are):
      the kernels skip the element-mask multiply, as in `block_sparse_matmul`.

  Returns:
    [T, N] in the promoted dtype; differentiable in x and w.
  """
  if not isinstance(expert_masks, BlockSparseMask):
    raise TypeError(f"expert_masks must be a BlockSparseMask, got {type(expert_masks).__name__}")
  implementations.check_implementation(implementation, backend)
  if expert_masks.dense.ndim != 3:
    raise ValueError("expert_masks must be stacked [E, K, N] (BlockSparseMask.from_masks), got "
                     f"dense {expert_masks.dense.shape}")
  e, k, n = expert_masks.dense.shape
  if w.shape != (e, k, n):
    raise ValueError(f"w has shape {w.shape}, expected the masks' shape {(e, k, n)}")
  if x.ndim != 2 or x.shape[1] != k:
    raise ValueError(f"x has shape {x.shape}, expected [T, {k}]")
  if expert_ids.shape != x.shape[:1] or not jnp.issubdtype(expert_ids.dtype, jnp.integer):
    raise ValueError(f"expert_ids must be an int array of shape {x.shape[:1]}, got "
                     f"{expert_ids.dtype}{list(expert_ids.shape)}")
  dtype = jnp.result_type(x, w)
  x, w = x.astype(dtype), w.astype(dtype)
  expert_ids = jnp.clip(expert_ids.astype(jnp.int32), 0, e - 1)
  if implementation == "xla":
    return _routed_xla(x, expert_ids, w, expert_masks.dense)

  def kernel(cfg):  # the row tile and the routed layout depend on the kernel's tiling rules
    def run(x, expert_ids, w, meta):
      bm = grouped.row_tile(cfg, x.shape[0], meta, k, n, dtype)
      layout, row = routed_layout(expert_ids, e, bm, max_routed_tiles(x.shape[0], e, bm))
      return _routed_matmul(cfg, bm, x, w, meta, layout, row)
    return run

  def xla(x, expert_ids, w, meta):  # "auto" off TPU / GPU
    del meta
    return _routed_xla(x, expert_ids, w, expert_masks.dense)

  args = (x, expert_ids, w, expert_masks.blocks)
  if backend is not None:  # a forced kernel, chosen when traced (interpreted on CPU)
    return kernel(grouped.kernel_config(backend, block_m, premasked=premasked))(*args)
  return grouped.on_lowering_platform(kernel, xla if implementation == "auto" else None,
                                      *args, block_m=block_m, premasked=premasked)
