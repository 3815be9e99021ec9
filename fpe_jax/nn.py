"""Masked MLPs as pure functions: params and masks are parallel nested dicts.

A model is `params = {"dense_0": {"w": [d_in, d_out], "b": [d_out]}, "dense_1": ...}` and
a mask tree of the same structure with 0/1 arrays of the same shapes. Masks are data:
they travel beside the params into jitted functions as ordinary arrays, never as static
arguments, and never reach the optimiser.

A weight mask leaf may also be an object with a `.dense` 0/1 array and a
`.matmul(x, w)` method (e.g. `kernels_pallas.block_sparse.BlockSparseMask`): the layer
then multiplies through that kernel, which skips the all-zero blocks of the mask.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Params = dict[str, dict[str, jax.Array]]
Masks = dict[str, dict]
Activation = Callable[[jax.Array], jax.Array]


def layer_name(index: int) -> str:
  return f"dense_{index}"


def layer_names(params: Params) -> list[str]:
  """The layer names of an MLP in forward order (`dense_0`, `dense_1`, ...)."""
  return [layer_name(i) for i in range(len(params))]


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


def dense_mask(mask) -> jax.Array:
  """The 0/1 array of a mask leaf (a plain array, or a kernel mask's `.dense`)."""
  return getattr(mask, "dense", mask)


def masked_matmul(x: jax.Array, w: jax.Array, mask) -> jax.Array:
  """`x @ (w * mask)`; through the mask's own kernel when it carries one."""
  if hasattr(mask, "matmul"):
    return mask.matmul(x, w)
  return x @ (w * mask)


def masked_dense(layer: dict, layer_mask: dict, x: jax.Array) -> jax.Array:
  """One masked affine layer: `x @ (w * mw) + b * mb`, x: [..., d_in] -> [..., d_out]."""
  return masked_matmul(x, layer["w"], layer_mask["w"]) + layer["b"] * layer_mask["b"]


def hidden_activations(
    params: Params, masks: Masks, x: jax.Array, *, activation: Activation = jax.nn.relu
) -> list[jax.Array]:
  """The post-activation output of every hidden layer, x: [..., d_in]."""
  hidden = []
  for name in layer_names(params)[:-1]:
    x = activation(masked_dense(params[name], masks[name], x))
    hidden.append(x)
  return hidden


def apply_mlp(
    params: Params, masks: Masks, x: jax.Array, *, activation: Activation = jax.nn.relu
) -> jax.Array:
  """Logits of a masked MLP, x: [..., d_in] -> [..., d_out] (no output activation)."""
  names = layer_names(params)
  for name in names[:-1]:
    x = activation(masked_dense(params[name], masks[name], x))
  return masked_dense(params[names[-1]], masks[names[-1]], x)


def apply_masks(params: Params, masks: Masks) -> Params:
  """Zeroes every off-mask entry; called after each optimiser update."""
  return {
      name: {leaf: params[name][leaf] * dense_mask(masks[name][leaf]) for leaf in params[name]}
      for name in params
  }


def count_nonzero(params: Params, masks: Masks) -> int:
  """The model's count of non-zero parameters: the size of the masks' support.

  What counts: every weight and every bias entry whose mask is 1. This is the budget
  FPE keeps fixed. It counts the support, not the values: an on-mask parameter that
  happens to be exactly 0.0 (a zero-initialised bias) still costs a stored value and a
  multiply-add in any sparse format, and it is free to move away from 0 in training.
  Off-mask entries are exactly 0.0 in params (see `apply_masks`) and never count.

  Args:
    params: the model.
    masks: the mask tree (same structure and shapes).

  Returns:
    A Python int (computed on the host: this is bookkeeping, not a traced value).
  """
  total = 0
  for name in params:
    for leaf in params[name]:
      mask = np.asarray(dense_mask(masks[name][leaf]))
      if mask.shape != params[name][leaf].shape:
        raise ValueError(
            f"mask of {name}/{leaf} has shape {mask.shape}, param has "
            f"{params[name][leaf].shape}"
        )
      total += int(np.count_nonzero(mask))
  return total
