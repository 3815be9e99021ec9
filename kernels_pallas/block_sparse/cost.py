"""The `pl.CostEstimate` every block-sparse kernel carries: an upper bound from static sizes.

XLA schedules the work around a custom call by its cost estimate (Mosaic TPU passes it
on; Pallas Triton drops it today, so on GPU it documents intent). What a kernel really
does depends on the mask and the routing, which are data when it is traced, so each
estimate counts the longest loop its static block lists allow: in the forward and input
gradient, every (row tile, output block) program walks a list of the longest length; in
the weight gradient, every tile of its group meets every block.
"""

from jax.experimental import pallas as pl


def block_loop(*, steps: int, bm: int, bk: int, bn: int, loaded: int, itemsize: int,
               mask_bytes: int, out_bytes: int) -> pl.CostEstimate:
  """`steps` block products of [bm, bk] x [bk, bn] (in either orientation), each loading
  `loaded` elements of `itemsize` bytes and `mask_bytes` of int8 mask, then `out_bytes`
  written."""
  return pl.CostEstimate(flops=2 * bm * bk * bn * steps,
                         bytes_accessed=steps * (loaded * itemsize + mask_bytes) + out_bytes,
                         transcendentals=0)
