"""FPE on Flax models: their params as plain dicts, their apply as a masked `ApplyFn`.

fpe_jax's tree functions (`fpe.expand`, `nn.apply_masks`, `nn.count_nonzero`,
`nn.full_masks`) take a Flax params dict as it is: dense layers are found by path
(`nn.layer_paths`: linen `("Dense_0",)`, NNX `("layers", 0)` or named attributes) and
their leaves may be called `kernel` / `bias` (Flax's `[d_in, d_out]` layout is fpe_jax's).
What is left is the glue of this module:

- `nnx_params` / `nnx_apply` (NNX) and `linen_apply` (linen): the params as a nested dict
  of arrays and a pure `apply_fn(params, x)` over such a dict;
- `masked_apply`: makes that an fpe_jax `ApplyFn(params, masks, x)`, the model run on
  `params * masks`, so off-mask gradients are exactly 0 and `fpe_jax.train` (whose
  `TrainState(masks=...)` re-applies the masks after each update) trains it unchanged;
- `apply_updates`: `optax.apply_updates` then `nn.apply_masks`, for a hand-written loop.

A masked Flax model is thus just its own params with zeros off the masks, run by Flax
itself. An FPE-expanded tree is wider: load it into a Flax model built at the expanded
width (`nnx_apply(wider_model)(expanded_params, x)`).
"""

from collections.abc import Callable

import jax
import optax
from flax import linen, nnx

from fpe_jax import nn, train

FlaxApplyFn = Callable[[dict, jax.Array], jax.Array]  # (params, x) -> y


def nnx_params(model: nnx.Module) -> dict:
  """The `nnx.Param` values of an NNX model as a nested dict of arrays.

  An `nnx.List` of layers gives integer keys: `{"layers": {0: {"kernel", "bias"}, ...}}`.
  """
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def nnx_apply(model: nnx.Module) -> FlaxApplyFn:
  """`apply_fn(params, x)`: the NNX model's forward pass on `params` (`nnx_params`' layout).

  The model's structure (and any non-Param state, e.g. batch statistics, as it is now)
  is fixed by this call; `params` must have the shapes of this model's. Pure: jit, grad
  and vmap it.
  """
  graphdef, _, rest = nnx.split(model, nnx.Param, ...)

  def apply_fn(params: dict, x: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params, rest)(x)

  return apply_fn


def linen_apply(module: linen.Module) -> FlaxApplyFn:
  """`apply_fn(params, x) = module.apply({"params": params}, x)` for a linen module."""
  return lambda params, x: module.apply({"params": params}, x)


def masked_apply(apply_fn: FlaxApplyFn) -> train.ApplyFn:
  """fpe_jax's `apply(params, masks, x)` for a Flax `apply_fn(params, x)`.

  The model runs on `nn.apply_masks(params, masks)`: the output is the Flax model's at
  the masked weights, and the gradient w.r.t. `params` is 0 off the masks, as with
  `nn.apply_mlp`. Use it wherever fpe_jax takes an `apply_fn`
  (`train.supervised_loss`, `train.accuracy`).
  """
  return lambda params, masks, x: apply_fn(nn.apply_masks(params, masks), x)


def apply_updates(params: dict, updates: dict, masks: dict) -> dict:
  """One optax update that keeps off-mask params exactly 0: call it after each step."""
  return nn.apply_masks(optax.apply_updates(params, updates), masks)
