"""Masked MLPs against numpy; the budget count; masks as traced data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpe_jax import nn


def test_init_shapes_and_layout():
  params = nn.init_mlp(jax.random.key(0), [5, 7, 3, 2])
  assert nn.layer_names(params) == ["dense_0", "dense_1", "dense_2"]
  assert params["dense_1"]["w"].shape == (7, 3) and params["dense_1"]["b"].shape == (3,)
  with pytest.raises(ValueError, match="sizes"):
    nn.init_mlp(jax.random.key(0), [5])


def test_apply_matches_numpy_with_masks():
  rng = np.random.default_rng(0)
  params = nn.init_mlp(jax.random.key(1), [6, 5, 4])
  masks = jax.tree.map(lambda p: jnp.asarray(rng.random(p.shape) < 0.6, jnp.float32), params)
  x = rng.normal(size=(9, 6)).astype(np.float32)
  p = jax.tree.map(np.asarray, params)
  m = jax.tree.map(np.asarray, masks)
  layer = lambda a, n: a @ (p[n]["w"] * m[n]["w"]) + p[n]["b"] * m[n]["b"]
  h = np.maximum(layer(x, "dense_0"), 0)
  want = layer(h, "dense_1")
  got = jax.jit(nn.apply_mlp)(params, masks, jnp.asarray(x))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(nn.hidden_activations(params, masks, jnp.asarray(x))[0], h,
                             rtol=1e-5, atol=1e-6)


def test_implementation_is_explicit_and_kernel_masks_are_typed_leaves():
  from kernels_pallas.block_sparse import BlockSparseMask

  rng = np.random.default_rng(1)
  params = nn.init_mlp(jax.random.key(2), [6, 5, 4])
  masks = jax.tree.map(lambda p: jnp.asarray(rng.random(p.shape) < 0.6, jnp.float32), params)
  kernel = {n: {**m, "w": BlockSparseMask.from_mask(np.asarray(m["w"]))} for n, m in masks.items()}
  x = jnp.asarray(rng.normal(size=(9, 6)), jnp.float32)
  want = nn.apply_mlp(params, masks, x)
  # "xla" (and "auto" on CPU) multiply by the kernel mask's dense array: the same bits.
  for implementation in ("xla", "auto"):
    np.testing.assert_array_equal(
        nn.apply_mlp(params, kernel, x, implementation=implementation), want)
  assert nn.dense_mask(kernel["dense_0"]["w"]) is kernel["dense_0"]["w"].dense
  with pytest.raises(ValueError, match="implementation='pallas' needs mask to be a"):
    nn.apply_mlp(params, masks, x, implementation="pallas")
  with pytest.raises(ValueError, match="implementation must be one of"):
    nn.hidden_activations(params, masks, x, implementation="kernel")


def test_count_nonzero_counts_the_mask_support():
  params = nn.init_mlp(jax.random.key(0), [4, 3, 1])
  masks = nn.full_masks(params)
  assert nn.count_nonzero(params, masks) == 4 * 3 + 3 + 3 * 1 + 1
  masks["dense_0"]["w"] = masks["dense_0"]["w"].at[0].set(0.0)
  assert nn.count_nonzero(params, masks) == 4 * 3 + 3 + 3 * 1 + 1 - 3
  with pytest.raises(ValueError, match="mask of dense_0/w has shape"):
    nn.count_nonzero(params, {**masks, "dense_0": {**masks["dense_0"], "w": jnp.ones((2, 2))}})


def test_masks_are_traced_data_not_static():
  params = nn.init_mlp(jax.random.key(0), [4, 3, 1])
  traces = []

  @jax.jit
  def f(params, masks, x):
    traces.append(1)
    return nn.apply_mlp(params, masks, x)

  x = jnp.ones((2, 4))
  f(params, nn.full_masks(params), x)
  f(params, jax.tree.map(jnp.zeros_like, params), x)
  assert len(traces) == 1  # a new mask does not recompile


def test_apply_masks_zeroes_off_mask_entries():
  params = nn.init_mlp(jax.random.key(0), [4, 3, 1])
  masks = nn.full_masks(params)
  masks["dense_0"]["w"] = jnp.zeros((4, 3)).at[1, 2].set(1.0)
  out = nn.apply_masks(params, masks)
  assert int(jnp.count_nonzero(out["dense_0"]["w"])) == 1


def test_layer_paths_in_natural_order_in_any_tree():
  layer = lambda d_in, d_out: {"kernel": jnp.ones((d_in, d_out)), "bias": jnp.zeros(d_out)}
  linen = {f"Dense_{i}": layer(3, 3) for i in (10, 2, 0, 1, 3, 4, 5, 6, 7, 8, 9)}
  assert nn.layer_paths(linen) == [(f"Dense_{i}",) for i in range(11)]
  nnx_like = {"layers": {1: layer(4, 2), 0: layer(5, 4)}, "scale": jnp.ones(2)}
  assert nn.layer_paths(nnx_like) == [("layers", 0), ("layers", 1)]
  assert nn.layer_paths(nn.init_mlp(jax.random.key(0), [3, 4, 5])) == [("dense_0",), ("dense_1",)]
  with pytest.raises(ValueError, match="layers/0 .* and layers/1 .* do not chain"):
    nn.layer_paths({"layers": {0: layer(5, 4), 1: layer(3, 2)}})
  with pytest.raises(ValueError, match="no dense layer"):
    nn.layer_paths({"embedding": jnp.ones((4, 2))})


def test_mask_helpers_take_nested_flax_style_trees():
  params = {"layers": {0: {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.ones(3)}}}
  masks = {"layers": {0: {"kernel": jnp.eye(2, 3), "bias": jnp.array([1.0, 0.0, 1.0])}}}
  out = nn.apply_masks(params, masks)
  np.testing.assert_array_equal(out["layers"][0]["kernel"], [[0, 0, 0], [0, 4, 0]])
  np.testing.assert_array_equal(out["layers"][0]["bias"], [1, 0, 1])
  assert nn.count_nonzero(params, masks) == 2 + 2
  bad = {"layers": {0: {**masks["layers"][0], "bias": jnp.ones(2)}}}
  with pytest.raises(ValueError, match="mask of layers/0/bias has shape"):
    nn.count_nonzero(params, bad)
  moved = nn.set_layer(params, ("layers", 0), {"kernel": jnp.zeros((2, 3))})
  assert "bias" not in nn.get_layer(moved, ("layers", 0)) and "bias" in params["layers"][0]
