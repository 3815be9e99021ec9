"""FPE on real Flax MLPs (NNX and linen): expand, masked optax training, the exact budget."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx

from fpe_jax import flax_interop, fpe, nn, train


class NnxMLP(nnx.Module):
  """The MLP a Flax user writes: an `nnx.List` of `nnx.Linear`, ReLU between."""

  def __init__(self, sizes, rngs: nnx.Rngs):
    self.layers = nnx.List([nnx.Linear(d_in, d_out, rngs=rngs)
                            for d_in, d_out in zip(sizes[:-1], sizes[1:], strict=True)])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = jax.nn.relu(layer(x))
    return self.layers[-1](x)


class NamedMLP(nnx.Module):
  """Named layers that do not sort in forward order; the hidden layer has no bias."""

  def __init__(self, d_in, hidden, d_out, rngs: nnx.Rngs):
    self.encode = nnx.Linear(d_in, hidden, use_bias=False, rngs=rngs)
    self.classify = nnx.Linear(hidden, d_out, rngs=rngs)

  def __call__(self, x):
    return self.classify(jax.nn.relu(self.encode(x)))


class LinenMLP(linen.Module):
  sizes: tuple[int, ...]

  @linen.compact
  def __call__(self, x):
    for width in self.sizes[:-1]:
      x = jax.nn.relu(linen.Dense(width)(x))
    return linen.Dense(self.sizes[-1])(x)


def _as_fpe_mlp(layers: list[dict]) -> dict:
  """The same weights in `nn.init_mlp`'s layout (`dense_i`, `w`, `b`)."""
  return {nn.layer_name(i): {"w": layer["kernel"], "b": layer["bias"]}
          for i, layer in enumerate(layers)}


def _data(n=256, d=12, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = (x[:, 0] * x[:, 1] + x[:, 2] > 0).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(y)


def _train(apply_fn, params, masks, x, y, steps, optimizer):
  """A plain optax loop, full batch, masks re-applied after every update."""
  loss = lambda p: train.softmax_ce(apply_fn(p, masks, x), y)

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return flax_interop.apply_updates(params, updates, masks), opt_state

  opt_state = optimizer.init(params)
  for _ in range(steps):
    params, opt_state = step(params, opt_state)
  return params


def _value_count(params) -> int:
  return sum(int(np.count_nonzero(np.asarray(leaf))) for leaf in jax.tree.leaves(params))


def test_nnx_mlp_expand_train_count_and_match_fpe_jax_mlp():
  sizes, alpha = [12, 6, 2], 2
  x, y = _data()
  optimizer = optax.adam(1e-2)
  model = NnxMLP(sizes, nnx.Rngs(0))
  params = flax_interop.nnx_params(model)
  masks = nn.full_masks(params)
  assert nn.layer_paths(params) == [("layers", 0), ("layers", 1)]
  flax_fn = flax_interop.masked_apply(flax_interop.nnx_apply(model))
  own = _as_fpe_mlp([params["layers"][i] for i in range(2)])
  np.testing.assert_allclose(flax_fn(params, masks, x), nn.apply_mlp(own, nn.full_masks(own), x),
                             atol=1e-6)

  # Dense warm-up, then FPE on the Flax tree: the budget is exact, and the tree is the
  # one fpe_jax's own MLP expands to (bit for bit).
  params = _train(flax_fn, params, masks, x, y, 20, optimizer)
  budget = nn.count_nonzero(params, masks)
  assert budget == _value_count(params) == 12 * 6 + 6 + 6 * 2 + 2
  args = dict(layer=0, alpha=alpha, split="random", key=jax.random.key(1))
  wide, wide_masks = fpe.expand(params, masks, **args)
  assert nn.count_nonzero(wide, wide_masks) == budget
  own, own_masks = fpe.expand(_as_fpe_mlp([params["layers"][i] for i in range(2)]),
                              nn.full_masks(own), **args)
  for i in range(2):
    for flax_leaf, own_leaf in (("kernel", "w"), ("bias", "b")):
      np.testing.assert_array_equal(wide["layers"][i][flax_leaf], own[f"dense_{i}"][own_leaf])
      np.testing.assert_array_equal(wide_masks["layers"][i][flax_leaf],
                                    own_masks[f"dense_{i}"][own_leaf])

  # A Flax model of the expanded width runs the expanded tree as fpe_jax's MLP does.
  wide_model = NnxMLP([12, 6 * alpha, 2], nnx.Rngs(1))
  wide_fn = flax_interop.masked_apply(flax_interop.nnx_apply(wide_model))
  np.testing.assert_allclose(wide_fn(wide, wide_masks, x), nn.apply_mlp(own, own_masks, x),
                             atol=1e-6)

  # Train on under the fixed masks: the count of non-zero values stays the dense budget,
  # and the Flax model follows fpe_jax's own MLP trained the same way.
  wide = _train(wide_fn, wide, wide_masks, x, y, 10, optimizer)
  own = _train(nn.apply_mlp, own, own_masks, x, y, 10, optimizer)
  assert nn.count_nonzero(wide, wide_masks) == budget == _value_count(wide)
  for leaf, leaf_mask in zip(jax.tree.leaves(wide), jax.tree.leaves(wide_masks), strict=True):
    assert np.all(np.asarray(leaf)[np.asarray(leaf_mask) == 0] == 0)
  np.testing.assert_allclose(wide_fn(wide, wide_masks, x), nn.apply_mlp(own, own_masks, x),
                             atol=1e-5)
  # The same model trains through fpe_jax's training core unchanged.
  loss_fn = train.supervised_loss(wide_fn, train.softmax_ce)
  chunk = jax.jit(train.make_train_chunk(loss_fn, optimizer, batch_size=32, steps=5))
  state, _ = chunk(train.init_state(wide, optimizer, wide_masks), x, y, jax.random.key(2))
  assert nn.count_nonzero(state.params, state.masks) == budget >= _value_count(state.params)


def test_named_layers_without_bias_need_their_order():
  model = NamedMLP(12, 5, 3, nnx.Rngs(0))
  params = flax_interop.nnx_params(model)
  masks = nn.full_masks(params)
  with pytest.raises(ValueError, match="do not chain"):
    nn.layer_paths(params)  # "classify" sorts before "encode"
  budget = nn.count_nonzero(params, masks)
  assert budget == 12 * 5 + 5 * 3 + 3
  for mode in fpe.BUDGET_MODES:
    wide, wide_masks = fpe.expand(params, masks, layer=0, alpha=2, split="random",
                                  key=jax.random.key(0), budget=mode,
                                  layer_paths=["encode", "classify"])
    assert nn.count_nonzero(wide, wide_masks) == budget
    assert "bias" not in wide["encode"] and wide["encode"]["kernel"].shape == (12, 10)
    wide_fn = flax_interop.masked_apply(flax_interop.nnx_apply(NamedMLP(12, 10, 3, nnx.Rngs(1))))
    own = _as_fpe_mlp([{**wide["encode"], "bias": jnp.zeros(10)}, wide["classify"]])
    own_masks = _as_fpe_mlp([{**wide_masks["encode"], "bias": jnp.ones(10)},
                             wide_masks["classify"]])
    x, _ = _data()
    np.testing.assert_allclose(wide_fn(wide, wide_masks, x), nn.apply_mlp(own, own_masks, x),
                               atol=1e-6)


def test_linen_mlp_expand_matches_fpe_jax_mlp():
  module = LinenMLP((8, 8, 2))
  x, _ = _data()
  params = module.init(jax.random.key(0), x[:1])["params"]
  masks = nn.full_masks(params)
  assert nn.layer_paths(params) == [("Dense_0",), ("Dense_1",), ("Dense_2",)]
  budget = nn.count_nonzero(params, masks)
  wide, wide_masks = fpe.expand(params, masks, layer=[0, 1], alpha=2, split="random",
                                key=jax.random.key(3))
  assert nn.count_nonzero(wide, wide_masks) == budget
  wide_fn = flax_interop.masked_apply(flax_interop.linen_apply(LinenMLP((16, 16, 2))))
  own = _as_fpe_mlp([wide[f"Dense_{i}"] for i in range(3)])
  own_masks = _as_fpe_mlp([wide_masks[f"Dense_{i}"] for i in range(3)])
  np.testing.assert_allclose(wide_fn(wide, wide_masks, x), nn.apply_mlp(own, own_masks, x),
                             atol=1e-6)
