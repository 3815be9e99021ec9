"""Public entry of the block-sparse masked matmul: dispatch, padding, custom VJP and vmap.

`block_sparse_matmul(x, w, bsm)` computes `x @ (w * bsm.dense)`:

* "xla": the dense jnp reference (autodiff gives the masked weight gradient);
* "pallas": the kernel for the running platform (TPU: Mosaic with scalar prefetch,
  GPU: Triton with index arrays as inputs; on CPU the TPU kernel in interpret mode);
* "pallas_tpu" / "pallas_gpu": that kernel explicitly (interpreted on CPU);
* "auto": "xla" on CPU, "pallas" on TPU and GPU.

Gradients go through `jax.custom_vjp` (forward, input-gradient and weight-gradient
kernels all skip empty blocks; the weight gradient is zero off the mask). Every kernel
call is wrapped in `jax.custom_batching.custom_vmap`, so `vmap` over ensemble members
(weights and masks with a leading member axis) becomes one kernel launch whose grid has
a member axis, instead of Pallas' fallback loop over batched scalar-prefetch operands.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kernels_pallas.block_sparse import kernel_gpu, kernel_tpu
from kernels_pallas.block_sparse.layout import stacked_layout
from kernels_pallas.block_sparse.metadata import (
    IMPLEMENTATIONS,
    BlockSparseMask,
    fit_block,
    padded,
)
from kernels_pallas.block_sparse.reference import masked_matmul_reference

DEFAULT_BLOCK_M = 128
_BACKENDS = {"tpu": kernel_tpu, "gpu": kernel_gpu}


class KernelConfig(NamedTuple):
  """Static (hashable) choice of kernel: backend ("tpu" | "gpu"), interpret, row tile cap."""

  backend: str
  interpret: bool
  block_m: int


def resolve_implementation(implementation: str, block_m: int = DEFAULT_BLOCK_M
                           ) -> KernelConfig | None:
  """Maps an implementation name to a KernelConfig, or None for the XLA reference."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
  if not isinstance(block_m, int) or block_m < 1:
    raise ValueError(f"block_m must be a positive int, got {block_m!r}")
  platform = jax.default_backend()
  on_gpu = platform in ("gpu", "cuda", "rocm")
  if implementation == "xla" or (implementation == "auto" and platform == "cpu"):
    return None
  if implementation in ("auto", "pallas"):
    backend = "gpu" if on_gpu else "tpu"
  else:
    backend = implementation.removeprefix("pallas_")
  if platform != "cpu" and (backend == "gpu") != on_gpu:
    raise ValueError(f"implementation={implementation!r} cannot run on platform {platform!r}; "
                     "use 'pallas' or 'auto' to pick the kernel for this platform")
  return KernelConfig(backend=backend, interpret=platform == "cpu", block_m=block_m)


def _pad_to(a: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  if a.shape == tuple(shape):
    return a
  return jnp.pad(a, [(0, s - d) for d, s in zip(a.shape, shape, strict=True)])


class _Meta(NamedTuple):
  """The kernel-facing arrays of a (stacked) BlockSparseMask, each with a leading [G]."""

  col_block_rows: jax.Array
  col_block_slots: jax.Array
  col_block_counts: jax.Array
  row_block_cols: jax.Array
  row_block_slots: jax.Array
  row_block_counts: jax.Array
  block_slots: jax.Array
  block_masks: jax.Array


def _meta_of(bsm: BlockSparseMask) -> _Meta:
  return _Meta(*(getattr(bsm, f) for f in _Meta._fields))


def _flat(a: jax.Array) -> jax.Array:
  return a.reshape(-1).astype(jnp.int32)


class _Geometry(NamedTuple):
  bm: int
  bp: int
  kp: int
  np_: int


def _geometry(cfg: KernelConfig, rows: int, k: int, n: int, meta: _Meta, dtype) -> _Geometry:
  bk, bn = meta.block_masks.shape[-2:]
  bm = fit_block(cfg.block_m, rows)
  geo = _Geometry(bm=bm, bp=padded(rows, bm), kp=padded(k, bk), np_=padded(n, bn))
  if not cfg.interpret:  # the interpreter has no tiling rules; hardware does
    _BACKENDS[cfg.backend].check_blocks(bm, bk, bn, geo.kp, geo.np_, dtype)
  return geo


def _rows(a: jax.Array, bp: int, width: int) -> jax.Array:
  """[G, B, D] -> [G * bp, width] zero-padded rows."""
  g = a.shape[0]
  return _pad_to(a, (g, bp, width)).reshape(g * bp, width)


def _stacked_forward(cfg: KernelConfig, x: jax.Array, w: jax.Array, meta: _Meta) -> jax.Array:
  """[G, B, K] x [G, K, N] -> [G, B, N] through the forward kernel."""
  g, b, k = x.shape
  n = w.shape[-1]
  geo = _geometry(cfg, b, k, n, meta, x.dtype)
  y = _BACKENDS[cfg.backend].forward(
      _rows(x, geo.bp, geo.kp), _pad_to(w, (g, geo.kp, geo.np_)), _flat(meta.col_block_rows),
      _flat(meta.col_block_slots), _flat(meta.col_block_counts), meta.block_masks,
      stacked_layout(g, geo.bp // geo.bm), bm=geo.bm, interpret=cfg.interpret)
  return y.reshape(g, geo.bp, geo.np_)[:, :b, :n]


def _stacked_input_grad(cfg: KernelConfig, dy: jax.Array, w: jax.Array, meta: _Meta
                        ) -> jax.Array:
  """[G, B, N] x [G, K, N] -> [G, B, K]: dy @ (w * mask).T per group."""
  g, b, n = dy.shape
  k = w.shape[1]
  geo = _geometry(cfg, b, k, n, meta, dy.dtype)
  dx = _BACKENDS[cfg.backend].input_grad(
      _rows(dy, geo.bp, geo.np_), _pad_to(w, (g, geo.kp, geo.np_)), _flat(meta.row_block_cols),
      _flat(meta.row_block_slots), _flat(meta.row_block_counts), meta.block_masks,
      stacked_layout(g, geo.bp // geo.bm), bm=geo.bm, interpret=cfg.interpret)
  return dx.reshape(g, geo.bp, geo.kp)[:, :b, :k]


def _stacked_weight_grad(cfg: KernelConfig, x: jax.Array, dy: jax.Array, meta: _Meta
                         ) -> jax.Array:
  """[G, B, K] x [G, B, N] -> [G, K, N]: (x.T @ dy) * mask per group."""
  g, b, k = x.shape
  n = dy.shape[-1]
  geo = _geometry(cfg, b, k, n, meta, x.dtype)
  dw = _BACKENDS[cfg.backend].weight_grad(
      _rows(x, geo.bp, geo.kp), _rows(dy, geo.bp, geo.np_), _flat(meta.block_slots),
      meta.block_masks, stacked_layout(g, geo.bp // geo.bm), num_groups=g, bm=geo.bm,
      out_dtype=x.dtype, interpret=cfg.interpret)
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
  def for_config(cfg: KernelConfig):
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
def _stacked_matmul(cfg: KernelConfig, x: jax.Array, w: jax.Array, meta: _Meta) -> jax.Array:
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


def block_sparse_matmul(x: jax.Array, w: jax.Array, bsm: BlockSparseMask, *,
                        implementation: str | None = None,
                        block_m: int = DEFAULT_BLOCK_M) -> jax.Array:
  """`x @ (w * bsm.dense)` without loading or multiplying the mask's empty blocks.

  Args:
    x: [..., K] activations (f32 or bf16).
    w: [K, N] weights (f32 or bf16); x and w are promoted to a common dtype and the
      kernel accumulates in f32.
    bsm: the BlockSparseMask of a fixed [K, N] mask (no member axis: vmap a stacked
      one together with stacked weights).
    implementation: one of IMPLEMENTATIONS; None uses `bsm.implementation`.
    block_m: row tile cap (shrunk for small batches).

  Returns:
    [..., N] in the promoted dtype. Differentiable in x and w (custom VJP), jit- and
    vmap-able.
  """
  if not isinstance(bsm, BlockSparseMask):
    raise TypeError(f"bsm must be a BlockSparseMask, got {type(bsm).__name__}")
  cfg = resolve_implementation(implementation or bsm.implementation, block_m)
  k, n = bsm.shape
  if bsm.dense.ndim != 2:
    raise ValueError(f"bsm has a leading member axis (dense {bsm.dense.shape}); vmap over it "
                     "together with the stacked weights")
  if w.shape != (k, n):
    raise ValueError(f"w has shape {w.shape}, expected the mask's shape {(k, n)}")
  if x.ndim < 1 or x.shape[-1] != k:
    raise ValueError(f"x has shape {x.shape}, expected [..., {k}]")
  if cfg is None:
    return masked_matmul_reference(x, w, bsm.dense)
  dtype = jnp.result_type(x, w)
  lead = x.shape[:-1]
  x3 = x.astype(dtype).reshape(1, -1, k)
  meta = jax.tree.map(lambda a: a[None], _meta_of(bsm))
  y = _stacked_matmul(cfg, x3, w.astype(dtype)[None], meta)
  return y.reshape(lead + (n,))
