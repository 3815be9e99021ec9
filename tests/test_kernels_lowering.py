"""The kernel ops lowered for a TPU and for CUDA from this CPU host hold the real kernels.

`block_sparse_matmul` and `expert_matmul` choose their kernel when the computation is
LOWERED (`grouped.on_lowering_platform`), not from the platform they are traced on. So
`jax.jit(f).trace(...).lower(lowering_platforms=(p,))` on a CPU-only machine must contain
the Pallas kernel custom calls of `p`: `tpu_custom_call` (Mosaic) for "tpu",
`__gpu$xla.gpu.triton` for "cuda", and none for "cpu" (interpret mode, or XLA for "auto").
Lowering runs the Pallas-to-Mosaic and Pallas-to-Triton lowerings; it does not run the
backend compilers (libtpu's Mosaic, XLA:GPU's Triton), which need the compile-only plugins
(../shared/docs/hardware.md).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_cases import (
  CASES,
  block_mask,
  grad_of_sum,
  kernel_calls,
  runs_mosaic_gpu,
  targeting_gpu,
)

from kernels_pallas.block_sparse import BlockSparseMask, block_sparse_matmul


def _lowered(fn, shapes, dtype, platform):
  args = [jax.ShapeDtypeStruct(s, dtype) for s in shapes]
  with targeting_gpu(platform):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("premasked", [False, True], ids=["masked", "premasked"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("implementation", ["pallas", "auto"])
def test_lowered_for_an_accelerator_the_ops_hold_its_kernel(implementation, platform, case,
                                                            dtype, premasked):
  op, shapes = CASES[case]()
  fn = op(implementation, premasked)
  forward = kernel_calls(_lowered(fn, shapes, dtype, platform))
  grads = kernel_calls(_lowered(grad_of_sum(fn), shapes, dtype, platform))
  mosaic = platform == "cuda" and runs_mosaic_gpu(dtype, premasked)
  kind = "tpu" if platform == "tpu" else "mosaic_gpu" if mosaic else "triton"
  assert forward == {"tpu": 0, "triton": 0, "mosaic_gpu": 0, kind: 1}
  # The input- and weight-gradient kernels, and the forward kernel where the custom VJP's
  # forward is not dead code (the routed op keeps it; a sum does not need it). Mosaic
  # GPU takes the forward and input gradient; the weight gradient stays on Triton.
  if mosaic:
    assert 1 <= grads["mosaic_gpu"] <= 2 and grads["triton"] == 1 and grads["tpu"] == 0
  else:
    assert 2 <= grads[kind] <= 3 and sum(grads.values()) == grads[kind]


@pytest.mark.parametrize("implementation", ["pallas", "auto", "xla"])
@pytest.mark.parametrize("case", ["square_small", "experts_smollm2"])
def test_lowered_for_cpu_the_ops_hold_no_kernel(implementation, case):
  """CPU: "pallas" interprets the kernel, "auto" and "xla" are XLA: no custom call."""
  op, shapes = CASES[case]()
  text = _lowered(op(implementation), shapes, jnp.float32, "cpu")
  text += _lowered(grad_of_sum(op(implementation)), shapes, jnp.float32, "cpu")
  assert not any(kernel_calls(text).values())


@pytest.mark.parametrize("case", ["square_small", "experts_smollm2"])
def test_auto_on_cpu_is_the_xla_numbers_exactly(case):
  op, shapes = CASES[case]()
  rng = np.random.default_rng(0)
  x, w = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes)
  np.testing.assert_array_equal(jax.jit(op("auto"))(x, w), jax.jit(op("xla"))(x, w))


def test_blocks_a_tpu_cannot_tile_fail_when_lowered_for_tpu_not_when_run_here():
  """16x16 blocks: interpreted on this CPU they are exact; lowered for a TPU, Pallas' own
  TPU lowering refuses them (the tiling checks of `grouped.row_tile` are for the
  platform this process runs on)."""
  mask = (np.random.default_rng(0).random((48, 48)) < 0.5).astype(np.float32)
  bsm = BlockSparseMask.from_mask(mask, block_shape=(16, 16))
  fn = jax.jit(lambda x, w: block_sparse_matmul(x, w, bsm, implementation="pallas"))
  x, w = jnp.ones((8, 48)), jnp.ones((48, 48))
  np.testing.assert_allclose(fn(x, w), x @ (w * mask), rtol=1e-6)
  with pytest.raises(ValueError, match="Pallas TPU lowering"):
    fn.trace(x, w).lower(lowering_platforms=("tpu",))


def _dense_metadata(groups, k, n, block=128):
  """The BlockMetadata shapes of `groups` all-dense [k, n] masks (zeros: only sizes count)."""
  from kernels_pallas.block_sparse.metadata import BlockMetadata  # noqa: PLC0415
  kb, nb = k // block, n // block
  z = lambda *shape: np.zeros((groups, *shape), np.int32)  # noqa: E731
  return BlockMetadata(z(nb, kb), z(nb, kb), z(nb), z(kb, nb), z(kb, nb), z(kb), z(kb, nb),
                       np.zeros((groups, 1, block, block), np.int8))


def test_block_lists_beyond_tpu_scalar_memory_are_named_before_mosaic_fails():
  """64 groups of a dense 4096x8192 layer overflowed SMEM in a deviceless v5e compile
  (Mosaic: "Ran out of memory in memory space smem"); 32 fit."""
  from kernels_pallas.block_sparse import kernel_tpu  # noqa: PLC0415
  kernel_tpu.check_scalar_memory(_dense_metadata(32, 4096, 8192), tiles=40)
  with pytest.raises(ValueError, match=r"forward kernel's block lists take 1,06\d,\d{3} bytes"):
    kernel_tpu.check_scalar_memory(_dense_metadata(64, 4096, 8192), tiles=72)


def test_operands_beyond_triton_32_bit_offsets_are_named():
  from kernels_pallas.block_sparse import kernel_gpu  # noqa: PLC0415
  kernel_gpu.check_operand_sizes(rows=65536, groups=8, kp=4096, np_=4096)  # 2**28, 2**27
  with pytest.raises(ValueError, match=r"activations hold 2,147,483,648 elements"):
    kernel_gpu.check_operand_sizes(rows=2**19, groups=1, kp=4096, np_=128)
  with pytest.raises(ValueError, match=r"weights hold 2,147,483,648 elements"):
    kernel_gpu.check_operand_sizes(rows=128, groups=128, kp=4096, np_=4096)


def test_every_tpu_kernel_carries_the_cost_estimate_of_its_longest_block_loop():
  """Each Mosaic custom call holds a cost estimate (Triton drops them): the forward's
  flops are 2 * rows * bk * bn times the column blocks times the longest column list,
  counted here from the mask, and no kernel's exceed the dense product's."""
  rows, k, n = 256, 512, 384
  mask = block_mask(k, n, 0.5)
  bsm = BlockSparseMask.from_mask(mask)
  fn = lambda x, w: block_sparse_matmul(x, w, bsm, implementation="pallas")  # noqa: E731
  blocks = mask[::128, ::128] > 0  # [Kb, Nb]
  forward = _lowered(fn, ((rows, k), (k, n)), jnp.float32, "tpu")
  grads = _lowered(grad_of_sum(fn), ((rows, k), (k, n)), jnp.float32, "tpu")

  def flops(text):
    return [int(f) for f in re.findall(r"\\22flops\\22:(\d+)", text)]

  assert flops(forward) == [2 * rows * 128 * 128 * blocks.shape[1] * blocks.sum(0).max()]
  assert len(flops(grads)) == grads.count("tpu_custom_call") == 2
  assert all(0 < f <= 2 * rows * k * n for f in flops(forward) + flops(grads))
