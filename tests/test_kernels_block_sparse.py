"""Block-sparse masked matmul: host metadata, both Pallas kernels in interpret mode, VJP, vmap.

Every kernel result is compared with `x @ (w * mask)` written in plain jnp/numpy. The
mask cases (random, empty rows and columns, all zero, all one, one non-zero block,
shapes that do not divide the block) are stacked along a member axis so that one
compiled vmapped call per backend covers them all (interpret mode is slow to compile).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_cases import targeting_gpu

from kernels_pallas import implementations
from kernels_pallas.block_sparse import (
  BlockSparseMask,
  KernelConfig,
  block_density,
  block_sparse_matmul,
  kernel_config,
  kernel_gpu,
  kernel_tpu,
  masked_matmul_reference,
  stacked_matmul,
)
from kernels_pallas.block_sparse.metadata import fit_block

BACKENDS = list(implementations.PALLAS_BACKENDS)  # both kernels, interpreted on CPU
K, N, B = 40, 36, 10  # 40 and 36 are not multiples of the 16x16 blocks
BLOCK = (16, 16)


def _mask_cases(rng) -> np.ndarray:
  """[6, K, N] masks: the cases the issue asks for, as one stack."""
  random = rng.random((K, N)) < 0.4
  rows_cols = rng.random((K, N)) < 0.5
  rows_cols[5:12] = 0  # empty rows
  rows_cols[:, 20:] = 0  # empty columns, including whole column blocks
  rows_cols[:16, :16] = 0  # an empty block inside a non-empty block row and column
  zeros = np.zeros((K, N), bool)
  ones = np.ones((K, N), bool)
  single = np.zeros((K, N), bool)
  single[16:32, 16:32] = rng.random((16, 16)) < 0.7  # one partly filled block
  ragged_edge = np.zeros((K, N), bool)
  ragged_edge[32:, 32:] = 1  # only the padded corner block holds non-zeros
  return np.stack([random, rows_cols, zeros, ones, single, ragged_edge])


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  masks = _mask_cases(rng)
  m = masks.shape[0]
  x = rng.normal(size=(m, B, K)).astype(np.float32)
  w = rng.normal(size=(m, K, N)).astype(np.float32)
  return masks, x, w


def _np_blocks(mask, bk, bn):
  kp, np_ = -(-mask.shape[0] // bk) * bk, -(-mask.shape[1] // bn) * bn
  full = np.zeros((kp, np_), bool)
  full[:mask.shape[0], :mask.shape[1]] = mask
  return full.reshape(kp // bk, bk, np_ // bn, bn).any(axis=(1, 3))


def test_metadata_lists_match_numpy_blocks(data):
  masks, _, _ = data
  bsm = BlockSparseMask.from_masks(masks, block_shape=BLOCK)
  assert bsm.block_shape == BLOCK and bsm.shape == (K, N)
  chex.assert_shape(bsm.dense, (6, K, N))
  for member, mask in enumerate(masks):
    nonzero = _np_blocks(mask, *BLOCK)
    counts = np.asarray(bsm.blocks.col_block_counts[member])
    rows = np.asarray(bsm.blocks.col_block_rows[member])
    np.testing.assert_array_equal(counts, nonzero.sum(0))
    for j in range(nonzero.shape[1]):
      np.testing.assert_array_equal(rows[j, :counts[j]], np.nonzero(nonzero[:, j])[0])
      if counts[j]:  # padding repeats the last real entry, so the pipeline skips the copy
        assert np.all(rows[j, counts[j]:] == rows[j, counts[j] - 1])
    row_counts = np.asarray(bsm.blocks.row_block_counts[member])
    np.testing.assert_array_equal(row_counts, nonzero.sum(1))
    slots = np.asarray(bsm.blocks.block_slots[member])
    np.testing.assert_array_equal(slots >= 0, nonzero)
    # Rebuild the padded mask from the packed element masks: it must be the input.
    packed = np.asarray(bsm.blocks.block_masks[member])
    kb, nb = nonzero.shape
    rebuilt = np.zeros((kb * BLOCK[0], nb * BLOCK[1]), bool)
    for r in range(kb):
      for c in range(nb):
        if slots[r, c] >= 0:
          rebuilt[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] = packed[slots[r, c]]
    np.testing.assert_array_equal(rebuilt[:K, :N], mask)
    assert not rebuilt[K:].any() and not rebuilt[:, N:].any()
  assert np.all(np.asarray(bsm.blocks.block_masks[:, 0]) == 1)  # slot 0: shared all-ones block


def test_block_shape_fits_small_layers():
  assert fit_block(128, 64) == 64 and fit_block(128, 16) == 16 and fit_block(128, 5) == 16
  assert fit_block(128, 576) == 128 and fit_block(64, 100) == 64
  bsm = BlockSparseMask.from_mask(np.ones((64, 16)))
  assert bsm.block_shape == (64, 16)
  chex.assert_shape(bsm.blocks.col_block_rows, (1, 1))
  assert block_density(bsm) == 1.0


def test_bad_arguments_raise_clear_errors():
  with pytest.raises(ValueError, match="only 0 and 1"):
    BlockSparseMask.from_mask(np.full((4, 4), 0.5))
  with pytest.raises(ValueError, match="block_shape"):
    BlockSparseMask.from_mask(np.ones((4, 4)), block_shape=(0, 16))
  bsm = BlockSparseMask.from_mask(np.ones((8, 4)))
  with pytest.raises(ValueError, match="w has shape"):
    block_sparse_matmul(jnp.ones((2, 8)), jnp.ones((4, 8)), bsm)
  with pytest.raises(ValueError, match="x has shape"):
    block_sparse_matmul(jnp.ones((2, 5)), jnp.ones((8, 4)), bsm)
  with pytest.raises(ValueError, match="implementation must be one of"):
    block_sparse_matmul(jnp.ones((2, 8)), jnp.ones((8, 4)), bsm, implementation="triton")
  with pytest.raises(ValueError, match="backend must be None or one of"):
    block_sparse_matmul(jnp.ones((2, 8)), jnp.ones((8, 4)), bsm, implementation="pallas",
                        backend="cuda")
  with pytest.raises(ValueError, match="backend='gpu' needs implementation='pallas'"):
    block_sparse_matmul(jnp.ones((2, 8)), jnp.ones((8, 4)), bsm, implementation="xla",
                        backend="gpu")
  with pytest.raises(ValueError, match="block_m must be a positive int"):
    block_sparse_matmul(jnp.ones((2, 8)), jnp.ones((8, 4)), bsm, implementation="pallas",
                        block_m=0)
  with pytest.raises(TypeError, match="mask must be a BlockSparseMask"):
    block_sparse_matmul(jnp.ones((2, 8)), jnp.ones((8, 4)), jnp.ones((8, 4)))
  stacked = BlockSparseMask.from_masks(np.ones((2, 8, 4)))
  with pytest.raises(ValueError, match="leading member axis"):
    block_sparse_matmul(jnp.ones((2, 8)), jnp.ones((8, 4)), stacked)


def test_hardware_tiling_checks():
  kernel_tpu.check_blocks(128, 128, 256, 512, 512, jnp.float32)
  kernel_tpu.check_blocks(16, 64, 16, 64, 16, jnp.bfloat16)  # whole-dim blocks are allowed
  with pytest.raises(ValueError, match="bk=64 must be a multiple of 128 on TPU"):
    kernel_tpu.check_blocks(128, 64, 128, 576, 128, jnp.float32)
  kernel_gpu.check_blocks(64, 32, 128, 576, 128, jnp.bfloat16)
  with pytest.raises(ValueError, match="bk=48 must be a power of two >= 16"):
    kernel_gpu.check_blocks(64, 48, 128, 576, 128, jnp.bfloat16)


def test_auto_picks_xla_on_cpu_and_pallas_interprets():
  assert jax.default_backend() == "cpu"
  resolve = implementations.resolve_implementation
  assert resolve("auto") == "xla" and resolve("xla") == "xla" and resolve("pallas") == "pallas"
  assert resolve("auto", has_kernel_mask=False) == "xla"
  with pytest.raises(ValueError, match="implementation='pallas' needs block_mask to be a"):
    resolve("pallas", has_kernel_mask=False, mask_name="block_mask")
  assert kernel_config() == KernelConfig(backend="tpu", interpret=True, block_m=128)
  assert kernel_config("gpu", block_m=32) == KernelConfig("gpu", True, 32)


def test_one_vocabulary_everywhere():
  """Kernels, experts and nn share one tuple of implementation names, under one name."""
  from fpe_jax import experts, nn
  from kernels_pallas import block_sparse, expert_matmul

  assert implementations.IMPLEMENTATIONS == ("auto", "xla", "pallas")
  for module in (block_sparse, expert_matmul, experts, nn):
    assert not hasattr(module, "IMPLEMENTATIONS"), module.__name__


def test_mask_is_a_pytree_of_data():
  """Arrays are leaves, shape and block shape static: jit, vmap and scan carry the mask."""
  masks = np.random.default_rng(7).random((3, 24, 20)) < 0.3
  bsm = BlockSparseMask.from_masks(masks, block_shape=(16, 16))
  assert not hasattr(bsm, "matmul") and not hasattr(bsm, "implementation")
  leaves, treedef = jax.tree.flatten(bsm)
  assert len(leaves) == 9 and all(isinstance(leaf, jax.Array) for leaf in leaves)
  assert jax.tree.unflatten(treedef, leaves).shape == (24, 20)
  # A mask with other blocks but the same static sizes reuses the compiled program.
  traces = []

  @jax.jit
  def total(bsm):
    traces.append(1)
    return jax.lax.scan(lambda c, m: (c + jnp.sum(m.dense), None), 0.0, bsm)[0]

  other = BlockSparseMask.from_masks(masks[::-1], block_shape=(16, 16))
  assert float(total(bsm)) == float(total(other)) == masks.sum()
  assert len(traces) == 1
  dense = jax.vmap(lambda m: m.dense)(bsm)
  np.testing.assert_array_equal(dense, masks.astype(np.float32))


def _rel_err(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / (np.max(np.abs(b)) + 1e-30))


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmapped_forward_and_grads_match_reference(data, backend):
  masks, x, w = data
  bsm = BlockSparseMask.from_masks(masks, block_shape=BLOCK)

  def loss(x, w, bsm):
    y = jax.vmap(lambda xi, wi, mi: block_sparse_matmul(
        xi, wi, mi, implementation="pallas", backend=backend))(x, w, bsm)
    return jnp.sum(jnp.sin(y)), y

  def loss_ref(x, w):
    return jnp.sum(jnp.sin(jnp.einsum("mbk,mkn->mbn", x, w * masks)))

  (_, y), (dx, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w, bsm)
  y_ref = np.einsum("mbk,mkn->mbn", x.astype(np.float64), (w * masks).astype(np.float64))
  dx_ref, dw_ref = jax.grad(loss_ref, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w))
  for member in range(masks.shape[0]):
    assert _rel_err(y[member], y_ref[member]) < 1e-5
    assert _rel_err(dx[member], dx_ref[member]) < 1e-5
    assert _rel_err(dw[member], dw_ref[member]) < 1e-5
  np.testing.assert_array_equal(np.asarray(y[2]), 0.0)  # the all-zero mask
  # The weight gradient is exactly zero off the mask (same block structure as w).
  np.testing.assert_array_equal(np.asarray(dw)[~masks], 0.0)
  np.testing.assert_array_equal(np.asarray(dx[2]), 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_premasked_weights_give_the_masked_numbers_without_the_mask(data, backend):
  """premasked=True on weights that are zero off the mask: the masked kernel's output and
  gradients bit for bit. On weights that break the promise, x @ w over the mask's
  non-empty blocks: the element mask has really left the forward and input gradient,
  and the weight gradient is still masked."""
  masks, x, w = data
  bsm = BlockSparseMask.from_masks(masks, block_shape=BLOCK)

  @jax.jit
  def run(x, w, bsm):
    def results(premasked):
      f = lambda x, w: jax.vmap(lambda xi, wi, mi: block_sparse_matmul(  # noqa: E731
          xi, wi, mi, implementation="pallas", backend=backend, premasked=premasked))(x, w, bsm)
      y, vjp = jax.vjp(f, x, w)
      return (y, *vjp(jnp.cos(y)))
    return results(False), results(True)

  masked, premasked = run(x, w * masks, bsm)
  for a, b in zip(masked, premasked, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  _, (y, dx, dw) = run(x, w, bsm)
  blocks = np.stack([np.kron(_np_blocks(m, *BLOCK), np.ones(BLOCK))[:K, :N] for m in masks])
  w_blocks = (w * blocks).astype(np.float64)
  y_want = np.einsum("mbk,mkn->mbn", x, w_blocks)
  assert _rel_err(y, y_want) < 1e-5
  assert _rel_err(dx, np.einsum("mbn,mkn->mbk", np.cos(np.asarray(y)), w_blocks)) < 1e-5
  np.testing.assert_array_equal(np.asarray(dw)[~masks], 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_blocks_are_never_multiplied(backend):
  """NaNs in the weight's all-zero blocks must not reach the output or the gradients.

  If the kernel multiplied an empty block, NaN * 0 would poison the result; the dense
  reference (which does multiply) has to be computed on the cleaned weight.
  """
  rng = np.random.default_rng(1)
  mask = np.zeros((32, 48), bool)
  mask[:16, 16:32] = rng.random((16, 16)) < 0.5
  mask[16:, 32:] = 1
  w = rng.normal(size=(32, 48)).astype(np.float32)
  blocks = _np_blocks(mask, 16, 16)
  poisoned = w.copy()
  for r, c in zip(*np.nonzero(~blocks), strict=True):
    poisoned[r * 16:(r + 1) * 16, c * 16:(c + 1) * 16] = np.nan
  x = rng.normal(size=(3, 32)).astype(np.float32)
  bsm = BlockSparseMask.from_mask(mask, block_shape=(16, 16))
  f = jax.jit(jax.value_and_grad(
      lambda x, w: jnp.sum(block_sparse_matmul(x, w, bsm, implementation="pallas",
                                               backend=backend) ** 2),
      argnums=(0, 1)))
  f_ref = jax.value_and_grad(lambda x, w: jnp.sum((x @ (w * mask)) ** 2), argnums=(0, 1))
  (val, (dx, dw)), (val_ref, (dx_ref, dw_ref)) = f(x, poisoned), f_ref(x, w)
  assert np.isfinite(val) and _rel_err(val, val_ref) < 1e-5
  assert _rel_err(dx, dx_ref) < 1e-5 and _rel_err(dw, dw_ref) < 1e-5
  assert np.all(np.isfinite(dw))


def test_unbatched_leading_dims_and_shared_weight_vmap():
  rng = np.random.default_rng(2)
  mask = rng.random((24, 20)) < 0.3
  w = rng.normal(size=(24, 20)).astype(np.float32)
  x = rng.normal(size=(2, 3, 24)).astype(np.float32)
  bsm = BlockSparseMask.from_mask(mask, block_shape=(16, 16))
  matmul = lambda x, w: block_sparse_matmul(x, w, bsm, implementation="pallas")
  y = jax.jit(matmul)(x, w)
  chex.assert_shape(y, (2, 3, 20))
  ref = np.einsum("abk,kn->abn", x, w * mask)
  assert _rel_err(y, ref) < 1e-5
  # vmap over x only: weights and mask are shared, the mapped axis folds into the rows.
  y_vmapped = jax.jit(jax.vmap(matmul, in_axes=(0, None)))(x, w)
  assert _rel_err(y_vmapped, ref) < 1e-5


def test_bf16_inputs_accumulate_in_f32():
  rng = np.random.default_rng(3)
  mask = rng.random((64, 32)) < 0.5
  x = jnp.asarray(rng.normal(size=(16, 64)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(64, 32)), jnp.bfloat16)
  bsm = BlockSparseMask.from_mask(mask, block_shape=(32, 16))
  y = jax.jit(lambda x, w: block_sparse_matmul(x, w, bsm, implementation="pallas"))(x, w)
  assert y.dtype == jnp.bfloat16
  ref = np.asarray(x, np.float64) @ (np.asarray(w, np.float64) * mask)
  # One bf16 rounding of the f32 accumulator (2^-8 relative), not one per partial sum.
  assert _rel_err(y.astype(jnp.float32), ref) < 1e-2


def test_xla_reference_is_the_masked_dense_matmul():
  rng = np.random.default_rng(4)
  mask = rng.random((8, 6)) < 0.5
  x, w = rng.normal(size=(5, 8)), rng.normal(size=(8, 6))
  bsm = BlockSparseMask.from_mask(mask)
  np.testing.assert_allclose(block_sparse_matmul(jnp.asarray(x, jnp.float32),
                                                 jnp.asarray(w, jnp.float32), bsm),
                             x @ (w * mask), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(masked_matmul_reference(x, w, mask), x @ (w * mask))


def test_masked_mlp_runs_and_trains_through_the_kernel():
  """fpe_jax.nn takes a BlockSparseMask as a weight-mask leaf and implementation="pallas":
  same logits, same grads as plain masks on XLA."""
  from fpe_jax import nn

  rng = np.random.default_rng(5)
  params = nn.init_mlp(jax.random.key(0), [20, 48, 3])
  plain = {name: {"w": jnp.asarray(rng.random(layer["w"].shape) < 0.4, jnp.float32),
                  "b": jnp.ones_like(layer["b"])} for name, layer in params.items()}
  kernel = {name: {"w": BlockSparseMask.from_mask(np.asarray(m["w"]), block_shape=(16, 16)),
                   "b": m["b"]} for name, m in plain.items()}
  params = nn.apply_masks(params, plain)
  x = jnp.asarray(rng.normal(size=(7, 20)), jnp.float32)

  def loss(params, masks, implementation):
    return jnp.sum(nn.apply_mlp(params, masks, x, implementation=implementation) ** 2)

  value, grads = jax.jit(jax.value_and_grad(loss), static_argnums=2)(params, kernel, "pallas")
  value_ref, grads_ref = jax.value_and_grad(loss)(params, plain, "xla")
  assert _rel_err(value, value_ref) < 1e-5
  for name in params:
    for leaf in params[name]:
      assert _rel_err(grads[name][leaf], grads_ref[name][leaf]) < 1e-5
  assert nn.count_nonzero(params, kernel) == nn.count_nonzero(params, plain)


def test_run_stacked_kernel_masks_train_under_vmap_and_scan():
  """How a binary trains runs with --matmul=pallas: run-stacked kernel masks are vmapped
  leaves beside the params, scanned over steps: same params as plain masks on XLA."""
  from fpe_jax import nn

  rng = np.random.default_rng(8)
  runs = 2  # with different masks
  stack = lambda trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)
  params = stack([nn.init_mlp(jax.random.key(r), [20, 40, 3]) for r in range(runs)])
  plain = jax.tree.map(lambda p: jnp.asarray(rng.random(p.shape) < 0.4, jnp.float32), params)
  params = nn.apply_masks(params, plain)
  kernel = {n: {**m, "w": BlockSparseMask.from_masks(np.asarray(m["w"]), block_shape=(16, 16))}
            for n, m in plain.items()}
  x = jnp.asarray(rng.normal(size=(6, 20)), jnp.float32)

  def train(params, masks, implementation):
    def step(params, _):
      grads = jax.grad(lambda p: jnp.sum(nn.apply_mlp(
          p, masks, x, implementation=implementation) ** 2))(params)
      return nn.apply_masks(jax.tree.map(lambda p, g: p - 1e-2 * g, params, grads), masks), None
    return jax.lax.scan(step, params, None, length=2)[0]

  run = jax.jit(jax.vmap(train, in_axes=(0, 0, None)), static_argnums=2)
  got, want = run(params, kernel, "pallas"), run(params, plain, "xla")
  for name in params:
    for leaf in params[name]:
      assert _rel_err(got[name][leaf], want[name][leaf]) < 1e-5


@pytest.mark.parametrize("platform,backend", [("tpu", "tpu"), ("cuda", "gpu")])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_kernels_lower_for_tpu_and_gpu(platform, backend, dtype):
  """Cross-platform lowering on CPU of `stacked_matmul` with partly filled blocks (so the
  element masks are loaded): the Mosaic TPU and Triton GPU kernels (forward, input
  gradient, weight gradient) pass Pallas' lowering at hardware block sizes. The ops'
  lowering and the real compilers' verdicts are in test_kernels_lowering.py and
  test_kernels_compile.py."""
  cfg = KernelConfig(backend=backend, interpret=False, block_m=128)
  mask = np.kron(np.random.default_rng(6).random((4, 3)) < 0.5, np.ones((128, 128), bool))
  mask[:, :5] = 0  # partly filled blocks: the packed element masks are used too
  meta = jax.tree.map(lambda a: a[None],
                      BlockSparseMask.from_mask(mask, block_shape=(128, 128)).blocks)

  def loss(x, w):
    return jnp.sum(stacked_matmul(cfg, x, w, meta).astype(jnp.float32) ** 2)

  with targeting_gpu(platform):
    lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).trace(
        jnp.ones((1, 256, 512), dtype), jnp.ones((1, 512, 384), dtype)).lower(
            lowering_platforms=(platform,))
  text = lowered.as_text()
  marker = "tpu_custom_call" if backend == "tpu" else "xla.gpu.triton"
  assert text.count(marker) == 3
