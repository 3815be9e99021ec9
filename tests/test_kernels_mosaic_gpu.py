"""The Mosaic GPU (Hopper) forward and input-gradient kernels, run by Mosaic GPU's own
interpreter on this CPU (it simulates shared memory, TMA copies and barriers).

Which kernels run is a contract of the jax version: from jax 0.11 (Pallas Triton
deprecated) premasked 16-bit weights with 128x128 blocks take Mosaic GPU's forward and
input gradient, beside Triton's weight gradient; on jax 0.10 everything stays on Triton.
Either way the numbers must be the dense product's, to bf16 rounding. The deviceless
H200 compile of the same kernels is in tests/test_kernels_compile.py.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_cases import block_mask, runs_mosaic_gpu

from kernels_pallas.block_sparse import BlockSparseMask, block_sparse_matmul, kernel_mosaic_gpu
from kernels_pallas.expert_matmul import expert_matmul, expert_matmul_reference

MOSAIC = runs_mosaic_gpu(jnp.bfloat16, premasked=True)
WANT_KERNELS = ({"block_sparse_forward_mosaic_gpu", "block_sparse_input_grad_mosaic_gpu",
                 "block_sparse_weight_grad_gpu"} if MOSAIC else
                {"block_sparse_forward_gpu", "block_sparse_input_grad_gpu",
                 "block_sparse_weight_grad_gpu"})


def _kernels(fn, *args) -> set[str]:
  """The Pallas kernels in fn's jaxpr, by name."""
  return set(re.findall(r"block_sparse_[a-z_]+_gpu", str(jax.make_jaxpr(fn)(*args))))


def _bf16_close(got, want, scale):
  """Within a few bf16 roundings of the result's scale (bf16 keeps 8 bits)."""
  err = float(np.max(np.abs(np.asarray(got, np.float64) - want)))
  assert err <= 4 * 2.0**-8 * scale, (err, scale)


def test_block_sparse_forward_and_gradients_match_the_dense_product():
  rng = np.random.default_rng(0)
  rows, k, n = 200, 384, 256  # 200 rows: two 128-row tiles, the second partly padding
  mask = block_mask(k, n, 0.5)
  bsm = BlockSparseMask.from_mask(mask)
  x = jnp.asarray(rng.normal(size=(rows, k)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(k, n)) * mask, jnp.bfloat16)  # premasked: zero off it
  dy = jnp.asarray(rng.normal(size=(rows, n)), jnp.bfloat16)

  def run(x, w):
    y, vjp = jax.vjp(lambda x, w: block_sparse_matmul(
        x, w, bsm, implementation="pallas", backend="gpu", premasked=True), x, w)
    return (y, *vjp(dy))

  assert _kernels(run, x, w) == WANT_KERNELS
  y, dx, dw = jax.jit(run)(x, w)
  xf, wf, dyf = (np.asarray(a, np.float64) for a in (x, w, dy))
  _bf16_close(y, xf @ wf, np.abs(xf @ wf).max())
  _bf16_close(dx, dyf @ wf.T, np.abs(dyf @ wf.T).max())
  _bf16_close(dw, (xf.T @ dyf) * mask, np.abs(xf.T @ dyf).max())
  np.testing.assert_array_equal(np.asarray(dw)[mask == 0], 0.0)


def test_routed_experts_match_the_one_hot_reference():
  rng = np.random.default_rng(1)
  tokens, experts, k, n = 300, 4, 256, 384
  masks = np.stack([block_mask(k, n, 0.5, seed) for seed in range(experts)])
  bsm = BlockSparseMask.from_masks(masks)
  x = jnp.asarray(rng.normal(size=(tokens, k)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(experts, k, n)) * masks, jnp.bfloat16)
  ids = jnp.asarray(np.where(rng.random(tokens) < 0.7, 2, rng.integers(0, experts, tokens)),
                    jnp.int32)  # skewed: expert 2 takes most tokens
  fn = lambda x, w: expert_matmul(x, ids, w, bsm, implementation="pallas",  # noqa: E731
                                  backend="gpu", premasked=True)
  assert _kernels(fn, x, w) == {k for k in WANT_KERNELS if "forward" in k}
  want = np.asarray(expert_matmul_reference(jnp.asarray(x, jnp.float32), ids,
                                            jnp.asarray(w, jnp.float32), masks))
  _bf16_close(jax.jit(fn)(x, w), want, np.abs(want).max())


@pytest.mark.parametrize("dtype,premasked,bm,block,want", [
    (jnp.bfloat16, True, 128, 128, MOSAIC),
    (jnp.float32, True, 128, 128, False),   # TF32 wgmma cannot read w transposed
    (jnp.bfloat16, False, 128, 128, False),  # the element mask stays on Triton
    (jnp.bfloat16, True, 32, 128, False),   # fewer rows than one wgmma tile
    (jnp.bfloat16, True, 128, 32, False),   # blocks narrower than a swizzle tile
    (jnp.bfloat16, True, 128, 512, False),  # two pipeline steps overflow shared memory
])
def test_mosaic_gpu_takes_only_what_it_can_compile(dtype, premasked, bm, block, want):
  assert kernel_mosaic_gpu.applies(premasked, dtype, bm, block, block) == want
