"""Masked MLPs as pure functions: params and masks are parallel nested dicts.

A model is `params = {"dense_0": {"w": [d_in, d_out], "b": [d_out]}, "dense_1": ...}` and
a mask tree of the same structure with 0/1 arrays of the same shapes. Masks are data:
they travel beside the params into jitted functions as ordinary arrays, never as static
arguments, and never reach the optimiser. The tree helpers (`apply_masks`,
`count_nonzero`, `full_masks`, `layer_paths`) take any nested dict of arrays: a Flax linen
or NNX params dict, with `kernel` / `bias` leaves and named layers, too.

A weight mask leaf (`MaskLeaf`) is a 0/1 array or a
`kernels_pallas.block_sparse.BlockSparseMask`, the host-built block metadata of a fixed
mask (a pytree, so it is vmapped, scanned and jitted like the arrays). Which matmul runs
is the caller's explicit `implementation=` (kernels_pallas.implementations): "xla" is
`x @ (w * mask)` for either leaf; "pallas" multiplies through the block-sparse kernel,
which skips the mask's all-zero blocks, and needs BlockSparseMask leaves; "auto" (the
default) is "pallas" for BlockSparseMask leaves on TPU / GPU and "xla" otherwise.
"""

import re
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import implementations
from kernels_pallas.block_sparse import BlockSparseMask, block_sparse_matmul

Params = dict[str, dict[str, jax.Array]]
Masks = dict[str, dict]
Activation = Callable[[jax.Array], jax.Array]
MaskLeaf = jax.Array | BlockSparseMask  # a weight mask: 0/1 array or kernel block metadata
# Keys from the root of a params tree to one dense layer's dict: ("dense_0",) here,
# ("Dense_0",) in a Flax linen MLP, ("layers", 0) in an NNX MLP's pure dict.
LayerPath = tuple[str | int, ...]
WEIGHT_NAMES = ("w", "kernel")  # fpe_jax's own leaf names, then Flax's
BIAS_NAMES = ("b", "bias")


def layer_name(index: int) -> str:
  """The name of dense layer `index` in `init_mlp`'s layout."""
  return f"dense_{index}"


def layer_names(params: Params) -> list[str]:
  """The layer names of an MLP in forward order (`dense_0`, `dense_1`, ...)."""
  return [layer_name(i) for i in range(len(params))]


def layer_paths(params: Mapping) -> list[LayerPath]:
  """The dense layers of a params tree in forward order, as paths from its root.

  A dense layer is a dict holding a 2-D weight `w` (fpe_jax) or `kernel` (Flax), and
  optionally a bias `b` / `bias`. `init_mlp`'s layout gives `[("dense_0",), ...]`, a Flax
  linen MLP's `variables["params"]` `[("Dense_0",), ("Dense_1",), ...]`, an NNX MLP with
  an `nnx.List` of `nnx.Linear` (`nnx.to_pure_dict(nnx.state(model, nnx.Param))`)
  `[("layers", 0), ("layers", 1), ...]`. Paths are put in natural order (`Dense_2` before
  `Dense_10`, integers numerically); a tree whose names do not sort in forward order
  needs its layers named explicitly (`fpe.expand(..., layer_paths=...)`).

  Raises:
    ValueError: if there is no dense layer, or consecutive layers do not chain
      (`d_out` of one is not `d_in` of the next).
  """
  found = sorted(_find_layers(params, ()), key=_natural_key)
  if not found:
    raise ValueError(f"params holds no dense layer (a dict with a 2-D {WEIGHT_NAMES} leaf)")
  for first, second in zip(found[:-1], found[1:], strict=True):
    d_out = get_layer(params, first)[weight_key(get_layer(params, first))].shape[1]
    d_in = get_layer(params, second)[weight_key(get_layer(params, second))].shape[0]
    if d_out != d_in:
      raise ValueError(
          f"layers {format_path(first)} (d_out {d_out}) and {format_path(second)} (d_in "
          f"{d_in}) do not chain: name the layers in forward order (layer_paths=...)")
  return found


def as_layer_path(layer: str | int | Sequence[str | int]) -> LayerPath:
  """A layer's path from a top-level name (`"dense_0"`) or a path (`("layers", 0)`)."""
  return (layer,) if isinstance(layer, str | int) else tuple(layer)


def format_path(path: LayerPath) -> str:
  """`("layers", 0, "kernel")` -> `"layers/0/kernel"`."""
  return "/".join(map(str, path))


def get_layer(tree: Mapping, path: LayerPath):
  """The subtree of `tree` at `path` (a layer's dict of params or masks)."""
  for key in path:
    tree = tree[key]
  return tree


def set_layer(tree: Mapping, path: LayerPath, value) -> dict:
  """A copy of `tree` with the subtree at `path` replaced; everything else is shared."""
  if not path:
    return value
  return {**tree, path[0]: set_layer(tree[path[0]], path[1:], value)}


def weight_key(layer: Mapping) -> str:
  """The name of a dense layer's weight leaf: `w` or `kernel`."""
  for name in WEIGHT_NAMES:
    if name in layer:
      return name
  raise ValueError(f"a dense layer needs a weight leaf named one of {WEIGHT_NAMES}, got "
                   f"{sorted(map(str, layer))}")


def bias_key(layer: Mapping) -> str | None:
  """The name of a dense layer's bias leaf (`b` or `bias`), None if it has none."""
  return next((name for name in BIAS_NAMES if name in layer), None)


def _find_layers(tree, path: LayerPath):
  if not isinstance(tree, Mapping):
    return
  weight = next((tree[n] for n in WEIGHT_NAMES if n in tree), None)
  if weight is not None and not isinstance(weight, Mapping) and np.ndim(weight) == 2:
    yield path
    return
  for key, subtree in tree.items():
    yield from _find_layers(subtree, (*path, key))


def _natural_key(path: LayerPath) -> tuple:
  """Sort key: integers, and digit runs inside names, compare as numbers."""
  parts = []
  for key in path:
    pieces = [key] if isinstance(key, int) else re.split(r"(\d+)", key)
    parts.append(tuple((1, int(p)) if isinstance(p, int) or p.isdigit() else (0, p)
                       for p in pieces))
  return tuple(parts)


def init_mlp(key: jax.Array, sizes: Sequence[int]) -> Params:
  """He-normal weights and zero biases for an MLP with layer widths `sizes`.

  Args:
    key: PRNG key.
    sizes: `[d_in, h_1, ..., h_L, d_out]`, at least two entries, all >= 1.

  Returns:
    `{"dense_i": {"w": [sizes[i], sizes[i+1]], "b": [sizes[i+1]]}}`.
  """
  if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
    raise ValueError(f"sizes must list >= 2 positive widths [d_in, ..., d_out], got {sizes}")
  keys = jax.random.split(key, len(sizes) - 1)
  init = jax.nn.initializers.he_normal()
  return {
      layer_name(i): {
          "w": init(k, (d_in, d_out), jnp.float32),
          "b": jnp.zeros((d_out,), jnp.float32),
      }
      for i, (k, d_in, d_out) in enumerate(zip(keys, sizes[:-1], sizes[1:], strict=True))
  }


def full_masks(params: Params) -> Masks:
  """All-ones masks: a dense model."""
  return jax.tree.map(jnp.ones_like, params)


def dense_mask(mask: MaskLeaf) -> jax.Array:
  """The 0/1 array of a mask leaf: the array itself, or a BlockSparseMask's `dense`."""
  return mask.dense if isinstance(mask, BlockSparseMask) else mask


def masked_matmul(x: jax.Array, w: jax.Array, mask: MaskLeaf, *,
                  implementation: implementations.Implementation = "auto") -> jax.Array:
  """`x @ (w * mask)`: x [..., d_in], w [d_in, d_out] -> [..., d_out].

  Args:
    x: [..., d_in] inputs.
    w: [d_in, d_out] weights.
    mask: [d_in, d_out] 0/1 array, or a BlockSparseMask of that shape.
    implementation: one of kernels_pallas.implementations.IMPLEMENTATIONS: "xla" is the
      dense product (bit-identical for either leaf), "pallas" the block-sparse kernel
      (needs a BlockSparseMask), "auto" the kernel on TPU / GPU when it has one.
  """
  kernel = isinstance(mask, BlockSparseMask)
  if implementations.resolve_implementation(implementation, has_kernel_mask=kernel) == "pallas":
    return block_sparse_matmul(x, w, mask, implementation="pallas")
  return x @ (w * dense_mask(mask))


def masked_dense(layer: dict, layer_mask: dict, x: jax.Array, *,
                 implementation: implementations.Implementation = "auto") -> jax.Array:
  """One masked affine layer: `x @ (w * mw) + b * mb`, x: [..., d_in] -> [..., d_out].

  `implementation` picks the weight matmul, as in `masked_matmul`.
  """
  y = masked_matmul(x, layer["w"], layer_mask["w"], implementation=implementation)
  return y + layer["b"] * layer_mask["b"]


def hidden_activations(
    params: Params, masks: Masks, x: jax.Array, *, activation: Activation = jax.nn.relu,
    implementation: implementations.Implementation = "auto",
) -> list[jax.Array]:
  """The post-activation output of every hidden layer, x: [..., d_in].

  `implementation` picks every layer's weight matmul, as in `masked_matmul`.
  """
  hidden = []
  for name in layer_names(params)[:-1]:
    x = activation(masked_dense(params[name], masks[name], x, implementation=implementation))
    hidden.append(x)
  return hidden


def apply_mlp(
    params: Params, masks: Masks, x: jax.Array, *, activation: Activation = jax.nn.relu,
    implementation: implementations.Implementation = "auto",
) -> jax.Array:
  """Logits of a masked MLP, x: [..., d_in] -> [..., d_out] (no output activation).

  `implementation` picks every layer's weight matmul, as in `masked_matmul`; with
  "pallas" every weight mask must be a BlockSparseMask (run-stacked ones are vmapped
  with the params).
  """
  names = layer_names(params)
  for name in names[:-1]:
    x = activation(masked_dense(params[name], masks[name], x, implementation=implementation))
  return masked_dense(params[names[-1]], masks[names[-1]], x, implementation=implementation)


def apply_masks(params: Params, masks: Masks) -> Params:
  """Zeroes every off-mask entry; called after each optimiser update.

  Args:
    params: any nested dict of arrays: `init_mlp`'s layout or a Flax params dict.
    masks: a tree of the same structure, 0/1 arrays (or kernel masks) of the same shapes.

  Returns:
    `params * masks` leaf by leaf, as nested dicts of the same keys.
  """
  if isinstance(params, Mapping):
    return {key: apply_masks(value, masks[key]) for key, value in params.items()}
  return params * dense_mask(masks)


def count_nonzero(params: Params, masks: Masks) -> int:
  """The model's count of non-zero parameters: the size of the masks' support.

  What counts: every weight and every bias entry whose mask is 1. This is the budget
  FPE keeps fixed. It counts the support, not the values: an on-mask parameter that
  happens to be exactly 0.0 (a zero-initialised bias) still costs a stored value and a
  multiply-add in any sparse format, and it is free to move away from 0 in training.
  Off-mask entries are exactly 0.0 in params (see `apply_masks`) and never count.

  Args:
    params: the model: any nested dict of arrays (`init_mlp`'s layout, a Flax params dict).
    masks: the mask tree (same structure and shapes).

  Returns:
    A Python int (computed on the host: this is bookkeeping, not a traced value).
  """
  total = 0
  for path, param in _leaves(params, ()):
    mask = np.asarray(dense_mask(get_layer(masks, path)))
    if mask.shape != param.shape:
      raise ValueError(
          f"mask of {format_path(path)} has shape {mask.shape}, param has {param.shape}")
    total += int(np.count_nonzero(mask))
  return total


def _leaves(tree, path: LayerPath):
  """(path, leaf) of every array of a nested dict, in its keys' order."""
  if not isinstance(tree, Mapping):
    yield path, tree
    return
  for key, subtree in tree.items():
    yield from _leaves(subtree, (*path, key))
