"""Mosaic GPU (Hopper) kernels for the block-sparse forward and input gradient.

Pallas Triton is deprecated from jax 0.11; Mosaic GPU is the path to Hopper's TMA and
wgmma. Each kernel is a persistent grid of one program per SM looping over the output
blocks (`plgpu.nd_loop`). For an output block, a software pipeline (`plgpu.emit_pipeline`)
whose length is that block's count of non-empty weight blocks TMA-loads only those
blocks of the activations and weights into shared memory, `max_concurrent_steps` ahead,
and multiplies them with wgmma into an f32 accumulator; the result leaves through shared
memory by TMA. An empty block is never loaded or multiplied.

Limits, so `applies` sends everything else to the Triton kernels (kernel_gpu.py):
  - premasked weights only: the element mask would have to be applied in shared memory
    between the TMA load and the wgmma, which is what serialised the Triton loop;
  - 16-bit inputs: f32 (TF32) wgmma cannot read the weight block transposed, which the
    [bk, bn] row-major blocks need ("Only f16 WGMMA supports transposes");
  - row tiles of 64 or 128 (one or two wgmma M tiles) and blocks of whole 64-element
    swizzle tiles;
  - jax >= 0.11, where Pallas Triton is deprecated (on jax 0.10 Triton runs).
The weight gradient stays on Triton (its mask is applied once, in the epilogue).

Same "grouped rows" layout and argument conventions as kernel_tpu.py and kernel_gpu.py.
On CPU the kernels run in Mosaic GPU's own interpreter (which simulates shared memory,
TMA and barriers), not the generic Pallas one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels_pallas.block_sparse.cost import block_loop
from kernels_pallas.block_sparse.kernel_gpu import SHARED_MEMORY_BYTES

MIN_JAX = (0, 11)
DTYPES = (jnp.bfloat16, jnp.float16)


def _jax_version() -> tuple[int, int]:
  major, minor = jax.__version_info__[:2]
  return major, minor


def applies(premasked: bool, dtype, bm: int, bk: int, bn: int) -> bool:
  """Whether the Mosaic GPU kernels run this call (else Triton's); see the module doc."""
  return (_jax_version() >= MIN_JAX and premasked
          and jnp.dtype(dtype) in [jnp.dtype(d) for d in DTYPES]
          and bm in (64, 128) and bk % 64 == 0 and bn % 64 == 0
          and _pipeline_steps(bm, bk, bn, max(bk, bn), jnp.dtype(dtype).itemsize) is not None)


def _swizzled(cols: int, dtype) -> tuple:
  """The shared-memory tiling and swizzle TMA and wgmma want for rows of `cols` elements."""
  itemsize = jnp.dtype(dtype).itemsize
  swizzle = plgpu.find_swizzle(cols * itemsize * 8)
  return plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle)


def _num_sms() -> int:
  """SMs of the target GPU: the abstract mesh's device (an ahead-of-time compile names
  it), else the default device's; the interpreter on CPU gets a few."""
  abstract = jax.sharding.get_abstract_mesh().abstract_device
  if abstract is not None and abstract.num_cores:
    return abstract.num_cores
  return getattr(jax.devices()[0], "core_count", None) or 4


def _pipeline_steps(bm: int, bk: int, bn: int, out_cols: int, itemsize: int) -> int | None:
  """The deepest pipeline (4 to 2 steps) whose staged blocks and output tile fit Hopper's
  shared memory (None: not even 2)."""
  per_step = (bm * max(bk, bn) + bk * bn) * itemsize
  out = bm * out_cols * itemsize
  return next((s for s in (4, 3, 2) if s * per_step + out <= SHARED_MEMORY_BYTES), None)


def _block_list_matmul(a_rows, w, lists, counts, layout, *, bm: int, bk: int, bn: int,
                       transpose_w: bool, interpret: bool, name: str):
  """Per row tile i of group g and output block o: sum over the listed blocks t of
  a_rows[i, t] @ w[g, t, o] (forward: a = x, o an N block, t a K block) or
  a_rows[i, t] @ w[g, o, t].T (input gradient: a = dy, o a K block, t an N block)."""
  r, _ = a_rows.shape
  groups, kp, np_ = w.shape
  a_block, out_block = (bn, bk) if transpose_w else (bk, bn)
  out_blocks = (kp if transpose_w else np_) // out_block
  max_list = lists.shape[0] // (groups * out_blocks)
  tiles = r // bm
  dtype = a_rows.dtype
  itemsize = jnp.dtype(dtype).itemsize
  steps = _pipeline_steps(bm, bk, bn, out_block, itemsize)

  def body(tg_ref, na_ref, list_ref, count_ref, a_gmem, w_gmem, o_gmem):
    @plgpu.nd_loop((tiles * out_blocks,), collective_axes="sm")
    def _(info):
      (linear,) = info.index
      i, o = linear // out_blocks, linear % out_blocks
      g = tg_ref[i]
      base = (g * out_blocks + o) * max_list
      count = jnp.where(i < na_ref[0], count_ref[g * out_blocks + o], 0)

      def w_index(t):
        listed = list_ref[base + t]
        return (o, listed) if transpose_w else (listed, o)

      def multiply(acc_ref):
        @pl.when(count > 0)
        def _():
          plgpu.emit_pipeline(
              lambda _, a_smem, w_smem: plgpu.wgmma(
                  acc_ref, a_smem, w_smem.transpose((1, 0)) if transpose_w else w_smem),
              grid=(count,),
              in_specs=[
                  plgpu.BlockSpec((bm, a_block), lambda t: (i, list_ref[base + t]),
                                  transforms=_swizzled(a_block, dtype)),
                  plgpu.BlockSpec((bk, bn), w_index, transforms=_swizzled(bn, dtype)),
              ],
              max_concurrent_steps=steps,
          )(a_gmem, w_gmem.at[g])
        return acc_ref[...]

      acc = pl.run_scoped(multiply, plgpu.ACC((bm, out_block), jnp.float32))

      @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((bm, out_block), dtype))
      def _(o_smem):
        o_smem[...] = acc.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem,
                                o_gmem.at[pl.ds(i * bm, bm), pl.ds(o * out_block, out_block)])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  interpret_params = None
  if interpret:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    interpret_params = InterpretGPUParams()
  out_cols = kp if transpose_w else np_
  cost = block_loop(steps=tiles * out_blocks * max_list, bm=bm, bk=bk, bn=bn,
                    loaded=bm * a_block + bk * bn, itemsize=itemsize, mask_bytes=0,
                    out_bytes=r * out_cols * itemsize)
  return plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((r, out_cols), dtype),
      grid=(_num_sms(),),
      grid_names=("sm",),
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      cost_estimate=cost,
      interpret=interpret_params,
      kernel_name=name,
  )(layout.tile_group, layout.num_active, lists, counts, a_rows, w)


def forward(x_rows, w, col_rows, col_counts, layout, *, bm: int, bk: int, bn: int,
            interpret: bool = False):
  """y_rows = per-tile x_rows @ w[g] over the non-empty blocks, w premasked.

  x_rows [R, Kp], w [G, Kp, Np], col_rows [G * Nb * max_col] and col_counts [G * Nb]
  (flattened metadata) and layout as in kernel_tpu.forward; bm rows per tile; (bk, bn)
  the weight block. Returns [R, Np] in x_rows' dtype (f32 accumulation)."""
  return _block_list_matmul(x_rows, w, col_rows, col_counts, layout, bm=bm, bk=bk, bn=bn,
                            transpose_w=False, interpret=interpret,
                            name="block_sparse_forward_mosaic_gpu")


def input_grad(dy_rows, w, row_cols, row_counts, layout, *, bm: int, bk: int, bn: int,
               interpret: bool = False):
  """dx_rows = per-tile dy_rows @ w[g].T over the non-empty blocks, w premasked.

  dy_rows [R, Np], w [G, Kp, Np], row_cols [G * Kb * max_row] and row_counts [G * Kb] and
  layout as in kernel_tpu.input_grad. Returns [R, Kp] in dy_rows' dtype."""
  return _block_list_matmul(dy_rows, w, row_cols, row_counts, layout, bm=bm, bk=bk, bn=bn,
                            transpose_w=True, interpret=interpret,
                            name="block_sparse_input_grad_mosaic_gpu")
