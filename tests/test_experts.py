"""Tests for fpe_jax.experts: per-cluster SparseGPT experts, routed apply, expert sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from fpe_jax import cluster, experts, metrics, sharding, sparse
from kernels_pallas.block_sparse import BlockSparseMask

D_IN, D_OUT, E = 64, 24, 4


def clustered_inputs(rng, per=80):
  """Tokens from E clusters with different correlation structure (so Hessians differ)."""
  xs, labels = [], []
  for e in range(E):
    mix = rng.normal(size=(D_IN, D_IN)) * rng.lognormal(0, 1.0, size=D_IN)
    xs.append(rng.normal(size=(per, D_IN)) @ mix / np.sqrt(D_IN) + 6.0 * rng.normal(size=D_IN))
    labels.append(np.full(per, e))
  return np.concatenate(xs).astype(np.float32), np.concatenate(labels)


@pytest.fixture(scope="module")
def bank():
  rng = np.random.default_rng(0)
  x, labels = clustered_inputs(rng)
  w = rng.normal(size=(D_IN, D_OUT)).astype(np.float32)
  layer, ids = experts.expand_linear(
      jax.random.key(0), w, x, E, n_components=4, n_restarts=3, sparsity=0.6, block_size=32
  )
  return dict(x=x, labels=labels, w=w, layer=layer, ids=np.asarray(ids))


def test_each_expert_is_sparsegpt_on_its_clusters_hessian(bank):
  x, w, layer, ids = bank["x"], bank["w"], bank["layer"], bank["ids"]
  assert isinstance(layer, experts.ExpertBank) and layer.router is not None
  assert layer.w.shape == layer.mask.shape == (E, D_IN, D_OUT)
  for e in range(E):
    xe = x[ids == e]
    assert len(xe) > 0
    want_w, want_mask = sparse.sparsegpt(
        w, xe.T @ xe / len(xe), sparsity=0.6, block_size=32
    )
    np.testing.assert_allclose(layer.w[e], want_w, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(layer.mask[e], want_mask)
    assert np.all(np.asarray(layer.w[e])[np.asarray(layer.mask[e]) == 0] == 0)
  # Experts differ, because their clusters' Hessians do.
  assert not np.array_equal(layer.mask[0], layer.mask[1])


def test_experts_reconstruct_better_than_one_sparsegpt(bank):
  x, w, layer, ids = bank["x"], bank["w"], bank["layer"], bank["ids"]
  single, _ = sparse.sparsegpt(w, sparse.hessian_from_inputs(x), sparsity=0.6, block_size=32)
  y = x @ w
  err_single = np.sum((y - x @ np.asarray(single)) ** 2)
  err_experts = np.sum((y - np.asarray(experts.apply_expert_linear(layer, x, ids))) ** 2)
  assert err_experts < err_single


@pytest.mark.parametrize("xla_strategy", experts.XLA_STRATEGIES)
def test_apply_matches_a_per_token_loop(bank, xla_strategy):
  layer = bank["layer"]
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 7, D_IN)).astype(np.float32)
  ids = rng.integers(0, E, size=(3, 7))
  ids[0] = 2  # an expert with many tokens; some experts get none in a small batch
  # tile_size=4: several tiles per expert, partly filled ones, and unused tiles at the end.
  fn = jax.jit(lambda w, x, i: experts.apply_experts(
      w, x, i, implementation="xla", xla_strategy=xla_strategy, tile_size=4))
  got = np.asarray(fn(layer.w, x, ids))
  w = np.asarray(layer.w, np.float64)
  want = np.zeros((3, 7, D_OUT))
  for b in range(3):
    for t in range(7):
      want[b, t] = x[b, t].astype(np.float64) @ w[ids[b, t]]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_kernel_implementation_matches_the_reference(bank):
  # The Pallas expert matmul (interpret mode on CPU) through apply_experts' "pallas" path.
  layer = bank["layer"]
  block_mask = BlockSparseMask.from_masks(np.asarray(layer.mask), block_shape=(16, 16))
  x, ids = bank["x"][:40], bank["ids"][:40]
  got = experts.apply_experts(layer.w, x, ids, implementation="pallas", block_mask=block_mask)
  want = experts.apply_experts(layer.w, x, ids, xla_strategy="onehot")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # "auto" is XLA on CPU, kernel metadata or not; its default strategy there is "tiled".
  tiled = experts.apply_experts(layer.w, x, ids, implementation="xla", xla_strategy="tiled")
  for auto in (experts.apply_experts(layer.w, x, ids),
               experts.apply_experts(layer.w, x, ids, block_mask=block_mask)):
    np.testing.assert_array_equal(auto, tiled)


def test_apply_expert_linear_routes_with_the_router(bank):
  layer, x = bank["layer"], bank["x"]
  got = jax.jit(experts.apply_expert_linear)(layer, x[:50])
  ids = experts.route(layer, x[:50])
  np.testing.assert_array_equal(ids, cluster.route(layer.router, x[:50]))
  np.testing.assert_array_equal(ids, bank["ids"][:50])
  want = np.einsum("ti,tio->to", x[:50], np.asarray(layer.w)[np.asarray(ids)])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # Given ids (a shared router's) are used as they are.
  other = (np.asarray(ids) + 1) % E
  want = np.einsum("ti,tio->to", x[:50], np.asarray(layer.w)[other])
  np.testing.assert_allclose(experts.apply_expert_linear(layer, x[:50], other), want,
                             rtol=1e-4, atol=1e-4)


def test_single_expert_is_a_plain_matmul_without_router(bank):
  x, w = bank["x"], bank["w"]
  mask = (np.abs(w) > 0.5).astype(np.float32)
  one = experts.single_expert(w * mask, mask)
  assert one.w.shape == one.mask.shape == (1, D_IN, D_OUT) and one.router is None
  np.testing.assert_array_equal(experts.route(one, x), np.zeros(len(x), np.int32))
  np.testing.assert_allclose(experts.apply_expert_linear(one, x), x @ (w * mask), rtol=1e-5,
                             atol=1e-4)
  dense = experts.single_expert(w)
  np.testing.assert_array_equal(dense.mask, np.ones((1, D_IN, D_OUT)))
  with pytest.raises(ValueError, match="no router"):
    experts.route(bank["layer"]._replace(router=None), x)


def test_bank_is_a_pytree_that_jits_and_round_trips(bank):
  layer = bank["layer"]
  leaves, treedef = jax.tree.flatten(layer)
  # w, mask and the router's mean / components / centroids; no block metadata.
  assert len(leaves) == 5
  again = jax.tree.unflatten(treedef, leaves)
  assert isinstance(again, experts.ExpertBank)
  with_meta = experts.with_block_mask(layer, block_shape=(16, 16))
  assert isinstance(with_meta.block_mask, BlockSparseMask)
  assert with_meta.w is layer.w and with_meta.router is layer.router


def test_expert_axis_shards_and_expert_parallel_apply_matches(bank):
  layer, x, ids = bank["layer"], bank["x"], bank["ids"]
  assert len(jax.devices()) == 8
  mesh = sharding.make_mesh({"data": 2, "expert": 4})
  placed = experts.shard_experts({"w_up": layer}, mesh)["w_up"]
  assert placed.w.sharding.spec == experts.expert_partition_spec()
  assert placed.mask.sharding.spec == PartitionSpec("expert", None, None)
  assert placed.router["centroids"].sharding.spec == PartitionSpec()
  assert experts.shard_experts(layer, mesh).w.sharding.spec == experts.expert_partition_spec()
  # One expert's weights per device along `expert`.
  shard_shapes = {s.data.shape for s in placed.w.addressable_shards}
  assert shard_shapes == {(1, D_IN, D_OUT)}
  want = np.asarray(experts.apply_experts(layer.w, x, ids, xla_strategy="onehot"))
  got = jax.jit(lambda w, x, i: experts.apply_experts_sharded(mesh, w, x, i))(
      placed.w, x, jnp.asarray(ids)
  )
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # Plain apply on sharded weights (XLA inserts the collectives) agrees too.
  got = jax.jit(experts.apply_experts)(placed.w, x, jnp.asarray(ids))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_empty_cluster_gives_an_all_zero_expert():
  rng = np.random.default_rng(2)
  x, _ = clustered_inputs(rng, per=20)
  w = rng.normal(size=(D_IN, D_OUT)).astype(np.float32)
  ids = np.zeros(len(x), np.int64)  # experts 1..3 get no tokens
  bank = experts.build_experts(w, x, ids, E, sparsity=0.5, block_size=32)
  assert np.asarray(bank.w[1:]).max() == 0 and np.asarray(bank.w[1:]).min() == 0
  assert bank.router is None
  want, _ = sparse.sparsegpt(w, sparse.hessian_from_inputs(x), sparsity=0.5, block_size=32)
  np.testing.assert_allclose(bank.w[0], want, rtol=1e-4, atol=1e-4)


def test_batched_expert_pruning_equals_sequential(bank):
  x, w, ids = bank["x"], bank["w"], bank["ids"]
  hs = sparse.hessian_from_inputs(x, ids, num_groups=E)
  b = experts.prune_experts(w, hs, sparsity=0.6, block_size=32, expert_batch_size=E)
  np.testing.assert_allclose(bank["layer"].w, b.w, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(bank["layer"].mask, b.mask)


def test_expert_weighted_wasserstein_matches_manual_average():
  rng = np.random.default_rng(3)
  # Bimodal inputs; expert 0 gets one mode, expert 1 the other, expert 2 one token (left out).
  x = np.concatenate([rng.normal(-6, 1, size=(60, 5)), rng.normal(6, 1, size=(41, 5))])
  x = x.astype(np.float32)
  ids = np.array([0] * 60 + [1] * 40 + [2])
  w = rng.normal(size=(3, 5, 4)).astype(np.float32)
  got = experts.expert_weighted_wasserstein(w, x, ids)
  assert got.dtype == np.float64 and got.shape == (4,)
  wd = metrics.wasserstein_to_gaussian
  per_expert = [np.asarray(wd(x[:60] @ w[0])), np.asarray(wd(x[60:100] @ w[1]))]
  np.testing.assert_allclose(got, (60 * per_expert[0] + 40 * per_expert[1]) / 100, rtol=1e-6)
  # The dense layer (one weight for every expert), routed by mode: each expert sees a
  # Gaussian, far closer than the bimodal whole.
  dense = np.broadcast_to(w[0], w.shape)
  clustered = experts.expert_weighted_wasserstein(dense, x, ids)
  whole = np.asarray(wd(jnp.asarray(x[:100] @ w[0])))
  assert (clustered < 0.5 * whole).all()


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda b: experts.apply_experts(b["w"], b["x"], b["ids"], implementation="gpu"),
         "implementation"),
        (lambda b: experts.apply_experts(b["w"], b["x"], b["ids"][:-1]), "ids must"),
        (lambda b: experts.apply_experts(b["w"], b["x"], b["ids"], implementation="pallas"),
         "block_mask"),
        (lambda b: experts.apply_experts(b["w"], b["x"], b["ids"], xla_strategy="xla"),
         "xla_strategy"),
        (lambda b: experts.prune_experts(b["w0"], np.ones((2, 3, 3))), "hessians"),
        (lambda b: experts.prune_experts(b["w0"], np.ones((2, D_IN, D_IN)), sparsity=1.2),
         "sparsity"),
        (lambda b: experts.expand_linear(jax.random.key(0), b["w0"], b["x"][:3], 4),
         "num_experts=4 exceeds"),
        (lambda b: experts.expert_weighted_wasserstein(b["w"], b["x"], b["ids"][:-1]),
         "ids: "),
        (lambda b: experts.expert_weighted_wasserstein(b["w"], b["x"], np.full(len(b["x"]), 9)),
         "no expert has two"),
        (lambda b: experts.single_expert(b["w0"], np.ones((2, 2))), "mask must"),
    ],
)
def test_bad_arguments_raise_one_line_errors(bank, call, match):
  args = dict(w=bank["layer"].w, x=bank["x"], ids=bank["ids"], w0=bank["w"])
  with pytest.raises(ValueError, match=match) as info:
    call(args)
  assert "\n" not in str(info.value)


def test_storage_bytes_count_each_format_by_hand():
  """Two 4x6 experts, 10 and 12 kept weights, float32, a router: every format written out."""
  mask = np.zeros((2, 4, 6), np.float32)
  mask[0].flat[:10] = 1
  mask[1, :, ::2] = 1  # 12 kept: a 1:2 pattern along d_out, fine for counting
  router = {"mean": jnp.zeros(4), "components": jnp.zeros((4, 2)), "centroids": jnp.zeros((2, 2))}
  bank = experts.ExpertBank(w=jnp.asarray(mask), mask=jnp.asarray(mask), router=router)
  got = experts.storage_bytes(bank, n_m=(2, 4))
  assert got == {
      "dense": 4 * 6 * 4,
      "stored": 2 * 4 * 6 * 4,
      "csr": 22 * (4 + 2) + 2 * 5 * 4,   # values + int16 column ids + row offsets
      "bitmask": 22 * 4 + 6,             # values + 48 bits
      "n_m": 22 * 4 + 6,                 # values + 2 bits each (44 bits -> 6 bytes)
      "router": 4 * (4 + 8 + 4),
  }
  assert "n_m" not in experts.storage_bytes(experts.single_expert(jnp.ones((4, 6))))
