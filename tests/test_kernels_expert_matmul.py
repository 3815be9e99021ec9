"""Routed sparse-expert matmul against the one-hot reference, for skewed routings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.block_sparse import BlockSparseMask
from kernels_pallas.block_sparse.layout import max_routed_tiles, routed_layout
from kernels_pallas.expert_matmul import expert_matmul, expert_matmul_reference

E, K, N, T = 4, 40, 36, 37


def _rel_err(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / (np.max(np.abs(b)) + 1e-30))


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  masks = rng.random((E, K, N)) < 0.3
  masks[1] = 0  # an expert whose weight is entirely masked
  masks[2, :16] = 1  # full blocks beside partial ones
  x = rng.normal(size=(T, K)).astype(np.float32)
  w = rng.normal(size=(E, K, N)).astype(np.float32)
  routings = {
      # expert 2 takes most tokens, expert 3 none
      "skewed": np.where(rng.random(T) < 0.8, 2, rng.choice([0, 1], T)),
      "one_expert_takes_all": np.full((T,), 3),
  }
  return masks, x, w, {k: jnp.asarray(v, jnp.int32) for k, v in routings.items()}


def test_routed_layout_places_each_token_in_its_group_tiles():
  ids = jnp.asarray([2, 0, 2, 2, 0, 3, 2], jnp.int32)
  bm, groups = 2, 4
  layout, row = routed_layout(ids, groups, bm, max_routed_tiles(7, groups, bm))
  tiles = np.asarray(layout.tile_group)
  row = np.asarray(row)
  assert len(set(row.tolist())) == 7  # distinct rows
  np.testing.assert_array_equal(tiles[row // bm], np.asarray(ids))
  # groups in ascending consecutive tiles, each with at least one tile (group 1 is empty)
  np.testing.assert_array_equal(np.asarray(layout.group_tile_count), [1, 1, 2, 1])
  np.testing.assert_array_equal(np.asarray(layout.group_tile_start), [0, 1, 2, 4])
  assert int(layout.num_active[0]) == 5
  assert np.all(np.diff(tiles) >= 0)


@pytest.mark.parametrize("implementation,backend",
                         [("xla", None), ("pallas", "tpu"), ("pallas", "gpu")])
def test_expert_matmul_and_grads_match_one_hot_reference(setup, implementation, backend):
  masks, x, w, routings = setup
  bsm = BlockSparseMask.from_masks(masks, block_shape=(16, 16))

  @jax.jit
  def run(x, w, ids):
    def loss(x, w):
      y = expert_matmul(x, ids, w, bsm, implementation=implementation, backend=backend,
                        block_m=16)
      return jnp.sum(jnp.sin(y)), y
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, w)

  def loss_ref(x, w, ids):
    return jnp.sum(jnp.sin(expert_matmul_reference(x, ids, w, masks)))

  for ids in routings.values():
    (_, y), (dx, dw) = run(x, w, ids)
    y_ref = expert_matmul_reference(x, ids, w, masks)
    dx_ref, dw_ref = jax.grad(loss_ref, argnums=(0, 1))(x, w, ids)
    assert _rel_err(y, y_ref) < 1e-5
    assert _rel_err(dx, dx_ref) < 1e-5
    assert _rel_err(dw, dw_ref) < 1e-5
    used = np.bincount(np.asarray(ids), minlength=E) > 0
    np.testing.assert_array_equal(np.asarray(dw)[~used], 0.0)  # experts without tokens
    np.testing.assert_array_equal(np.asarray(dw)[~masks], 0.0)  # off every mask
  # Tokens routed to the all-masked expert 1 get exactly zero.
  ids = routings["skewed"]
  (_, y), _ = run(x, w, ids)
  np.testing.assert_array_equal(np.asarray(y)[np.asarray(ids) == 1], 0.0)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_premasked_experts_give_the_masked_numbers(setup, backend):
  """Pruned experts (zero off their masks) with premasked=True: the masked kernel's output
  and gradients bit for bit, without the element-mask multiply."""
  masks, x, w, routings = setup
  bsm = BlockSparseMask.from_masks(masks, block_shape=(16, 16))
  pruned = jnp.asarray(w * masks)

  @jax.jit
  def run(ids):
    def results(premasked):
      f = lambda x, w: expert_matmul(x, ids, w, bsm, implementation="pallas",  # noqa: E731
                                     backend=backend, block_m=16, premasked=premasked)
      y, vjp = jax.vjp(f, x, pruned)
      return (y, *vjp(jnp.cos(y)))
    return results(False), results(True)

  masked, premasked = run(routings["skewed"])
  for a, b in zip(masked, premasked, strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_expert_matmul_rejects_bad_inputs(setup):
  masks, x, w, routings = setup
  bsm = BlockSparseMask.from_masks(masks, block_shape=(16, 16))
  ids = routings["skewed"]
  with pytest.raises(ValueError, match="expert_masks must be stacked"):
    expert_matmul(x, ids, w, BlockSparseMask.from_mask(masks[0]))
  with pytest.raises(ValueError, match="w has shape"):
    expert_matmul(x, ids, w[:2], bsm)
  with pytest.raises(ValueError, match="expert_ids must be an int array"):
    expert_matmul(x, ids[:3], w, bsm)
  with pytest.raises(ValueError, match="implementation must be one of"):
    expert_matmul(x, ids, w, bsm, implementation="kernel")
  with pytest.raises(TypeError, match="expert_masks must be a BlockSparseMask"):
    expert_matmul(x, ids, w, jnp.asarray(masks, jnp.float32))
