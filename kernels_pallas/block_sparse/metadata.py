"""Host-side block metadata for a fixed 0/1 mask: the `BlockSparseMask` pytree (data only).

A fixed mask `[K, N]` is cut into blocks of `block_shape = (bk, bn)` (after zero-padding
K and N up to multiples of the block). Computed once on the host, like splash
attention's MaskInfo, into a `BlockMetadata` (the mask's `blocks`, all the kernels read):

* per output column-block `j` the K-blocks that hold at least one non-zero, padded to a
  static maximum by repeating the last entry (a repeated block index makes the TPU
  pipeline skip the copy), with their counts (forward pass, `x @ (w * mask)`);
* per K-block the non-zero N-blocks (input gradient, `dy @ (w * mask).T`);
* a `[Kb, Nb]` table of slots (`-1` for an all-zero block; weight gradient);
* packed element masks `[S, bk, bn]` (int8): slot 0 is all ones and is shared by every
  full block, slots 1.. hold the partly-filled blocks, so the kernel can apply the
  element mask without a second dense array.

Array leaves may carry a leading member axis (`from_masks`), so the object can be
vmapped together with member weights whose masks differ. The object is data only: the
functions that multiply by it (`block_sparse_matmul`, `expert_matmul`) take it as an
argument together with `implementation=` (kernels_pallas.implementations).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_BLOCK = 128
MIN_BLOCK = 16


def _next_power_of_2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def fit_block(requested: int, dim: int) -> int:
  """The block size used for a dimension: `requested`, shrunk for small dims.

  A dimension smaller than the requested block gets one block of
  `max(16, next_power_of_2(dim))` (16 is the smallest tile GPU dots accept), so a
  [64, 16] layer is one [64, 16] block instead of being padded to [128, 128].
  """
  return min(int(requested), max(MIN_BLOCK, _next_power_of_2(dim)))


def padded(dim: int, block: int) -> int:
  return -(-dim // block) * block


def _as_binary(mask, name: str) -> np.ndarray:
  mask = np.asarray(mask)
  if mask.dtype == bool:
    return mask
  if not np.all((mask == 0) | (mask == 1)):
    raise ValueError(f"{name} must hold only 0 and 1 (a fixed binary mask)")
  return mask != 0


def _block_structure(mask: np.ndarray, block_shape: tuple[int, int]):
  """Per-block non-zero flags and fullness of one padded [Kp, Np] binary mask."""
  bk, bn = block_shape
  k, n = mask.shape
  kp, np_ = padded(k, bk), padded(n, bn)
  full = np.zeros((kp, np_), bool)
  full[:k, :n] = mask
  blocks = full.reshape(kp // bk, bk, np_ // bn, bn).transpose(0, 2, 1, 3)
  nnz = blocks.reshape(blocks.shape[0], blocks.shape[1], -1).sum(-1)
  return blocks, nnz > 0, nnz == bk * bn


def _pad_lists(lists: Sequence[Sequence[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
  """Pads ragged index lists to `width` by repeating the last entry (0 if empty)."""
  out = np.zeros((len(lists), width), np.int32)
  counts = np.zeros((len(lists),), np.int32)
  for r, items in enumerate(lists):
    counts[r] = len(items)
    if items:
      out[r, :len(items)] = items
      out[r, len(items):] = items[-1]
  return out, counts


def _host_metadata(mask: np.ndarray, block_shape: tuple[int, int], max_col: int, max_row: int,
                   num_slots: int) -> dict[str, np.ndarray]:
  blocks, nonzero, full = _block_structure(mask, block_shape)
  kb, nb = nonzero.shape
  slots = np.full((kb, nb), -1, np.int32)
  block_masks = np.zeros((num_slots,) + tuple(block_shape), np.int8)
  block_masks[0] = 1
  next_slot = 1
  for r in range(kb):
    for c in range(nb):
      if full[r, c]:
        slots[r, c] = 0
      elif nonzero[r, c]:
        slots[r, c] = next_slot
        block_masks[next_slot] = blocks[r, c]
        next_slot += 1
  col_lists = [list(np.nonzero(nonzero[:, c])[0]) for c in range(nb)]
  row_lists = [list(np.nonzero(nonzero[r, :])[0]) for r in range(kb)]
  col_rows, col_counts = _pad_lists(col_lists, max_col)
  row_cols, row_counts = _pad_lists(row_lists, max_row)
  col_slots = slots[col_rows, np.arange(nb)[:, None]]
  row_slots = slots[np.arange(kb)[:, None], row_cols]
  # A padded entry of an all-zero column points at block 0 whose slot may be -1; the
  # kernel never multiplies by it, but the index must stay in range.
  col_slots = np.maximum(col_slots, 0)
  row_slots = np.maximum(row_slots, 0)
  return dict(col_block_rows=col_rows, col_block_slots=col_slots, col_block_counts=col_counts,
              row_block_cols=row_cols, row_block_slots=row_slots, row_block_counts=row_counts,
              block_slots=slots, block_masks=block_masks)


def _sizes(mask: np.ndarray, block_shape: tuple[int, int]) -> tuple[int, int, int]:
  """(max non-zero K-blocks per column-block, max N-blocks per K-block, slots needed)."""
  _, nonzero, full = _block_structure(mask, block_shape)
  partial = int(np.sum(nonzero & ~full))
  return int(nonzero.sum(0).max()), int(nonzero.sum(1).max()), 1 + partial


def _resolve_block_shape(block_shape, shape: tuple[int, int]) -> tuple[int, int]:
  if block_shape is None:
    block_shape = (DEFAULT_BLOCK, DEFAULT_BLOCK)
  if (len(block_shape) != 2
      or not all(isinstance(b, (int, np.integer)) and b > 0 for b in block_shape)):
    raise ValueError(f"block_shape must be two positive ints (bk, bn), got {block_shape!r}")
  return fit_block(block_shape[0], shape[0]), fit_block(block_shape[1], shape[1])


class BlockMetadata(NamedTuple):
  """What the kernels read of a mask: its block index lists and packed element masks.

  Attributes (a leading member axis `[M, ...]` on each when built by `from_masks`):
    col_block_rows: [Nb, max_col] non-zero K-block ids per N-block (padded).
    col_block_slots: [Nb, max_col] their slots in `block_masks`.
    col_block_counts: [Nb] how many entries of each row are real.
    row_block_cols: [Kb, max_row] non-zero N-block ids per K-block (padded).
    row_block_slots: [Kb, max_row] their slots.
    row_block_counts: [Kb].
    block_slots: [Kb, Nb] slot of each block, -1 where the block is all zero.
    block_masks: [S, bk, bn] int8 element masks; slot 0 is all ones.
  """

  col_block_rows: jax.Array
  col_block_slots: jax.Array
  col_block_counts: jax.Array
  row_block_cols: jax.Array
  row_block_slots: jax.Array
  row_block_counts: jax.Array
  block_slots: jax.Array
  block_masks: jax.Array


@dataclasses.dataclass(frozen=True)
class BlockSparseMask:
  """A fixed 0/1 mask `[K, N]` with the block metadata a skipping kernel needs.

  A registered pytree: the arrays are leaves (jit, vmap and scan trace them, so a new
  mask of the same static sizes does not recompile) and `shape` / `block_shape` are
  static aux data. Build it with `from_mask` / `from_masks` on the host; multiply with
  `block_sparse_matmul(x, w, mask, implementation=...)` or `expert_matmul`.

  Attributes:
    dense: [K, N] the 0/1 mask itself (float32), for counting and re-applying.
    blocks: the BlockMetadata the kernels read (the dense mask stays behind).
    shape: static (K, N).
    block_shape: static (bk, bn).
  Every array carries a leading member axis `[M, ...]` when built by `from_masks`.
  """

  dense: jax.Array
  blocks: BlockMetadata
  shape: tuple[int, int]
  block_shape: tuple[int, int]

  @classmethod
  def from_mask(cls, mask, *, block_shape: tuple[int, int] | None = None) -> BlockSparseMask:
    """Builds the metadata of one fixed mask on the host.

    Args:
      mask: [K, N] 0/1 (or bool) array; it must be concrete (numpy or a device array),
        not a tracer: metadata is computed once, outside jit.
      block_shape: (bk, bn), default (128, 128); each is shrunk to
        `max(16, next_power_of_2(dim))` for a smaller dimension.

    Returns:
      A BlockSparseMask without a member axis.
    """
    mask = _as_binary(mask, "mask")
    if mask.ndim != 2:
      raise ValueError(f"mask must be 2-D [K, N], got shape {mask.shape}")
    stacked = cls.from_masks(mask[None], block_shape=block_shape)
    return jax.tree.map(lambda leaf: leaf[0], stacked)

  @classmethod
  def from_masks(cls, masks, *, block_shape: tuple[int, int] | None = None) -> BlockSparseMask:
    """Builds stacked metadata for masks `[M, K, N]` that share one static maximum.

    Args:
      masks: [M, K, N] 0/1 (or bool) array, one mask per member or expert.
      block_shape: as in `from_mask`.

    Returns:
      A BlockSparseMask whose array leaves have a leading axis M (vmap it with the
      members' weights, or pass it to `expert_matmul`).
    """
    masks = _as_binary(masks, "masks")
    if masks.ndim != 3 or masks.shape[0] == 0:
      raise ValueError(f"masks must be 3-D [M, K, N] with M >= 1, got shape {masks.shape}")
    shape = (int(masks.shape[1]), int(masks.shape[2]))
    block_shape = _resolve_block_shape(block_shape, shape)
    sizes = np.array([_sizes(m, block_shape) for m in masks])
    # At least one entry per list keeps every grid non-empty.
    max_col, max_row, num_slots = (max(1, int(s)) for s in sizes.max(0))
    per_member = [_host_metadata(m, block_shape, max_col, max_row, num_slots) for m in masks]
    blocks = BlockMetadata(**{k: jnp.asarray(np.stack([p[k] for p in per_member]))
                              for k in BlockMetadata._fields})
    return cls(dense=jnp.asarray(masks, jnp.float32), blocks=blocks, shape=shape,
               block_shape=block_shape)


jax.tree_util.register_dataclass(
    BlockSparseMask, data_fields=["dense", "blocks"], meta_fields=["shape", "block_shape"])


def block_density(mask: BlockSparseMask) -> float:
  """Fraction of blocks that hold a non-zero (host-side; needs concrete arrays).

  The share of the dense matmul's weight blocks the kernel reads and multiplies: for cost
  reports of compressed models (bytes, expected speed-up) and for choosing a block shape.
  """
  return float(np.mean(np.asarray(mask.blocks.block_slots) >= 0))
