"""Speed of the block-sparse kernels against XLA's dense matmul, printed as ratios.

  python -m kernels_pallas.bench                 # all cases, bf16
  python -m kernels_pallas.bench --cases=square --densities=1,0.1 --grad

Cases (block density = fraction of (bk, bn) weight blocks that are non-zero, chosen at
random with the same number of blocks in every column-block):
  square:  x[1024, 4096] @ w[4096, 4096].
  experts: SmolLM2 FFN shapes, 1024 tokens routed uniformly to E in {8, 16} experts,
           w[E, 576, 1536] and w[E, 1536, 576]; the dense baseline is ONE dense FFN
           matmul over all tokens (what a dense layer of the same shape costs).

On an accelerator each row times the kernel and the dense baseline on the same data in
the same process (median of --repeats runs of --iters calls each) and prints
speedup = t_dense / t_kernel beside the ideal 1 / density and the weight bytes read (each
non-zero block once, plus packed element masks of partly filled blocks). On CPU it only
checks correctness in interpret mode at small shapes: timings need a GPU or TPU.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from kernels_pallas.block_sparse import BlockSparseMask, block_sparse_matmul
from kernels_pallas.expert_matmul import expert_matmul, expert_matmul_reference
from kernels_pallas.implementations import PALLAS_BACKENDS

_CASES = flags.DEFINE_list("cases", ["square", "experts"], "Which cases: square, experts.")
_DENSITIES = flags.DEFINE_list("densities", ["1", "0.5", "0.25", "0.1"], "Block densities.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Input dtype.")
_ITERS = flags.DEFINE_integer("iters", 20, "Calls per timed run.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs; the median is reported.")
_GRAD = flags.DEFINE_bool("grad", False, "Also time forward+backward (grads of x and w).")
_BLOCK = flags.DEFINE_list("block_shape", ["128", "128"], "Weight block (bk, bn).")
_BLOCK_M = flags.DEFINE_integer("block_m", 128, "Row tile.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of masks and data.")


def block_mask(rng: np.random.Generator, k: int, n: int, block_shape: tuple[int, int],
               density: float) -> np.ndarray:
  """[k, n] 0/1 mask with round(density * Kb) random full blocks in every column-block."""
  bk, bn = block_shape
  kb, nb = -(-k // bk), -(-n // bn)
  per_col = max(1, round(density * kb))
  blocks = np.zeros((kb, nb), bool)
  for c in range(nb):
    blocks[rng.choice(kb, per_col, replace=False), c] = True
  return np.kron(blocks, np.ones((bk, bn), bool))[:k, :n]


def weight_bytes(bsm: BlockSparseMask, itemsize: int) -> int:
  """Bytes of weight (and packed element mask) a kernel reads: each non-zero block once."""
  slots = np.asarray(bsm.blocks.block_slots)
  bk, bn = bsm.block_shape
  partial = int(np.sum(slots > 0))
  return int(np.sum(slots >= 0)) * bk * bn * itemsize + partial * bk * bn


def _time(fn, *args) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  runs = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    for _ in range(_ITERS.value):
      out = fn(*args)
    jax.block_until_ready(out)
    runs.append((time.perf_counter() - start) / _ITERS.value)
  return statistics.median(runs)


def _grad_of(f):
  return jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w).astype(jnp.float32)), argnums=(0, 1)))


def _rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def _row(name, density, t_kernel, t_dense, bytes_kernel, bytes_dense, err, extra=""):
  print(f"{name:<28} {density:>7.2f} {t_kernel * 1e3:>10.3f} {t_dense * 1e3:>10.3f} "
        f"{t_dense / t_kernel:>8.2f} {1 / density:>6.2f} {bytes_kernel / 2**20:>9.2f} "
        f"{bytes_dense / 2**20:>9.2f} {err:>9.1e}{extra}", flush=True)


def _header():
  print(f"{'case':<28} {'density':>7} {'kernel ms':>10} {'dense ms':>10} {'speedup':>8} "
        f"{'ideal':>6} {'w MiB':>9} {'dense MiB':>9} {'rel err':>9}")


def _square(rng, dtype, densities, block_shape):
  t, k, n = 1024, 4096, 4096
  x = jnp.asarray(rng.normal(size=(t, k)), dtype)
  w = jnp.asarray(rng.normal(size=(k, n)) / np.sqrt(k), dtype)
  dense = jax.jit(lambda x, w: x @ w)
  t_dense = _time(dense, x, w)
  t_dense_grad = _time(_grad_of(lambda x, w: x @ w), x, w) if _GRAD.value else None
  for density in densities:
    mask = block_mask(rng, k, n, block_shape, density)
    bsm = BlockSparseMask.from_mask(mask, block_shape=block_shape)
    kernel = jax.jit(lambda x, w, bsm=bsm: block_sparse_matmul(
        x, w, bsm, implementation="pallas", block_m=_BLOCK_M.value))
    y = kernel(x, w)
    err = _rel_err(y, jnp.asarray(x, jnp.float32) @ (jnp.asarray(w, jnp.float32) * mask))
    t_kernel = _time(kernel, x, w)
    itemsize = jnp.dtype(dtype).itemsize
    _row(f"square {t}x{k}x{n}", density, t_kernel, t_dense, weight_bytes(bsm, itemsize),
         k * n * itemsize, err)
    if _GRAD.value:
      t_grad = _time(_grad_of(lambda x, w, bsm=bsm: block_sparse_matmul(
          x, w, bsm, implementation="pallas", block_m=_BLOCK_M.value)), x, w)
      _row("  fwd+bwd", density, t_grad, t_dense_grad, 0, 0, float("nan"))


def _experts(rng, dtype, densities, block_shape):
  tokens = 1024
  itemsize = jnp.dtype(dtype).itemsize
  for num_experts in (8, 16):
    for k, n in ((576, 1536), (1536, 576)):
      x = jnp.asarray(rng.normal(size=(tokens, k)), dtype)
      ids = jnp.asarray(rng.integers(0, num_experts, tokens), jnp.int32)
      w = jnp.asarray(rng.normal(size=(num_experts, k, n)) / np.sqrt(k), dtype)
      dense = jax.jit(lambda x, w0: x @ w0)
      t_dense = _time(dense, x, w[0])
      for density in densities:
        masks = np.stack([block_mask(rng, k, n, block_shape, density)
                          for _ in range(num_experts)])
        bsm = BlockSparseMask.from_masks(masks, block_shape=block_shape)
        kernel = jax.jit(lambda x, w, ids=ids, bsm=bsm: expert_matmul(
            x, ids, w, bsm, implementation="pallas", block_m=_BLOCK_M.value))
        ragged = jax.jit(lambda x, w, ids=ids, bsm=bsm: expert_matmul(
            x, ids, w, bsm, implementation="xla"))
        y = kernel(x, w)
        err = _rel_err(y, expert_matmul_reference(
            jnp.asarray(x, jnp.float32), ids, jnp.asarray(w, jnp.float32), masks))
        t_kernel = _time(kernel, x, w)
        t_ragged = _time(ragged, x, w)
        _row(f"experts E={num_experts} {tokens}x{k}x{n}", density, t_kernel, t_dense,
             weight_bytes(bsm, itemsize), k * n * itemsize, err,
             f"   (XLA ragged_dot on masked experts: {t_ragged * 1e3:.3f} ms)")


def _cpu_check(rng) -> None:
  """Interpret-mode correctness of both kernels at small shapes (no timings)."""
  print("CPU only: checking correctness in interpret mode at small shapes; "
        "timings need a GPU or TPU (run this module there).")
  x = jnp.asarray(rng.normal(size=(64, 256)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(256, 192)), jnp.float32)
  ids = jnp.asarray(rng.integers(0, 4, 64), jnp.int32)
  we = jnp.asarray(rng.normal(size=(4, 256, 192)), jnp.float32)
  worst = 0.0
  for density in (1.0, 0.5, 0.25, 0.1):
    mask = block_mask(rng, 256, 192, (32, 32), density)
    masks = np.stack([block_mask(rng, 256, 192, (32, 32), density) for _ in range(4)])
    for backend in PALLAS_BACKENDS:
      bsm = BlockSparseMask.from_mask(mask, block_shape=(32, 32))
      y = jax.jit(lambda x, w, bsm=bsm, b=backend: block_sparse_matmul(
          x, w, bsm, implementation="pallas", backend=b, block_m=32))(x, w)
      err = _rel_err(y, x @ (w * mask))
      ebsm = BlockSparseMask.from_masks(masks, block_shape=(32, 32))
      ye = jax.jit(lambda x, w, bsm=ebsm, b=backend: expert_matmul(
          x, ids, w, bsm, implementation="pallas", backend=b, block_m=16))(x, we)
      err_e = _rel_err(ye, expert_matmul_reference(x, ids, we, masks))
      worst = max(worst, err, err_e)
      print(f"  density {density:.2f} pallas {backend:<4}  block-sparse rel err {err:.1e}  "
            f"expert rel err {err_e:.1e}  weight bytes {weight_bytes(bsm, 4)} of {256 * 192 * 4}")
  print(f"worst relative error {worst:.1e}: {'OK' if worst < 1e-5 else 'FAILED'}")
  if worst >= 1e-5:
    raise SystemExit(1)


def main(argv):
  del argv
  rng = np.random.default_rng(_SEED.value)
  platform = jax.default_backend()
  print(f"jax {jax.__version__} on {platform}: {jax.devices()[0].device_kind}")
  if platform == "cpu":
    _cpu_check(rng)
    return
  dtype = jnp.dtype(_DTYPE.value)
  densities = [float(d) for d in _DENSITIES.value]
  block_shape = tuple(int(b) for b in _BLOCK.value)
  print(f"dtype {dtype.name}, block {block_shape}, block_m {_BLOCK_M.value}, median of "
        f"{_REPEATS.value} x {_ITERS.value} calls; speedup = dense ms / kernel ms")
  _header()
  for case in _CASES.value:
    if case == "square":
      _square(rng, dtype, densities, block_shape)
    elif case == "experts":
      _experts(rng, dtype, densities, block_shape)
    else:
      raise SystemExit(f"--cases: unknown case {case!r}; valid: square, experts")


if __name__ == "__main__":
  app.run(main)
