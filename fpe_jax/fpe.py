"""Fixed Parameter Expansion: split hidden neurons into children at a fixed non-zero budget.

`expand = split_neurons (each requested layer) then restore_budget`:

1. `split_neurons`: every parent neuron of a hidden layer becomes `alpha` children. The
   parent's incoming support (its on-mask edges) is partitioned into `alpha` DISJOINT
   parts, one per child (the `overlap` control instead gives each child an independent
   random subset of the same size). The parent's outgoing row is copied to every child,
   and its bias per `bias` ("copy" by default). Child c of parent j is neuron
   `j * alpha + c`, so a parent's children stay adjacent (except for `block`, below).
2. `restore_budget`: copying outgoing weights and biases grows the non-zero count;
   magnitude pruning of the expanded layers' weight matrices gives exactly that growth
   back, so `count_nonzero` after == before. Biases are never pruned (they count, but a
   pruned bias would silence a child's offset, which no split intends).

Splits (how a parent's incoming edges are shared out):
- `random`: a uniformly random balanced partition, independently per parent.
- `clause`: Boolean tasks, first hidden layer only: the parent's clauses are ranked by
  how strongly it detects them (sum over the clause's literals of weight * sign) and
  dealt to children round-robin, so its strongest clauses land in different children;
  all variables of a clause go to that clause's child (a variable in several clauses
  follows the best-ranked one); variables in no clause go to the least-loaded child.
- `feature`: the input features of the layer (rows of the masked `w`, i.e. the paper's
  `W^T W` Gram in the [d_out, d_in] layout) are grouped by balanced k-means on the rows
  of the input Gram matrix `w w^T`; group c goes to child c of every parent.
- `overlap` (control): each child draws its inputs independently from the parent's
  support, the same count a disjoint child would get, so children overlap and some of
  the parent's inputs are dropped.
- `block`: child c of every parent takes input group c, the c-th of `alpha` contiguous
  ranges of the layer's inputs, and the children are laid out child-major (child c of
  parent j is neuron `c * h + j`, the outgoing rows and biases permuted with them, so the
  function is the same as any other layout's). The expanded incoming matrix's mask is
  then block-diagonal with `alpha` blocks: at (bk, bn) kernel blocks it has block density
  1/alpha when d_in / alpha and h are multiples of bk and bn, so the block-sparse kernels
  skip (alpha - 1) / alpha of it. The split a kernel can exploit, for comparison with
  the per-parent random one (whose blocks are almost all non-empty).

Any MLP's params tree works, not only `nn.init_mlp`'s: layers are addressed by their
paths in the tree (`nn.layer_paths`: `("dense_0",)`, a Flax linen `("Dense_0",)`, an NNX
`("layers", 0)`), with weight / bias leaves named `w` / `b` or Flax's `kernel` / `bias`.
Hidden layer i is the output of the i-th dense layer in forward order, read by the next.

This is a one-time host-side transformation (numpy, exact), not a traced function.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fpe_jax import nn

SPLITS = ("random", "clause", "feature", "overlap", "block")
BIAS_MODES = ("copy", "split", "zero")
BUDGET_MODES = ("global", "per_layer")
Layer = str | int | nn.LayerPath  # a top-level layer name or a layer's path in the tree


def expand(
    params: nn.Params,
    masks: nn.Masks,
    *,
    layer: int | Sequence[int],
    alpha: int,
    split: str,
    key: jax.Array,
    clauses: np.ndarray | None = None,
    clause_signs: np.ndarray | None = None,
    bias: str = "copy",
    budget: str = "global",
    layer_paths: Sequence[Layer] | None = None,
) -> tuple[nn.Params, nn.Masks]:
  """Splits hidden layer(s) into `alpha` children per neuron at the same non-zero count.

  Args:
    params: an MLP, one model (no stacked axis): `nn.init_mlp`'s layout or any nested
      dict of dense layers (a Flax linen or NNX params dict).
    masks: its mask tree.
    layer: hidden layer index (0 = output of the first dense layer, `dense_0`), or
      several, all expanded under one budget.
    alpha: children per parent, >= 2.
    split: one of `SPLITS`.
    key: PRNG key for the random parts of the split.
    clauses: [n_clauses, k] variable indices of a Boolean formula (split="clause").
    clause_signs: [n_clauses, k] literal signs in {+1, -1} (split="clause"; default +1).
    bias: child biases: "copy" the parent's, "split" it in alpha equal parts, or "zero".
    budget: "global": one magnitude threshold over all expanded weight matrices;
      "per_layer": every weight matrix is pruned back to its own pre-expansion count,
      the biases' growth being taken from the incoming matrix of their layer. Global
      pruning compares matrices of different scales: with a wide output layer (e.g. a
      [384, h, 338] head at alpha 4) the copied outgoing weights are larger than the
      incoming ones and the prune can empty the incoming matrix; use "per_layer" there.
    layer_paths: the model's dense layers in forward order, as top-level names or paths
      (`["fc1", "fc2"]`, `[("layers", 0), ("layers", 1)]`); default `nn.layer_paths`.
      `layer` indexes the hidden layers between them.

  Returns:
    (params, masks) with `count_nonzero` exactly equal to the input's.
  """
  paths = _resolve_paths(params, layer_paths)
  hidden = [layer] if isinstance(layer, int | np.integer) else list(layer)
  n_hidden = len(paths) - 1
  if not hidden or any(not 0 <= int(hid) < n_hidden for hid in hidden):
    raise ValueError(f"layer must be in [0, {n_hidden - 1}] (hidden layers), got {layer}")
  if len(set(hidden)) != len(hidden):
    raise ValueError(f"layer lists a hidden layer twice: {layer}")
  if budget not in BUDGET_MODES:
    raise ValueError(f"budget must be one of {BUDGET_MODES}, got {budget!r}")
  before = nn.count_nonzero(params, masks)
  # Sorted by path: the prune concatenates the matrices in this order and breaks ties by
  # position. The key only makes int and str keys comparable.
  matrices = sorted({paths[hid + o] for hid in hidden for o in (0, 1)},
                    key=lambda path: tuple((isinstance(k, str), k) for k in path))
  original_counts = {path: _support(params, masks, path) for path in matrices}
  for i, hid in enumerate(sorted(hidden)):
    params, masks = split_neurons(
        params, masks, layer=int(hid), alpha=alpha, split=split,
        key=jax.random.fold_in(key, i), clauses=clauses, clause_signs=clause_signs, bias=bias,
        layer_paths=paths,
    )
  if budget == "global":
    outside = nn.count_nonzero(params, masks) - sum(
        _support(params, masks, path)[0] for path in matrices)
    targets = {tuple(matrices): before - outside}
  else:
    targets = {}
    for path in matrices:
      weights, biases = original_counts[path]
      bias_growth = _support(params, masks, path)[1] - biases
      targets[(path,)] = weights - bias_growth
  for group, target in targets.items():
    params, masks = restore_budget(params, masks, matrices=list(group), target=target)
  assert nn.count_nonzero(params, masks) == before
  return params, masks


def _resolve_paths(params: nn.Params,
                   layer_paths: Sequence[Layer] | None) -> list[nn.LayerPath]:
  if layer_paths is None:
    return nn.layer_paths(params)
  return [nn.as_layer_path(name) for name in layer_paths]


def _support(params: nn.Params, masks: nn.Masks, path: nn.LayerPath) -> tuple[int, int]:
  """The on-mask counts (weights, biases) of the dense layer at `path`."""
  layer, layer_mask = nn.get_layer(params, path), nn.get_layer(masks, path)
  b_key = nn.bias_key(layer)
  weights = int(np.count_nonzero(nn.dense_mask(layer_mask[nn.weight_key(layer)])))
  biases = 0 if b_key is None else int(np.count_nonzero(layer_mask[b_key]))
  return weights, biases


def split_neurons(
    params: nn.Params,
    masks: nn.Masks,
    *,
    layer: int,
    alpha: int,
    split: str,
    key: jax.Array,
    clauses: np.ndarray | None = None,
    clause_signs: np.ndarray | None = None,
    bias: str = "copy",
    layer_paths: Sequence[Layer] | None = None,
) -> tuple[nn.Params, nn.Masks]:
  """Step 1 of `expand` for one hidden layer, without restoring the budget.

  Args: as `expand`, `layer` a single hidden index.

  Returns:
    (params, masks) with hidden layer `layer` alpha times wider.
  """
  paths = _resolve_paths(params, layer_paths)
  n_hidden = len(paths) - 1
  if not 0 <= layer < n_hidden:
    raise ValueError(f"layer must be in [0, {n_hidden - 1}] (hidden layers), got {layer}")
  if not isinstance(alpha, int | np.integer) or alpha < 2:
    raise ValueError(f"alpha must be an integer >= 2, got {alpha}")
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if bias not in BIAS_MODES:
    raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
  if split == "clause":
    if layer != 0:
      raise ValueError(f"split='clause' needs the input layer (layer=0), got layer={layer}")
    if clauses is None:
      raise ValueError("split='clause' needs clauses= (the formula's [n_clauses, k] variables)")

  inc, out = nn.get_layer(params, paths[layer]), nn.get_layer(params, paths[layer + 1])
  inc_mask, out_mask = nn.get_layer(masks, paths[layer]), nn.get_layer(masks, paths[layer + 1])
  w_key, b_key, out_key = nn.weight_key(inc), nn.bias_key(inc), nn.weight_key(out)
  w_in = np.asarray(inc[w_key], np.float32)
  m_in = np.asarray(nn.dense_mask(inc_mask[w_key])) != 0
  d_in, h = w_in.shape
  if out[out_key].shape[0] != h:
    raise ValueError(
        f"layer {nn.format_path(paths[layer + 1])} reads {out[out_key].shape[0]} inputs, "
        f"{nn.format_path(paths[layer])} gives {h}: name the layers in forward order "
        "(layer_paths=...)")
  rng = _numpy_rng(key)
  if split == "clause":
    clauses = np.asarray(clauses)
    signs = np.ones_like(clauses) if clause_signs is None else np.asarray(clause_signs)
    if clauses.ndim != 2 or clauses.min() < 0 or clauses.max() >= d_in:
      raise ValueError(f"clauses must be [n_clauses, k] indices into the {d_in} inputs")
  groups = _balanced_feature_groups(w_in * m_in, alpha, rng) if split == "feature" else None

  child_masks = np.zeros((d_in, h, alpha), bool)
  for j in range(h):
    support = np.flatnonzero(m_in[:, j])
    if support.size < alpha:
      raise ValueError(
          f"neuron {j} of hidden layer {layer} has {support.size} incoming edges; "
          f"alpha={alpha} children need at least one each"
      )
    if split == "random":
      owner = _balanced_random_owner(support.size, alpha, rng)
    elif split == "block":  # contiguous input ranges, the same for every parent
      owner = _fill_empty_children(support * alpha // d_in, alpha)
    elif split == "clause":
      owner = _clause_owner(support, w_in[:, j], clauses, signs, alpha)
    elif split == "feature":
      owner = _fill_empty_children(groups[support], alpha)
    else:  # overlap control: same sizes as a balanced disjoint split, drawn independently
      sizes = np.bincount(np.arange(support.size) % alpha, minlength=alpha)
      for c in range(alpha):
        child_masks[rng.choice(support, sizes[c], replace=False), j, c] = True
      continue
    child_masks[support, j, owner] = True

  # Child-major for `block`: column c * h + j is child c of parent j (parent-major
  # j * alpha + c otherwise); the biases and outgoing rows below follow the same order.
  order = (np.arange(h * alpha).reshape(h, alpha).T.ravel() if split == "block"
           else np.arange(h * alpha))
  new_m_in = child_masks.reshape(d_in, h * alpha)[:, order]
  new_w_in = np.repeat(w_in, alpha, axis=1)[:, order] * new_m_in
  new_inc = {**inc, w_key: jnp.asarray(new_w_in)}
  # The new mask layers list their leaves in the params' order, as the params do.
  new_inc_mask = {**{k: inc_mask[k] for k in inc}, w_key: jnp.asarray(new_m_in.astype(np.float32))}
  if b_key is not None:
    b = np.asarray(inc[b_key], np.float32)
    new_b = {"copy": np.repeat(b, alpha), "split": np.repeat(b / alpha, alpha),
             "zero": np.zeros(h * alpha, np.float32)}[bias][order]
    new_mb = np.repeat(np.asarray(nn.dense_mask(inc_mask[b_key])), alpha)[order]
    new_inc[b_key] = jnp.asarray(new_b * new_mb)
    new_inc_mask[b_key] = jnp.asarray(new_mb.astype(np.float32))
  # Outgoing rows are copied: every child sends what its parent sent.
  new_w_out = np.repeat(np.asarray(out[out_key], np.float32), alpha, axis=0)[order]
  new_m_out = np.repeat(np.asarray(nn.dense_mask(out_mask[out_key])), alpha, axis=0)[order]

  params = nn.set_layer(params, paths[layer], new_inc)
  masks = nn.set_layer(masks, paths[layer], new_inc_mask)
  params = nn.set_layer(params, paths[layer + 1],
                        {**out, out_key: jnp.asarray(new_w_out * new_m_out)})
  masks = nn.set_layer(masks, paths[layer + 1], {
      **{k: out_mask[k] for k in out}, out_key: jnp.asarray(new_m_out.astype(np.float32))})
  return params, masks


def restore_budget(
    params: nn.Params, masks: nn.Masks, *, matrices: Sequence[Layer], target: int
) -> tuple[nn.Params, nn.Masks]:
  """Magnitude-prunes the weight matrices `matrices` to exactly `target` non-zeros in all.

  `matrices` names dense layers (top-level names or paths, as `expand`'s `layer_paths`). The
  smallest |w| on-mask entries go first; ties are broken by position (a stable sort over
  the matrices in the order given), so the count is exact even when copied weights are
  equal.
  """
  paths = [nn.as_layer_path(name) for name in matrices]
  layers = [nn.get_layer(params, path) for path in paths]
  keys = [nn.weight_key(layer) for layer in layers]
  flat_w = np.concatenate([np.abs(np.asarray(layer[k])).ravel()
                           for layer, k in zip(layers, keys, strict=True)])
  flat_m = np.concatenate([np.asarray(nn.dense_mask(nn.get_layer(masks, path)[k])).ravel() != 0
                           for path, k in zip(paths, keys, strict=True)])
  excess = int(flat_m.sum()) - target
  if excess < 0 or target < 0:
    raise ValueError(f"cannot prune {matrices} to {target} non-zeros: they hold {flat_m.sum()}")
  on = np.flatnonzero(flat_m)
  prune = on[np.argsort(flat_w[on], kind="stable")[:excess]]
  flat_m[prune] = False
  offset = 0
  for path, layer, k in zip(paths, layers, keys, strict=True):
    shape = layer[k].shape
    m = flat_m[offset:offset + int(np.prod(shape))].reshape(shape)
    offset += m.size
    masks = nn.set_layer(masks, path,
                         {**nn.get_layer(masks, path), k: jnp.asarray(m.astype(np.float32))})
    params = nn.set_layer(params, path, {**layer, k: jnp.asarray(np.asarray(layer[k]) * m)})
  return params, masks


def _numpy_rng(key: jax.Array) -> np.random.Generator:
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  return np.random.default_rng(np.asarray(key, np.uint32).ravel())


def _balanced_random_owner(n: int, alpha: int, rng: np.random.Generator) -> np.ndarray:
  return rng.permutation(np.arange(n) % alpha)


def _clause_owner(
    support: np.ndarray, w_col: np.ndarray, clauses: np.ndarray, signs: np.ndarray, alpha: int
) -> np.ndarray:
  """Child of each support edge: whole clauses per child, strongest clauses spread out."""
  detection = np.sum(w_col[clauses] * signs, axis=1)  # [n_clauses]
  ranked = np.argsort(-detection, kind="stable")
  owner_of_var = {}
  for rank, c in enumerate(ranked):
    for v in clauses[c]:
      owner_of_var.setdefault(int(v), rank % alpha)
  owner = np.full(support.size, -1)
  load = np.zeros(alpha, int)
  for i, v in enumerate(support):
    if int(v) in owner_of_var:
      owner[i] = owner_of_var[int(v)]
      load[owner[i]] += 1
  for i in np.flatnonzero(owner < 0):
    owner[i] = int(np.argmin(load))
    load[owner[i]] += 1
  return _fill_empty_children(owner, alpha)


def _fill_empty_children(owner: np.ndarray, alpha: int) -> np.ndarray:
  """Moves edges from the largest child to empty ones so every child has an input."""
  owner = owner.copy()
  for c in range(alpha):
    if not np.any(owner == c):
      largest = np.argmax(np.bincount(owner, minlength=alpha))
      owner[np.flatnonzero(owner == largest)[-1]] = c
  return owner


def _balanced_feature_groups(
    w: np.ndarray, alpha: int, rng: np.random.Generator, iters: int = 25
) -> np.ndarray:
  """Balanced k-means of the rows of the input Gram matrix `w w^T` into alpha groups."""
  gram = w @ w.T
  rows = gram / np.maximum(np.linalg.norm(gram, axis=1, keepdims=True), 1e-12)
  n = rows.shape[0]
  capacity = -(-n // alpha)
  centroids = rows[rng.choice(n, alpha, replace=False)]
  for _ in range(iters):
    dist = np.sum((rows[:, None, :] - centroids[None]) ** 2, axis=-1)  # [n, alpha]
    groups = _capacitated_assign(dist, capacity)
    for c in range(alpha):
      if np.any(groups == c):
        centroids[c] = rows[groups == c].mean(axis=0)
  return groups


def _capacitated_assign(dist: np.ndarray, capacity: int) -> np.ndarray:
  """Greedy assignment by increasing distance, each group holding at most `capacity`."""
  n, k = dist.shape
  groups = np.full(n, -1)
  fill = np.zeros(k, int)
  for flat in np.argsort(dist, axis=None, kind="stable"):
    i, c = divmod(int(flat), k)
    if groups[i] < 0 and fill[c] < capacity:
      groups[i] = c
      fill[c] += 1
  return groups
