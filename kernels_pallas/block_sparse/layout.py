"""Row layouts: which weight group each tile of activation rows is multiplied by.

The kernels see activations as rows `[R, Kp]` cut into tiles of `bm` rows. Ensemble
members (a stacked `[G, B, K]` input) and routed experts (tokens with expert ids) both
reduce to this: tile `i` belongs to group `tile_group[i]`, groups occupy consecutive
tiles in ascending order, and every group owns at least one tile (so the TPU weight
gradient visits, and zeroes, the weight blocks of a group that received no rows).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class RowLayout(NamedTuple):
  """tile_group: [tiles]; num_active: [1] (tiles from here on are zero padding);
  group_tile_start, group_tile_count: [G] first tile and number of tiles of each group."""

  tile_group: jax.Array
  num_active: jax.Array
  group_tile_start: jax.Array
  group_tile_count: jax.Array


def stacked_layout(num_groups: int, tiles_per_group: int) -> RowLayout:
  """Layout of a `[G, Bp, Kp]` input reshaped to rows: `tiles_per_group` tiles per group."""
  tiles = num_groups * tiles_per_group
  return RowLayout(
      tile_group=jnp.arange(tiles, dtype=jnp.int32) // tiles_per_group,
      num_active=jnp.full((1,), tiles, jnp.int32),
      group_tile_start=jnp.arange(num_groups, dtype=jnp.int32) * tiles_per_group,
      group_tile_count=jnp.full((num_groups,), tiles_per_group, jnp.int32))


def max_routed_tiles(num_tokens: int, num_groups: int, bm: int) -> int:
  """Static bound on sum_g max(1, ceil(size_g / bm)) over any routing of the tokens."""
  return num_tokens // bm + num_groups


def routed_layout(group_ids: jax.Array, num_groups: int, bm: int,
                  num_tiles: int) -> tuple[RowLayout, jax.Array]:
  """Layout for tokens routed to groups, each group padded to whole tiles.

  Args:
    group_ids: [T] int, values in [0, num_groups).
    num_groups: G.
    bm: rows per tile.
    num_tiles: static number of tiles, at least `max_routed_tiles(T, G, bm)`.

  Returns:
    (layout, row) where row: [T] is the row of each token in the `[num_tiles * bm, ...]`
    grouped rows.
  """
  group_ids = group_ids.astype(jnp.int32)
  sizes = jnp.bincount(group_ids, length=num_groups).astype(jnp.int32)
  tiles = jnp.maximum(1, -(-sizes // bm))
  tile_end = jnp.cumsum(tiles)
  tile_start = tile_end - tiles
  tile_group = jnp.searchsorted(tile_end, jnp.arange(num_tiles, dtype=jnp.int32), side="right")
  tile_group = jnp.minimum(tile_group, num_groups - 1).astype(jnp.int32)
  order = jnp.argsort(group_ids, stable=True)
  sorted_ids = group_ids[order]
  rank = jnp.arange(group_ids.shape[0], dtype=jnp.int32) - (jnp.cumsum(sizes) - sizes)[sorted_ids]
  row_sorted = tile_start[sorted_ids] * bm + rank
  row = jnp.zeros_like(group_ids).at[order].set(row_sorted)
  layout = RowLayout(tile_group=tile_group, num_active=tile_end[-1:].astype(jnp.int32),
                     group_tile_start=tile_start.astype(jnp.int32),
                     group_tile_count=tiles.astype(jnp.int32))
  return layout, row
