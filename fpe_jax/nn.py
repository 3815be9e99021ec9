"""Masked MLPs as pure functions: params and masks are parallel nested dicts.

A model is `params = {"dense_0": {"w": [d_in, d_out], "b": [d_out]}, "dense_1": ...}` and
a mask tree of the same structure with 0/1 arrays of the same shapes. Masks are data:
they travel beside the params into jitted functions as ordinary arrays, never as static
arguments, and never reach the optimiser.

A weight mask leaf (`MaskLeaf`) is a 0/1 array or a
`kernels_pallas.block_sparse.BlockSparseMask`, the host-built block metadata of a fixed
mask (a pytree, so it is vmapped, scanned and jitted like the arrays). Which matmul runs
is the caller's explicit `implementation=` (kernels_pallas.implementations): "xla" is
`x @ (w * mask)` for either leaf; "pallas" multiplies through the block-sparse kernel,
which skips the mask's all-zero blocks, and needs BlockSparseMask leaves; "auto" (the
default) is "pallas" for BlockSparseMask leaves on TPU / GPU and "xla" otherwise.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import implementations
from kernels_pallas.block_sparse import BlockSparseMask, block_sparse_matmul

Params = dict[str, dict[str, jax.Array]]
Masks = dict[str, dict]
Activation = Callable[[jax.Array], jax.Array]
MaskLeaf = jax.Array | BlockSparseMask  # a weight mask: 0/1 array or kernel block metadata


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
