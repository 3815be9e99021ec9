"""Mosaic TPU kernels for the block-sparse matmul, driven by scalar prefetch.

All three kernels work on a "grouped rows" layout: the activations are rows `[R, Kp]`
cut into tiles of `bm` rows, tile `i` belongs to group `tile_group[i]` (an ensemble
member or an expert) and is multiplied by that group's weight `w[g]` under its mask.
Groups occupy consecutive tiles in ascending order and every group has at least one
tile. Tiles at or after `num_active[0]` are padding (zero rows).

The block index lists live in SMEM (scalar prefetch) and drive the BlockSpec index
maps, so an all-zero block is never copied and never multiplied: the reduction axis of
the grid only runs over the listed blocks, and padded list entries repeat the previous
block index, which the TPU pipeline recognises and does not copy again.

Metadata arrays are passed flat (1-D int32) because SMEM pads trailing dims.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.block_sparse.cost import block_loop

_NT = (((1,), (1,)), ((), ()))  # contract the last dims of both operands: a @ b.T


def check_blocks(bm: int, bk: int, bn: int, kp: int, np_: int, dtype) -> None:
  """Mosaic tiling: a block's last dim is a multiple of 128 or the whole padded dim."""
  sublane = 16 if jnp.dtype(dtype).itemsize == 2 else 8
  for name, block, dim in (("bk", bk, kp), ("bn", bn, np_)):
    if block % 128 and block != dim:
      raise ValueError(f"block_shape {name}={block} must be a multiple of 128 on TPU (or cover "
                       f"the whole padded dim {dim}); choose another block_shape")
  if bm % sublane:
    raise ValueError(f"block_m={bm} must be a multiple of {sublane} on TPU for {jnp.dtype(dtype)}")


# Scalar memory (SMEM) of TPU v4, v5e, v5p and v6e; the scalar-prefetch block lists live there.
SCALAR_MEMORY_BYTES = 1 << 20


def check_scalar_memory(meta, tiles: int) -> None:
  """The block lists a kernel prefetches into SMEM must fit: one launch's int32 lists
  (its row tiles' groups, and the forward's, input gradient's or weight gradient's block
  ids and slots over every group). Mosaic's own error for an overflow is only "Ran out of
  memory in memory space smem" (seen at 64 groups of a 4096x8192 layer)."""
  lists = {
      "forward": meta.col_block_rows.size + meta.col_block_slots.size
                 + meta.col_block_counts.size,
      "input gradient": meta.row_block_cols.size + meta.row_block_slots.size
                        + meta.row_block_counts.size,
      "weight gradient": meta.block_slots.size,
  }
  for kernel, entries in lists.items():
    used = 4 * (entries + tiles + 1)
    if used > SCALAR_MEMORY_BYTES:
      raise ValueError(
          f"the {kernel} kernel's block lists take {used:,} bytes of TPU scalar memory, more "
          f"than its {SCALAR_MEMORY_BYTES:,}: use larger blocks, fewer groups (members or "
          "experts) per call, or split the layer")


def _masked(w_ref, m_ref: list):
  """The weight block, times its mask block unless there is none (premasked weights)."""
  w_blk = w_ref[...]
  return w_blk * m_ref[0][...].astype(w_blk.dtype) if m_ref else w_blk


def _compiler_params():
  return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _masks(block_masks, premasked: bool, mask_spec) -> tuple[tuple, list]:
  """The mask operands and their BlockSpecs of a forward or input-gradient kernel: none
  when the weights are premasked (then no mask block is copied or multiplied)."""
  return ((), []) if premasked else ((block_masks,), [mask_spec])


def forward(x_rows, w, col_rows, col_slots, col_counts, block_masks, layout, *,
            bm: int, premasked: bool = False, interpret: bool = False):
  """y_rows = per-tile x_rows @ (w[g] * mask[g]).

  Args:
    x_rows: [R, Kp], R = tiles * bm.
    w: [G, Kp, Np].
    col_rows, col_slots: [G * Nb * max_col] int32 (flattened metadata).
    col_counts: [G * Nb] int32.
    block_masks: [G, S, bk, bn] int8.
    layout: a `layout.RowLayout` (tile_group, num_active, ...).
    bm: rows per tile.
    premasked: w is already zero off the mask: skip the element-mask multiply.
    interpret: run on CPU through the Pallas interpreter.

  Returns:
    [R, Np] in x_rows' dtype (f32 accumulation).
  """
  r, kp = x_rows.shape
  _, _, np_ = w.shape
  bk, bn = block_masks.shape[-2:]
  nb = np_ // bn
  max_col = col_rows.shape[0] // (w.shape[0] * nb)
  tiles = r // bm

  def base(i, j, t, tg):
    return (tg[i] * nb + j) * max_col + t

  def x_map(i, j, t, tg, na, rows, slots, counts):
    return i, rows[base(i, j, t, tg)]

  def w_map(i, j, t, tg, na, rows, slots, counts):
    return tg[i], rows[base(i, j, t, tg)], j

  def m_map(i, j, t, tg, na, rows, slots, counts):
    return tg[i], slots[base(i, j, t, tg)], 0, 0

  def o_map(i, j, t, tg, na, rows, slots, counts):
    return i, j

  sq = pl.squeezed
  masks, mask_specs = _masks(block_masks, premasked, pl.BlockSpec((sq, sq, bk, bn), m_map))

  def kernel(tg, na, rows, slots, counts, x_ref, w_ref, *rest):
    *m_ref, o_ref, acc_ref = rest
    i, j, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    count = jnp.where(i < na[0], counts[tg[i] * nb + j], 0)

    @pl.when(t == 0)
    def _():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(t < count)
    def _():
      acc_ref[...] += jnp.dot(x_ref[...], _masked(w_ref, m_ref),
                              preferred_element_type=jnp.float32)

    @pl.when(t == pl.num_programs(2) - 1)
    def _():
      o_ref[...] = acc_ref[...].astype(o_ref.dtype)

  itemsize = x_rows.dtype.itemsize
  cost = block_loop(steps=tiles * nb * max_col, bm=bm, bk=bk, bn=bn, loaded=bm * bk + bk * bn,
                    itemsize=itemsize, mask_bytes=len(masks) * bk * bn,
                    out_bytes=r * np_ * itemsize)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((r, np_), x_rows.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=(tiles, nb, max_col),
          in_specs=[pl.BlockSpec((bm, bk), x_map),
                    pl.BlockSpec((sq, bk, bn), w_map), *mask_specs],
          out_specs=pl.BlockSpec((bm, bn), o_map),
          scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)]),
      compiler_params=_compiler_params(),
      cost_estimate=cost,
      interpret=interpret,
      name="block_sparse_forward",
  )(layout.tile_group, layout.num_active, col_rows, col_slots, col_counts, x_rows, w, *masks)


def input_grad(dy_rows, w, row_cols, row_slots, row_counts, block_masks, layout, *,
               bm: int, premasked: bool = False, interpret: bool = False):
  """dx_rows = per-tile dy_rows @ (w[g] * mask[g]).T, skipping empty blocks.

  Args:
    dy_rows: [R, Np].
    w: [G, Kp, Np].
    row_cols, row_slots: [G * Kb * max_row] int32.
    row_counts: [G * Kb] int32.
    block_masks, layout, bm, premasked, interpret: as in `forward`.

  Returns:
    [R, Kp] in dy_rows' dtype.
  """
  r, np_ = dy_rows.shape
  _, kp, _ = w.shape
  bk, bn = block_masks.shape[-2:]
  kb = kp // bk
  max_row = row_cols.shape[0] // (w.shape[0] * kb)
  tiles = r // bm

  def base(i, k, t, tg):
    return (tg[i] * kb + k) * max_row + t

  def dy_map(i, k, t, tg, na, cols, slots, counts):
    return i, cols[base(i, k, t, tg)]

  def w_map(i, k, t, tg, na, cols, slots, counts):
    return tg[i], k, cols[base(i, k, t, tg)]

  def m_map(i, k, t, tg, na, cols, slots, counts):
    return tg[i], slots[base(i, k, t, tg)], 0, 0

  def o_map(i, k, t, tg, na, cols, slots, counts):
    return i, k

  sq = pl.squeezed
  masks, mask_specs = _masks(block_masks, premasked, pl.BlockSpec((sq, sq, bk, bn), m_map))

  def kernel(tg, na, cols, slots, counts, dy_ref, w_ref, *rest):
    *m_ref, o_ref, acc_ref = rest
    i, k, t = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    count = jnp.where(i < na[0], counts[tg[i] * kb + k], 0)

    @pl.when(t == 0)
    def _():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(t < count)
    def _():
      acc_ref[...] += lax.dot_general(dy_ref[...], _masked(w_ref, m_ref), _NT,
                                      preferred_element_type=jnp.float32)

    @pl.when(t == pl.num_programs(2) - 1)
    def _():
      o_ref[...] = acc_ref[...].astype(o_ref.dtype)

  itemsize = dy_rows.dtype.itemsize
  cost = block_loop(steps=tiles * kb * max_row, bm=bm, bk=bk, bn=bn, loaded=bm * bn + bk * bn,
                    itemsize=itemsize, mask_bytes=len(masks) * bk * bn,
                    out_bytes=r * kp * itemsize)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((r, kp), dy_rows.dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=5,
          grid=(tiles, kb, max_row),
          in_specs=[pl.BlockSpec((bm, bn), dy_map),
                    pl.BlockSpec((sq, bk, bn), w_map), *mask_specs],
          out_specs=pl.BlockSpec((bm, bk), o_map),
          scratch_shapes=[pltpu.VMEM((bm, bk), jnp.float32)]),
      compiler_params=_compiler_params(),
      cost_estimate=cost,
      interpret=interpret,
      name="block_sparse_input_grad",
  )(layout.tile_group, layout.num_active, row_cols, row_slots, row_counts, dy_rows, w, *masks)


def weight_grad(x_rows, dy_rows, block_slots, block_masks, layout, *, num_groups: int,
                bm: int, out_dtype, interpret: bool = False):
  """dw[g] = (x_rows[tiles of g].T @ dy_rows[tiles of g]) * mask[g], zero off the mask.

  The grid walks every (K-block, N-block) and, innermost, every tile, so each output
  block of each group is visited in one consecutive run (TPU writes an output block
  back when its index changes). A block whose slot is -1 gets no MAC and is written as
  zeros; its row tiles are redirected to the last tile so the pipeline does not copy
  activations it will not use.

  Args:
    x_rows: [R, Kp].
    dy_rows: [R, Np].
    block_slots: [G * Kb * Nb] int32 (-1 for an all-zero block).
    block_masks: [G, S, bk, bn] int8.
    layout: a `layout.RowLayout`.
    num_groups: G.
    bm: rows per tile.
    out_dtype: dtype of the weight gradient.
    interpret: run on CPU through the Pallas interpreter.

  Returns:
    [G, Kp, Np] weight gradient.
  """
  r, kp = x_rows.shape
  np_ = dy_rows.shape[1]
  bk, bn = block_masks.shape[-2:]
  kb, nb = kp // bk, np_ // bn
  tiles = r // bm

  def slot_of(k, n, i, tg, slots):
    return slots[(tg[i] * kb + k) * nb + n]

  def row_tile(k, n, i, tg, slots):
    return jnp.where(slot_of(k, n, i, tg, slots) >= 0, i, tiles - 1)

  def x_map(k, n, i, tg, slots):
    return row_tile(k, n, i, tg, slots), k

  def dy_map(k, n, i, tg, slots):
    return row_tile(k, n, i, tg, slots), n

  def m_map(k, n, i, tg, slots):
    return tg[i], jnp.maximum(slot_of(k, n, i, tg, slots), 0), 0, 0

  def o_map(k, n, i, tg, slots):
    return tg[i], k, n

  def kernel(tg, slots, x_ref, dy_ref, m_ref, o_ref, acc_ref):
    k, n, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    g = tg[i]
    first = jnp.logical_or(i == 0, tg[jnp.maximum(i - 1, 0)] != g)
    last = jnp.logical_or(i == tiles - 1, tg[jnp.minimum(i + 1, tiles - 1)] != g)

    @pl.when(first)
    def _():
      acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(slot_of(k, n, i, tg, slots) >= 0)
    def _():
      # Transpose in f32 (as megablox's tgmm does): Mosaic relayouts packed bf16 poorly.
      x_t = x_ref[...].astype(jnp.float32).swapaxes(0, 1).astype(x_ref.dtype)
      acc_ref[...] += jnp.dot(x_t, dy_ref[...], preferred_element_type=jnp.float32)

    @pl.when(last)
    def _():
      o_ref[...] = (acc_ref[...] * m_ref[...].astype(jnp.float32)).astype(o_ref.dtype)

  sq = pl.squeezed
  cost = block_loop(steps=kb * nb * tiles, bm=bm, bk=bk, bn=bn, loaded=bm * (bk + bn),
                    itemsize=x_rows.dtype.itemsize, mask_bytes=0,
                    out_bytes=num_groups * kp * np_ * (jnp.dtype(out_dtype).itemsize + 1))
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_groups, kp, np_), out_dtype),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(kb, nb, tiles),
          in_specs=[pl.BlockSpec((bm, bk), x_map),
                    pl.BlockSpec((bm, bn), dy_map),
                    pl.BlockSpec((sq, sq, bk, bn), m_map)],
          out_specs=pl.BlockSpec((sq, bk, bn), o_map),
          scratch_shapes=[pltpu.VMEM((bk, bn), jnp.float32)]),
      compiler_params=_compiler_params(),
      cost_estimate=cost,
      interpret=interpret,
      name="block_sparse_weight_grad",
  )(layout.tile_group, block_slots, x_rows, dy_rows, block_masks)
