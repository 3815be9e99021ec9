"""Public entry of the block-sparse masked matmul: dispatch, padding, custom VJP and vmap.

`block_sparse_matmul(x, w, mask, implementation=...)` computes `x @ (w * mask.dense)`;
`implementation` is one of kernels_pallas.implementations.IMPLEMENTATIONS:

* "xla": the dense jnp reference (autodiff gives the masked weight gradient);
* "pallas": the kernel of the platform the computation is LOWERED for (TPU: Mosaic with
  scalar prefetch, GPU: Triton with index arrays as inputs, and from jax 0.11 Mosaic GPU
  (TMA + wgmma) for the forward and input gradient of premasked 16-bit weights
  (kernel_mosaic_gpu.applies); on CPU the TPU kernel in
  interpret mode; `grouped.on_lowering_platform`), so an ahead-of-time lowering for a TPU
  or GPU from a CPU host holds the real kernel; or the one named by `backend=` ("tpu" |
  "gpu", interpreted on CPU, chosen when traced);
* "auto": the kernel on TPU and GPU, "xla" on CPU (also chosen at lowering).

Gradients go through `jax.custom_vjp` (forward, input-gradient and weight-gradient
kernels all skip empty blocks; the weight gradient is zero off the mask). Every kernel
call is wrapped in `jax.custom_batching.custom_vmap`, so `vmap` over ensemble members
(weights and masks with a leading member axis) becomes one kernel launch whose grid has
a member axis, instead of Pallas' fallback loop over batched scalar-prefetch operands.
`stacked_matmul` is the same op for an explicit `grouped.KernelConfig`.
"""

from __future__ import annotations

import functools
from typing import Annotated, NamedTuple

import jax
import jax.numpy as jnp

from kernels_pallas import implementations
from kernels_pallas.block_sparse import grouped
from kernels_pallas.block_sparse.layout import stacked_layout
from kernels_pallas.block_sparse.metadata import BlockMetadata, BlockSparseMask, padded
from kernels_pallas.block_sparse.reference import masked_matmul_reference

DEFAULT_BLOCK_M = grouped.DEFAULT_BLOCK_M


class _Geometry(NamedTuple):
  bm: int
  bp: int
  kp: int
  np_: int


def _geometry(cfg: grouped.KernelConfig, rows: int, k: int, n: int, meta: BlockMetadata,
              dtype) -> _Geometry:
  bm = grouped.row_tile(cfg, rows, meta, k, n, dtype)
  return _Geometry(bm, padded(rows, bm), *grouped.padded_dims(meta, k, n))


def _rows(a: jax.Array, bp: int, width: int) -> jax.Array:
  """[G, B, D] -> [G * bp, width] zero-padded rows."""
  g = a.shape[0]
  return grouped.pad_to(a, (g, bp, width)).reshape(g * bp, width)


def _stacked_forward(cfg: grouped.KernelConfig, x: jax.Array, w: jax.Array,
                     meta: BlockMetadata) -> jax.Array:
  """[G, B, K] x [G, K, N] -> [G, B, N] through the forward kernel."""
  g, b, k = x.shape
  n = w.shape[-1]
  geo = _geometry(cfg, b, k, n, meta, x.dtype)
  y = grouped.forward(cfg, _rows(x, geo.bp, geo.kp), grouped.pad_to(w, (g, geo.kp, geo.np_)),
                      meta, stacked_layout(g, geo.bp // geo.bm), bm=geo.bm)
  return y.reshape(g, geo.bp, geo.np_)[:, :b, :n]


def _stacked_input_grad(cfg: grouped.KernelConfig, dy: jax.Array, w: jax.Array,
                        meta: BlockMetadata) -> jax.Array:
  """[G, B, N] x [G, K, N] -> [G, B, K]: dy @ (w * mask).T per group."""
  g, b, n = dy.shape
  k = w.shape[1]
  geo = _geometry(cfg, b, k, n, meta, dy.dtype)
  dx = grouped.input_grad(cfg, _rows(dy, geo.bp, geo.np_),
                          grouped.pad_to(w, (g, geo.kp, geo.np_)), meta,
                          stacked_layout(g, geo.bp // geo.bm), bm=geo.bm)
  return dx.reshape(g, geo.bp, geo.kp)[:, :b, :k]


def _stacked_weight_grad(cfg: grouped.KernelConfig, x: jax.Array, dy: jax.Array,
                         meta: BlockMetadata) -> jax.Array:
  """[G, B, K] x [G, B, N] -> [G, K, N]: (x.T @ dy) * mask per group."""
  g, b, k = x.shape
  n = dy.shape[-1]
  geo = _geometry(cfg, b, k, n, meta, x.dtype)
  dw = grouped.weight_grad(cfg, _rows(x, geo.bp, geo.kp), _rows(dy, geo.bp, geo.np_), meta,
                           stacked_layout(g, geo.bp // geo.bm), bm=geo.bm, out_dtype=x.dtype)
  return dw[:, :k, :n]


def _merge_leading(a: jax.Array) -> jax.Array:
  return a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:])


def _with_vmap(fn, foldable: int | None):
  """Wraps fn(cfg, a, b, meta) -> [G, ...] so that vmap adds groups to one kernel launch.

  A vmapped axis of size A is merged into the group axis (unbatched operands are
  broadcast). When only operand `foldable` is batched (same weights and mask for every
  vmapped slice), the axis is folded into that operand's rows instead, so the weights
  are not copied A times.
  """

  @functools.cache
  def for_config(cfg: grouped.KernelConfig):
    op = jax.custom_batching.custom_vmap(functools.partial(fn, cfg))

    @op.def_vmap
    def rule(axis_size, in_batched, *args):
      batched = [any(jax.tree.leaves(b)) for b in in_batched]
      if foldable is not None and batched[foldable] and sum(batched) == 1:
        a = args[foldable]  # [A, G, B, D]
        g, b = a.shape[1], a.shape[2]
        folded = jnp.moveaxis(a, 0, 1).reshape(g, axis_size * b, a.shape[3])
        new_args = list(args)
        new_args[foldable] = folded
        out = op(*new_args)  # [G, A * B, D']
        out = out.reshape(g, axis_size, b, out.shape[-1])
        return jnp.moveaxis(out, 1, 0), True
      args = jax.tree.map(
          lambda a, bat: a if bat else jnp.broadcast_to(a, (axis_size,) + a.shape),
          args, tuple(in_batched))
      out = op(*jax.tree.map(_merge_leading, args))
      return out.reshape((axis_size, -1) + out.shape[1:]), True

    return op

  return for_config


_forward_op = _with_vmap(_stacked_forward, foldable=0)
_input_grad_op = _with_vmap(_stacked_input_grad, foldable=0)
_weight_grad_op = _with_vmap(_stacked_weight_grad, foldable=None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _stacked_matmul(cfg, x, w, meta):
  return _forward_op(cfg)(x, w, meta)


def _stacked_matmul_fwd(cfg, x, w, meta):
  return _forward_op(cfg)(x, w, meta), (x, w, meta)


def _stacked_matmul_bwd(cfg, residuals, dy):
  x, w, meta = residuals
  dy = dy.astype(x.dtype)
  dx = _input_grad_op(cfg)(dy, w, meta)
  dw = _weight_grad_op(cfg)(x, dy, meta)
  return dx, dw, None


_stacked_matmul.defvjp(_stacked_matmul_fwd, _stacked_matmul_bwd)


def stacked_matmul(cfg: grouped.KernelConfig, x: Annotated[jax.Array, "g b k"],
                   w: Annotated[jax.Array, "g k n"], meta: BlockMetadata
                   ) -> Annotated[jax.Array, "g b n"]:
  """`x[g] @ (w[g] * mask[g])` for every group g in one launch of `cfg`'s kernel.

  The layer under `block_sparse_matmul` for a caller that fixes the kernel itself (e.g.
  to lower a TPU or GPU kernel from a CPU host). Differentiable in x and w, vmap-able.

  Args:
    cfg: the kernel (`grouped.kernel_config`, or a KernelConfig made by hand).
    x: [G, B, K] activations, same dtype as w.
    w: [G, K, N] weights.
    meta: a BlockSparseMask's `blocks`, leaves with a leading [G].

  Returns:
    [G, B, N] in x's dtype (f32 accumulation).
  """
  return _stacked_matmul(cfg, x, w, meta)


def block_sparse_matmul(
    x: Annotated[jax.Array, "*batch k"],
    w: Annotated[jax.Array, "k n"],
    mask: BlockSparseMask,
    *,
    implementation: implementations.Implementation = "auto",
    backend: implementations.PallasBackend | None = None,
    block_m: int = DEFAULT_BLOCK_M,
    premasked: bool = False,
) -> Annotated[jax.Array, "*batch n"]:
  """`x @ (w * mask.dense)` without loading or multiplying the mask's empty blocks.

  Args:
    x: [..., K] activations (f32 or bf16).
    w: [K, N] weights (f32 or bf16); x and w are promoted to a common dtype and the
      kernel accumulates in f32.
    mask: the BlockSparseMask of a fixed [K, N] mask (no member axis: vmap a stacked
      one together with stacked weights).
    implementation: one of kernels_pallas.implementations.IMPLEMENTATIONS.
    backend: with "pallas", force the "tpu" or "gpu" kernel (interpreted on CPU); None
      is the platform's.
    block_m: row tile cap (shrunk for small batches).
    premasked: promise that w is already zero off the mask (pruned weights; weights
      initialised masked and trained through this op, whose weight gradient is zero off
      the mask): the kernels then skip the element-mask multiply in their inner loop. A
      w that breaks the promise gives x @ w over the mask's non-empty blocks.

  Returns:
    [..., N] in the promoted dtype. Differentiable in x and w (custom VJP), jit- and
    vmap-able.
  """
  if not isinstance(mask, BlockSparseMask):
    raise TypeError(f"mask must be a BlockSparseMask, got {type(mask).__name__}")
  implementations.check_implementation(implementation, backend)
  k, n = mask.shape
  if mask.dense.ndim != 2:
    raise ValueError(f"mask has a leading member axis (dense {mask.dense.shape}); vmap over "
                     "it together with the stacked weights")
  if w.shape != (k, n):
    raise ValueError(f"w has shape {w.shape}, expected the mask's shape {(k, n)}")
  if x.ndim < 1 or x.shape[-1] != k:
    raise ValueError(f"x has shape {x.shape}, expected [..., {k}]")
  if implementation == "xla":
    return masked_matmul_reference(x, w, mask.dense)
  dtype = jnp.result_type(x, w)
  x3, w3 = x.astype(dtype).reshape(1, -1, k), w.astype(dtype)[None]
  meta = jax.tree.map(lambda a: a[None], mask.blocks)

  def kernel(cfg):
    return lambda x3, w3, meta: stacked_matmul(cfg, x3, w3, meta)

  def xla(*_):  # "auto" off TPU / GPU: the "xla" numbers exactly, in the kernel's layout
    return masked_matmul_reference(x, w, mask.dense).astype(dtype).reshape(1, -1, n)

  if backend is not None:  # a forced kernel, chosen when traced (interpreted on CPU)
    y = kernel(grouped.kernel_config(backend, block_m, premasked=premasked))(x3, w3, meta)
  else:
    y = grouped.on_lowering_platform(kernel, xla if implementation == "auto" else None,
                                     x3, w3, meta, block_m=block_m, premasked=premasked)
  return y.reshape(x.shape[:-1] + (n,))
