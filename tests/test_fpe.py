"""FPE: exact budget, disjoint children, copied outgoing weights, every split and layer."""

import jax
import numpy as np
import pytest

from fpe_jax import fpe, nn


def _random_case(rng):
  """A random MLP (numpy-drawn: no compile per shape), dense or already sparse."""
  depth = int(rng.integers(1, 4))
  sizes = [int(rng.integers(4, 20))] + [int(rng.integers(4, 9)) for _ in range(depth)] + [
      int(rng.integers(1, 4))]
  params, masks = {}, {}
  sparse = rng.random() < 0.5  # half the time: splits must partition an existing support
  for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
    keep = (rng.random((d_in, d_out)) < 0.8) if sparse else np.ones((d_in, d_out), bool)
    keep[:4, :] = True  # every neuron keeps at least 4 inputs: enough for alpha <= 4
    w = rng.normal(size=(d_in, d_out)).astype(np.float32) * keep
    params[nn.layer_name(i)] = {"w": w, "b": rng.normal(size=d_out).astype(np.float32)}
    masks[nn.layer_name(i)] = {"w": keep.astype(np.float32), "b": np.ones(d_out, np.float32)}
  return sizes, params, masks


def _clauses(rng, d):
  k = min(3, d)
  variables = np.stack([rng.permutation(d)[:k] for _ in range(int(rng.integers(1, 6)))])
  return variables, rng.choice([-1, 1], variables.shape)


@pytest.mark.parametrize("case", range(40))
def test_expand_preserves_the_nonzero_count_exactly(case):
  rng = np.random.default_rng(case)
  sizes, params, masks = _random_case(rng)
  depth = len(sizes) - 2
  split = fpe.SPLITS[case % len(fpe.SPLITS)]
  alpha = int(rng.integers(2, 5))
  layer = 0 if split == "clause" else (
      int(rng.integers(depth)) if rng.random() < 0.6 else list(range(depth)))
  variables, signs = _clauses(rng, sizes[0])
  before = nn.count_nonzero(params, masks)
  for budget in fpe.BUDGET_MODES:
    new_params, new_masks = fpe.expand(
        params, masks, layer=layer, alpha=alpha, split=split, key=jax.random.key(case),
        clauses=variables, clause_signs=signs, budget=budget)
    assert nn.count_nonzero(new_params, new_masks) == before
    for name in new_params:
      off = np.asarray(new_params[name]["w"]) * (1 - np.asarray(new_masks[name]["w"]))
      assert np.all(off == 0)
    for h in np.atleast_1d(layer):
      assert new_params[nn.layer_name(h)]["w"].shape[1] == sizes[h + 1] * alpha


@pytest.mark.parametrize("case", range(30))
def test_children_partition_the_parent_support(case):
  rng = np.random.default_rng(100 + case)
  sizes, params, masks = _random_case(rng)
  split = ("random", "clause", "feature", "block")[case % 4]
  layer = 0 if split == "clause" else int(rng.integers(len(sizes) - 2))
  alpha = int(rng.integers(2, 4))
  name, out = nn.layer_name(layer), nn.layer_name(layer + 1)
  parent_support = np.asarray(masks[name]["w"]) != 0
  variables, signs = _clauses(rng, sizes[0])
  new_params, new_masks = fpe.split_neurons(
      params, masks, layer=layer, alpha=alpha, split=split, key=jax.random.key(case),
      clauses=variables, clause_signs=signs)
  h = sizes[layer + 1]

  def by_parent(a, axis):  # [..., h * alpha, ...] -> [..., h, alpha, ...] (block: child-major)
    shape = a.shape[:axis] + ((alpha, h) if split == "block" else (h, alpha)) + a.shape[axis + 1:]
    a = a.reshape(shape)
    return np.swapaxes(a, axis, axis + 1) if split == "block" else a

  children = by_parent(np.asarray(new_masks[name]["w"]) != 0, 1)
  # Disjoint, union = parent's support, no child empty.
  assert np.all(children.sum(-1) == parent_support)
  assert np.all(children.sum(0) >= 1)
  # Each child carries the parent's weights on its part.
  w_parent = np.asarray(params[name]["w"])
  w_children = by_parent(np.asarray(new_params[name]["w"]), 1)
  np.testing.assert_array_equal(w_children.sum(-1), w_parent)
  # Outgoing rows and biases copied to every child.
  w_out = by_parent(np.asarray(new_params[out]["w"]), 0)
  np.testing.assert_array_equal(w_out, np.repeat(np.asarray(params[out]["w"])[:, None], alpha, 1))
  np.testing.assert_array_equal(by_parent(np.asarray(new_params[name]["b"]), 0),
                                np.repeat(np.asarray(params[name]["b"])[:, None], alpha, 1))


def test_random_split_children_are_balanced():
  params = nn.init_mlp(jax.random.key(0), [12, 4, 1])
  _, masks = fpe.split_neurons(params, nn.full_masks(params), layer=0, alpha=3, split="random",
                               key=jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(masks["dense_0"]["w"]).sum(0), 4)


def test_clause_split_keeps_each_clause_in_one_child():
  # Disjoint clauses: every clause must land whole in one child of every parent.
  variables = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]])
  signs = np.ones_like(variables)
  params = nn.init_mlp(jax.random.key(0), [16, 5, 1])
  _, masks = fpe.split_neurons(params, nn.full_masks(params), layer=0, alpha=2, split="clause",
                               key=jax.random.key(0), clauses=variables, clause_signs=signs)
  children = np.asarray(masks["dense_0"]["w"]).reshape(16, 5, 2)
  for clause in variables:
    owners = children[clause].argmax(-1)  # [k, parents]
    assert np.all(owners == owners[0])
  # The parent's two strongest clauses go to different children.
  w = np.asarray(params["dense_0"]["w"])
  for j in range(5):
    score = (w[variables, j] * signs).sum(1)
    top2 = np.argsort(-score)[:2]
    first, second = (children[variables[c, 0], j].argmax() for c in top2)
    assert first != second


def test_overlap_control_has_the_same_incoming_count_but_overlaps():
  params = nn.init_mlp(jax.random.key(0), [32, 8, 1])
  masks = nn.full_masks(params)
  _, m = fpe.split_neurons(params, masks, layer=0, alpha=2, split="overlap", key=jax.random.key(2))
  children = np.asarray(m["dense_0"]["w"]).reshape(32, 8, 2)
  assert children.sum() == 32 * 8
  assert np.any(children.sum(-1) == 2)  # some edge is in both children


@pytest.mark.parametrize("bias, expected", [("copy", 1.0), ("split", 0.5), ("zero", 0.0)])
def test_bias_modes(bias, expected):
  params = nn.init_mlp(jax.random.key(0), [6, 3, 1])
  params["dense_0"]["b"] = params["dense_0"]["b"] + 2.0
  new, _ = fpe.split_neurons(params, nn.full_masks(params), layer=0, alpha=2, split="random",
                             key=jax.random.key(0), bias=bias)
  np.testing.assert_allclose(np.asarray(new["dense_0"]["b"]), 2.0 * expected)


def test_budget_prunes_smallest_magnitudes_of_expanded_layers_only():
  params = nn.init_mlp(jax.random.key(3), [10, 4, 4, 2])
  masks = nn.full_masks(params)
  new, new_masks = fpe.expand(params, masks, layer=0, alpha=2, split="random",
                              key=jax.random.key(0))
  # dense_2 was not expanded: untouched.
  np.testing.assert_array_equal(np.asarray(new["dense_2"]["w"]), np.asarray(params["dense_2"]["w"]))
  kept_min = min(np.abs(np.asarray(new[n]["w"]))[np.asarray(new_masks[n]["w"]) > 0].min()
                 for n in ("dense_0", "dense_1"))
  # Every pruned candidate is no larger than every survivor (one global threshold).
  split_only, split_masks = fpe.split_neurons(params, masks, layer=0, alpha=2, split="random",
                                              key=jax.random.fold_in(jax.random.key(0), 0))
  for n in ("dense_0", "dense_1"):
    removed = (np.asarray(split_masks[n]["w"]) > 0) & (np.asarray(new_masks[n]["w"]) == 0)
    assert np.all(np.abs(np.asarray(split_only[n]["w"]))[removed] <= kept_min)


@pytest.mark.parametrize("kwargs, match", [
    (dict(split="bogus"), "split must be one of"),
    (dict(alpha=1), "alpha must be an integer >= 2"),
    (dict(layer=2), r"layer must be in \[0, 1\]"),
    (dict(layer=1, split="clause", clauses=np.array([[0, 1]])), "needs the input layer"),
    (dict(split="clause"), "needs clauses="),
    (dict(bias="half"), "bias must be one of"),
    (dict(budget="local"), "budget must be one of"),
    (dict(alpha=9), "alpha=9 children need at least one each"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
  params = nn.init_mlp(jax.random.key(0), [8, 4, 4, 1])
  args = dict(layer=0, alpha=2, split="random", key=jax.random.key(0)) | kwargs
  with pytest.raises(ValueError, match=match):
    fpe.expand(params, nn.full_masks(params), **args)


def test_block_split_masks_are_block_diagonal_with_density_one_over_alpha():
  """Widths that are multiples of 128: the expanded incoming mask has alpha diagonal
  blocks, block density 1/alpha at 128x128, the function of the parent layout's
  equivalent (the same as a per-parent split before pruning: every child reads a
  disjoint share and sends its parent's row), and the non-zeros exact after the budget."""
  from fpe_jax import metrics  # noqa: PLC0415
  key = jax.random.key(0)
  for alpha in (2, 4):
    params = nn.init_mlp(key, [512, 128, 10])
    masks = nn.full_masks(params)
    split, split_masks = fpe.split_neurons(params, masks, layer=0, alpha=alpha,
                                           split="block", key=key)
    m = np.asarray(split_masks["dense_0"]["w"])
    assert m.shape == (512, 128 * alpha)
    group = 512 // alpha
    for c in range(alpha):  # child c of every parent: inputs [c * group, (c + 1) * group)
      np.testing.assert_array_equal(m[:, c * 128:(c + 1) * 128],
                                    np.repeat((np.arange(512) // group == c)[:, None], 128, 1))
    assert metrics.block_density(m) == pytest.approx(1 / alpha)
    # Copy biases, split inputs disjointly: before pruning, the children's sum per parent
    # is the parent's pre-activation, so a linear readout of the layer is unchanged.
    x = jax.random.normal(jax.random.key(1), (7, 512))
    pre_parent = x @ params["dense_0"]["w"]
    pre_children = (x @ split["dense_0"]["w"]).reshape(7, alpha, 128).sum(axis=1)
    np.testing.assert_allclose(pre_children, pre_parent, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(split["dense_1"]["w"],
                                  np.tile(np.asarray(params["dense_1"]["w"]), (alpha, 1)))
    expanded, expanded_masks = fpe.expand(params, masks, layer=0, alpha=alpha,
                                          split="block", key=key)
    assert nn.count_nonzero(expanded, expanded_masks) == nn.count_nonzero(params, masks)
    assert metrics.block_density(expanded_masks["dense_0"]["w"]) <= 1 / alpha
