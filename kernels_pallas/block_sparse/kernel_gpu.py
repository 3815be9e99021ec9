"""GPU (Pallas Triton) kernels for the block-sparse matmul.

Scalar prefetch is TPU-only, so the block lists travel as ordinary int32 inputs: each
program reads its own list and runs a `fori_loop` whose trip count is the number of
non-zero blocks, loading only those blocks (`pl.ds` at a data-dependent offset). An
all-zero block costs neither a load nor a MAC.

Same "grouped rows" layout and argument conventions as kernel_tpu.py. Triton needs
power-of-two tiles of at least 16 on every dot dimension.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.block_sparse.cost import block_loop

_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


def check_blocks(bm: int, bk: int, bn: int, kp: int, np_: int, dtype) -> None:
  del kp, np_, dtype
  for name, block in (("block_m", bm), ("bk", bk), ("bn", bn)):
    if block < 16 or block & (block - 1):
      raise ValueError(f"{name}={block} must be a power of two >= 16 for the GPU (Triton) "
                       "kernel; choose another block_shape")


# Shared memory a Triton program may use on Hopper (sm_90's opt-in limit per block).
SHARED_MEMORY_BYTES = 232448


# Triton computes element offsets in int32: an operand of 2**31 elements or more would wrap.
MAX_OPERAND_ELEMENTS = 2**31 - 1


def check_operand_sizes(rows: int, groups: int, kp: int, np_: int) -> None:
  """Every operand a kernel indexes (rows x Kp activations, rows x Np outputs and
  gradients, G x Kp x Np weights) must have fewer than 2**31 elements."""
  for name, elements in (("activations", rows * kp), ("outputs", rows * np_),
                         ("weights", groups * kp * np_)):
    if elements > MAX_OPERAND_ELEMENTS:
      raise ValueError(f"the GPU (Triton) kernel's {name} hold {elements:,} elements, more "
                       f"than its 32-bit offsets reach ({MAX_OPERAND_ELEMENTS:,}): split the "
                       "batch or the layer")


def _compiler_params(rows: int, cols: int, *, loop_bytes: int = 0):
  """Warps by output tile size; the software pipeline as deep as shared memory allows.

  Triton keeps (num_stages - 1) copies of each loop iteration's loaded tiles in shared
  memory beside the f32 output tile: for the weight gradient's two f32 128x128 tiles at
  three stages that is 2 x 128 KiB + 64 KiB = 327,680 bytes, what the deviceless H200
  compile reported over the 232,448 available. `loop_bytes` (the tiles one iteration
  loads, where they are staged this way) picks the deepest of 3 / 2 / 1 stages that fits.
  """
  out_bytes = rows * cols * 4
  stages = next((s for s in (3, 2) if (s - 1) * loop_bytes + out_bytes <= SHARED_MEMORY_BYTES),
                1)
  return pltriton.CompilerParams(num_warps=8 if rows * cols >= 128 * 128 else 4,
                                 num_stages=stages)


def _whole():
  return pl.BlockSpec()


def _masks(block_masks, premasked: bool) -> tuple:
  """The mask operands of a forward or input-gradient kernel: none when the weights are
  premasked (then the inner loop has no element multiply, and no mask load)."""
  return () if premasked else (block_masks,)


def forward(x_rows, w, col_rows, col_slots, col_counts, block_masks, layout, *,
            bm: int, premasked: bool = False, interpret: bool = False):
  """See kernel_tpu.forward; grid (tiles, Nb), one program per output block."""
  r, _ = x_rows.shape
  num_groups, _, np_ = w.shape
  bk, bn = block_masks.shape[-2:]
  nb = np_ // bn
  max_col = col_rows.shape[0] // (num_groups * nb)

  masks = _masks(block_masks, premasked)

  def kernel(tg_ref, na_ref, rows_ref, slots_ref, counts_ref, x_ref, w_ref, *m_and_o):
    *m_ref, o_ref = m_and_o
    i, j = pl.program_id(0), pl.program_id(1)
    g = tg_ref[i]
    col = g * nb + j
    count = jnp.where(i < na_ref[0], counts_ref[col], 0)
    row0 = pl.multiple_of(i * bm, bm)
    col0 = pl.multiple_of(j * bn, bn)

    def body(t, acc):
      k = rows_ref[col * max_col + t]
      k0 = pl.multiple_of(k * bk, bk)
      x_blk = x_ref[pl.ds(row0, bm), pl.ds(k0, bk)]
      w_blk = w_ref[g, pl.ds(k0, bk), pl.ds(col0, bn)]
      if m_ref:
        w_blk = w_blk * m_ref[0][g, slots_ref[col * max_col + t]].astype(w_blk.dtype)
      return acc + jnp.dot(x_blk, w_blk, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, count, body, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)

  itemsize = x_rows.dtype.itemsize
  cost = block_loop(steps=r // bm * nb * max_col, bm=bm, bk=bk, bn=bn,
                    loaded=bm * bk + bk * bn, itemsize=itemsize,
                    mask_bytes=len(masks) * bk * bn, out_bytes=r * np_ * itemsize)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((r, np_), x_rows.dtype),
      grid=(r // bm, nb),
      in_specs=[_whole()] * (7 + len(masks)),
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      compiler_params=_compiler_params(bm, bn),
      cost_estimate=cost,
      interpret=interpret,
      name="block_sparse_forward_gpu",
  )(layout.tile_group, layout.num_active, col_rows, col_slots, col_counts, x_rows, w, *masks)


def input_grad(dy_rows, w, row_cols, row_slots, row_counts, block_masks, layout, *,
               bm: int, premasked: bool = False, interpret: bool = False):
  """See kernel_tpu.input_grad; grid (tiles, Kb)."""
  r, _ = dy_rows.shape
  num_groups, kp, _ = w.shape
  bk, bn = block_masks.shape[-2:]
  kb = kp // bk
  max_row = row_cols.shape[0] // (num_groups * kb)

  masks = _masks(block_masks, premasked)

  def kernel(tg_ref, na_ref, cols_ref, slots_ref, counts_ref, dy_ref, w_ref, *m_and_o):
    *m_ref, o_ref = m_and_o
    i, k = pl.program_id(0), pl.program_id(1)
    g = tg_ref[i]
    row = g * kb + k
    count = jnp.where(i < na_ref[0], counts_ref[row], 0)
    row0 = pl.multiple_of(i * bm, bm)
    k0 = pl.multiple_of(k * bk, bk)

    def body(t, acc):
      n = cols_ref[row * max_row + t]
      n0 = pl.multiple_of(n * bn, bn)
      dy_blk = dy_ref[pl.ds(row0, bm), pl.ds(n0, bn)]
      w_blk = w_ref[g, pl.ds(k0, bk), pl.ds(n0, bn)]
      if m_ref:
        w_blk = w_blk * m_ref[0][g, slots_ref[row * max_row + t]].astype(w_blk.dtype)
      return acc + lax.dot_general(dy_blk, w_blk, _NT, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, count, body, jnp.zeros((bm, bk), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)

  itemsize = dy_rows.dtype.itemsize
  cost = block_loop(steps=r // bm * kb * max_row, bm=bm, bk=bk, bn=bn,
                    loaded=bm * bn + bk * bn, itemsize=itemsize,
                    mask_bytes=len(masks) * bk * bn, out_bytes=r * kp * itemsize)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((r, kp), dy_rows.dtype),
      grid=(r // bm, kb),
      in_specs=[_whole()] * (7 + len(masks)),
      out_specs=pl.BlockSpec((bm, bk), lambda i, k: (i, k)),
      compiler_params=_compiler_params(bm, bk),
      cost_estimate=cost,
      interpret=interpret,
      name="block_sparse_input_grad_gpu",
  )(layout.tile_group, layout.num_active, row_cols, row_slots, row_counts, dy_rows, w, *masks)


def weight_grad(x_rows, dy_rows, block_slots, block_masks, layout, *, num_groups: int,
                bm: int, out_dtype, interpret: bool = False):
  """See kernel_tpu.weight_grad; grid (G, Kb, Nb), each program loops over its group's tiles.

  Args:
    x_rows: [R, Kp].
    dy_rows: [R, Np].
    block_slots: [G * Kb * Nb] int32.
    block_masks: [G, S, bk, bn] int8.
    layout: a `layout.RowLayout` (uses group_tile_start and group_tile_count).
    num_groups, bm, out_dtype, interpret: as in kernel_tpu.weight_grad.

  Returns:
    [G, Kp, Np].
  """
  _, kp = x_rows.shape
  np_ = dy_rows.shape[1]
  bk, bn = block_masks.shape[-2:]
  kb, nb = kp // bk, np_ // bn

  def kernel(slots_ref, start_ref, tcount_ref, x_ref, dy_ref, m_ref, o_ref):
    g, k, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    slot = slots_ref[(g * kb + k) * nb + n]
    count = jnp.where(slot >= 0, tcount_ref[g], 0)
    start = start_ref[g]
    k0 = pl.multiple_of(k * bk, bk)
    n0 = pl.multiple_of(n * bn, bn)

    def body(t, acc):
      row0 = pl.multiple_of((start + t) * bm, bm)
      x_blk = x_ref[pl.ds(row0, bm), pl.ds(k0, bk)]
      dy_blk = dy_ref[pl.ds(row0, bm), pl.ds(n0, bn)]
      return acc + lax.dot_general(x_blk, dy_blk, _TN, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, count, body, jnp.zeros((bk, bn), jnp.float32))
    m_blk = m_ref[g, jnp.maximum(slot, 0)]
    o_ref[...] = (acc * m_blk.astype(jnp.float32)).astype(o_ref.dtype)

  cost = block_loop(steps=kb * nb * (x_rows.shape[0] // bm), bm=bm, bk=bk, bn=bn,
                    loaded=bm * (bk + bn), itemsize=x_rows.dtype.itemsize, mask_bytes=0,
                    out_bytes=num_groups * kp * np_ * (jnp.dtype(out_dtype).itemsize + 1))
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_groups, kp, np_), out_dtype),
      grid=(num_groups, kb, nb),
      in_specs=[_whole()] * 6,
      out_specs=pl.BlockSpec((pl.squeezed, bk, bn), lambda g, k, n: (g, k, n)),
      compiler_params=_compiler_params(
          bk, bn, loop_bytes=bm * (bk + bn) * jnp.dtype(x_rows.dtype).itemsize),
      cost_estimate=cost,
      interpret=interpret,
      name="block_sparse_weight_grad_gpu",
  )(block_slots, layout.group_tile_start, layout.group_tile_count, x_rows, dy_rows, block_masks)
