"""The three block-sparse kernels on grouped rows, behind one static kernel choice.

Both public ops reduce to the same kernel calls on the "grouped rows" layout of
layout.py: `block_sparse_matmul` (ops.py) turns stacked members `[G, B, K]` into rows,
`kernels_pallas.expert_matmul` groups routed tokens by expert. This module is what they
share, and the only place that picks a backend module:

* `KernelConfig`, the static (hashable) kernel choice; `on_lowering_platform`, which runs
  the kernel of the platform the computation is LOWERED for (what the public ops do), and
  `kernel_config`, which makes a config for a forced `backend` (or the running platform);
* `row_tile`, the row tile for a number of rows, checked against the hardware's tiling
  rules; `padded_dims` and `pad_to` for the zero padding to whole blocks;
* `forward`, `input_grad`, `weight_grad`: one kernel launch each, on padded rows and a
  BlockSparseMask's `blocks` (BlockMetadata) with a leading group axis `[G, ...]`.

Neither a custom VJP nor vmap lives here: those belong to each op.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, NamedTuple

import jax
import jax.numpy as jnp

from kernels_pallas import implementations
from kernels_pallas.block_sparse import kernel_gpu, kernel_mosaic_gpu, kernel_tpu
from kernels_pallas.block_sparse.layout import RowLayout
from kernels_pallas.block_sparse.metadata import BlockMetadata, fit_block, padded

DEFAULT_BLOCK_M = 128
_BACKENDS = {"tpu": kernel_tpu, "gpu": kernel_gpu}


class KernelConfig(NamedTuple):
  """Static choice of kernel.

  Attributes:
    backend: "tpu" (Mosaic, scalar prefetch) or "gpu" (Triton), kernels_pallas.
      implementations.PALLAS_BACKENDS.
    interpret: run through the Pallas interpreter (CPU).
    block_m: cap on the rows per tile (shrunk for fewer rows).
    premasked: the weights are already zero off the mask, so the forward and
      input-gradient kernels skip the element-mask multiply (and its load) in their inner
      loop. The weight gradient is masked either way, so weights that start zero off the
      mask stay so under any optimizer that maps a zero gradient to a zero update.
  """

  backend: str
  interpret: bool
  block_m: int
  premasked: bool = False


def kernel_config(backend: str | None = None, block_m: int = DEFAULT_BLOCK_M, *,
                  premasked: bool = False) -> KernelConfig:
  """A kernel config for the running platform, chosen when the call is traced.

  TPU runs the Mosaic kernel and GPU the Triton one; CPU interprets the TPU kernel (or
  `backend`'s). The platform is `jax.default_backend()` when the call is traced: use it to
  force a `backend` (e.g. the GPU kernel interpreted on CPU); the public ops with
  `backend=None` choose at lowering instead (`on_lowering_platform`).

  Args:
    backend: None for the platform's kernel, or one of PALLAS_BACKENDS to force one
      (on a TPU or GPU it must be the native one).
    block_m: positive row tile cap.
    premasked: see KernelConfig.

  Returns:
    A KernelConfig.
  """
  if not isinstance(block_m, int) or block_m < 1:
    raise ValueError(f"block_m must be a positive int, got {block_m!r}")
  if backend is not None and backend not in implementations.PALLAS_BACKENDS:
    raise ValueError(f"backend must be None or one of {implementations.PALLAS_BACKENDS}, got "
                     f"{backend!r}")
  platform = jax.default_backend()
  native = implementations.native_backend()
  interpret = platform == "cpu"
  if native is None and not interpret:
    raise ValueError(f"no Pallas kernel for platform {platform!r}; use implementation='xla'")
  if native is not None and backend not in (None, native):
    raise ValueError(f"backend={backend!r} cannot run on platform {platform!r}; leave "
                     "backend=None for the platform's kernel")
  return KernelConfig(backend=backend or native or "tpu", interpret=interpret, block_m=block_m,
                      premasked=premasked)


def on_lowering_platform(kernel: Callable[[KernelConfig], Callable], xla: Callable | None,
                         *args, block_m: int = DEFAULT_BLOCK_M, premasked: bool = False):
  """`kernel(cfg)(*args)` with the kernel of the platform this computation is lowered for.

  TPU gets the Mosaic kernel and CUDA / ROCm the Triton one; CPU (and any other platform)
  gets `xla(*args)` when given (what "auto" means there) or else the TPU kernel in
  interpret mode. The choice is `jax.lax.platform_dependent`'s, made at LOWERING, not from
  `jax.default_backend()` at trace time: `jax.jit(f).trace(...).lower(
  lowering_platforms=("tpu",))` on a CPU host (an ahead-of-time or deviceless compile)
  holds the real kernel, and only the branch of the lowered platform is lowered.

  Args:
    kernel: KernelConfig -> a function of `args` running that kernel.
    xla: the XLA function of `args` for CPU, or None to interpret the kernel there.
    *args: the arrays (and pytrees of arrays) every branch takes.
    block_m: positive row tile cap of every kernel config.
    premasked: see KernelConfig.
  """
  if not isinstance(block_m, int) or block_m < 1:
    raise ValueError(f"block_m must be a positive int, got {block_m!r}")
  config = lambda backend, interpret: KernelConfig(backend, interpret, block_m, premasked)  # noqa: E731
  triton = kernel(config("gpu", False))
  off_accelerator = xla or kernel(config("tpu", True))
  return jax.lax.platform_dependent(*args, tpu=kernel(config("tpu", False)), cuda=triton,
                                    rocm=triton, default=off_accelerator)


def padded_dims(meta: BlockMetadata, k: int, n: int) -> tuple[int, int]:
  """(Kp, Np): K and N rounded up to whole blocks of `meta`'s block shape."""
  bk, bn = meta.block_masks.shape[-2:]
  return padded(k, bk), padded(n, bn)


def row_tile(cfg: KernelConfig, rows: int, meta: BlockMetadata, k: int, n: int, dtype) -> int:
  """Rows per tile for `rows` rows, checked against the hardware's tiling rules.

  The interpreter has no tiling rules; on the hardware this process runs on, a block shape
  the kernel cannot tile, block lists beyond a TPU's scalar memory, or operands beyond
  Triton's 32-bit offsets raise a ValueError that names them. A kernel traced for another
  platform (an ahead-of-time lowering from a CPU host; the branches of
  `on_lowering_platform` that are traced but never lowered here) is left to that
  platform's Pallas lowering and compiler, whose own errors then name the block.
  """
  bm = fit_block(cfg.block_m, rows)
  if not cfg.interpret and cfg.backend == implementations.native_backend():
    bk, bn = meta.block_masks.shape[-2:]
    _BACKENDS[cfg.backend].check_blocks(bm, bk, bn, *padded_dims(meta, k, n), dtype)
    groups = meta.block_slots.shape[0]
    tiles = -(-rows // bm) + groups  # an upper bound: one partial tile per group
    if cfg.backend == "tpu":
      kernel_tpu.check_scalar_memory(meta, tiles)
    else:
      kernel_gpu.check_operand_sizes(tiles * bm, groups, *padded_dims(meta, k, n))
  return bm


def pad_to(a: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Zero-pads `a` at the end of each axis up to `shape`."""
  if a.shape == tuple(shape):
    return a
  return jnp.pad(a, [(0, s - d) for d, s in zip(a.shape, shape, strict=True)])


def _flat(a: jax.Array) -> jax.Array:
  return a.reshape(-1).astype(jnp.int32)


def forward(cfg: KernelConfig, x_rows: Annotated[jax.Array, "r kp"],
            w: Annotated[jax.Array, "g kp np"], meta: BlockMetadata, layout: RowLayout, *,
            bm: int) -> Annotated[jax.Array, "r np"]:
  """Per tile, `x_rows @ (w[g] * mask[g])` for the tile's group g, empty blocks skipped.

  Args:
    cfg: the kernel.
    x_rows: [R, Kp] rows, R = tiles * bm.
    w: [G, Kp, Np] padded weights.
    meta: kernel metadata, leaves with a leading [G].
    layout: the rows' RowLayout.
    bm: rows per tile (`row_tile`).

  Returns:
    [R, Np] in x_rows' dtype (f32 accumulation).
  """
  bk, bn = meta.block_masks.shape[-2:]
  if cfg.backend == "gpu" and kernel_mosaic_gpu.applies(cfg.premasked, x_rows.dtype, bm, bk, bn):
    return kernel_mosaic_gpu.forward(x_rows, w, _flat(meta.col_block_rows),
                                     _flat(meta.col_block_counts), layout, bm=bm, bk=bk, bn=bn,
                                     interpret=cfg.interpret)
  return _BACKENDS[cfg.backend].forward(
      x_rows, w, _flat(meta.col_block_rows), _flat(meta.col_block_slots),
      _flat(meta.col_block_counts), meta.block_masks, layout, bm=bm, premasked=cfg.premasked,
      interpret=cfg.interpret)


def input_grad(cfg: KernelConfig, dy_rows: Annotated[jax.Array, "r np"],
               w: Annotated[jax.Array, "g kp np"], meta: BlockMetadata, layout: RowLayout, *,
               bm: int) -> Annotated[jax.Array, "r kp"]:
  """Per tile, `dy_rows @ (w[g] * mask[g]).T`: [R, Np] -> [R, Kp]; arguments as `forward`."""
  bk, bn = meta.block_masks.shape[-2:]
  if cfg.backend == "gpu" and kernel_mosaic_gpu.applies(cfg.premasked, dy_rows.dtype, bm, bk,
                                                         bn):
    return kernel_mosaic_gpu.input_grad(dy_rows, w, _flat(meta.row_block_cols),
                                        _flat(meta.row_block_counts), layout, bm=bm, bk=bk,
                                        bn=bn, interpret=cfg.interpret)
  return _BACKENDS[cfg.backend].input_grad(
      dy_rows, w, _flat(meta.row_block_cols), _flat(meta.row_block_slots),
      _flat(meta.row_block_counts), meta.block_masks, layout, bm=bm, premasked=cfg.premasked,
      interpret=cfg.interpret)


def weight_grad(cfg: KernelConfig, x_rows: Annotated[jax.Array, "r kp"],
                dy_rows: Annotated[jax.Array, "r np"], meta: BlockMetadata, layout: RowLayout,
                *, bm: int, out_dtype) -> Annotated[jax.Array, "g kp np"]:
  """Per group, `(x_rows.T @ dy_rows) * mask[g]` over the group's tiles, zero off the mask.

  Args:
    cfg, meta, layout, bm: as in `forward`.
    x_rows: [R, Kp].
    dy_rows: [R, Np].
    out_dtype: dtype of the result.

  Returns:
    [G, Kp, Np]; G is meta's leading axis (a group without rows gets zeros).
  """
  return _BACKENDS[cfg.backend].weight_grad(
      x_rows, dy_rows, _flat(meta.block_slots), meta.block_masks, layout,
      num_groups=meta.block_masks.shape[0], bm=bm, out_dtype=out_dtype,
      interpret=cfg.interpret)
