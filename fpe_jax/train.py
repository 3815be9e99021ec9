"""Pure training-step builders: optax updates that keep off-mask weights exactly zero.

A run's state is a `TrainState` of arrays; a training program is `steps` optimiser steps
rolled into one `lax.scan`, so a jitted call does a whole chunk of training between two
checkpoints. Runs of equal shapes (seeds, sweep points, FPE arms) are batched by
`jax.vmap` over a leading run axis of every argument: one compiled program trains them
all. Minibatches are drawn inside the program from the run's training set with a key
folded from the step number, so training is a pure function of (state, data, key) and a
run resumed from a checkpoint takes exactly the steps an uninterrupted one would.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fpe_jax import nn

ApplyFn = Callable[[nn.Params, nn.Masks, jax.Array], jax.Array]
LossFn = Callable[[jax.Array, jax.Array], jax.Array]

OPTIMIZERS = ("adam", "adamw", "sgd")


class TrainState(NamedTuple):
  params: nn.Params
  masks: nn.Masks
  opt_state: optax.OptState
  step: jax.Array  # int32 scalar: optimiser steps taken in this phase


def make_optimizer(name: str, learning_rate: float) -> optax.GradientTransformation:
  """An optax optimiser by name (`OPTIMIZERS`)."""
  if name not in OPTIMIZERS:
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
  if learning_rate <= 0:
    raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
  return {"adam": optax.adam, "adamw": optax.adamw, "sgd": optax.sgd}[name](learning_rate)


def init_state(
    params: nn.Params, masks: nn.Masks, optimizer: optax.GradientTransformation
) -> TrainState:
  params = nn.apply_masks(params, masks)
  return TrainState(params, masks, optimizer.init(params), jnp.zeros((), jnp.int32))


def sigmoid_bce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean binary cross-entropy, logits: [n, 1] or [n], labels: [n] in {0, 1}."""
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits.reshape(labels.shape),
                                                     labels.astype(logits.dtype)))


def softmax_ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy, logits: [n, classes], labels: [n] int."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def predictions(logits: jax.Array) -> jax.Array:
  """Class predictions: a single logit is a sigmoid classifier (> 0 is class 1)."""
  if logits.shape[-1] == 1:
    return (logits[..., 0] > 0).astype(jnp.int32)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def accuracy(apply_fn: ApplyFn, params: nn.Params, masks: nn.Masks, x: jax.Array,
             y: jax.Array) -> jax.Array:
  """Fraction of `x: [n, ...]` classified as `y: [n]`."""
  return jnp.mean(predictions(apply_fn(params, masks, x)) == y)


def make_train_chunk(
    apply_fn: ApplyFn,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    steps: int,
    batch_sharding: jax.sharding.Sharding | None = None,
) -> Callable[[TrainState, jax.Array, jax.Array, jax.Array], tuple[TrainState, jax.Array]]:
  """Builds `train_chunk(state, x, y, key) -> (state, mean_loss)`: `steps` optimiser steps.

  Args:
    apply_fn: `apply(params, masks, x) -> logits`.
    loss_fn: `loss(logits, labels) -> scalar`.
    optimizer: an optax transformation.
    batch_size: examples per step, drawn uniformly with replacement from `x`.
    steps: steps per call (the chunk between two checkpoints).
    batch_sharding: if given, each minibatch is constrained to this sharding (the `data`
      axis of a mesh): XLA then splits the batch over devices and all-reduces the
      gradients. Params stay replicated.

  Returns:
    An unjitted pure function; jit it, or vmap it over a leading run axis first.
    `x: [n, ...]`, `y: [n]`, `key`: the run's training key (minibatch t uses
    `fold_in(key, state.step)`).
  """
  if batch_size < 1 or steps < 1:
    raise ValueError(f"batch_size and steps must be >= 1, got {batch_size}, {steps}")

  def loss_of(params, masks, xb, yb):
    return loss_fn(apply_fn(params, masks, xb), yb)

  def one_step(state: TrainState, x, y, idx):
    # Indices are in range by construction: "clip" skips the bounds handling of x[idx],
    # which costs more than the model itself under vmap on CPU.
    xb = jnp.take(x, idx, axis=0, mode="clip")
    yb = jnp.take(y, idx, axis=0, mode="clip")
    if batch_sharding is not None:
      xb = jax.lax.with_sharding_constraint(xb, batch_sharding)
    loss, grads = jax.value_and_grad(loss_of)(state.params, state.masks, xb, yb)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = nn.apply_masks(optax.apply_updates(state.params, updates), state.masks)
    return TrainState(params, state.masks, opt_state, state.step + 1), loss

  def train_chunk(state: TrainState, x, y, key):
    # All minibatch indices of the chunk at once (one vectorised draw instead of one small
    # draw per step); minibatch t is still drawn from fold_in(key, t).
    step_ids = state.step + jnp.arange(steps)
    draw = lambda t: jax.random.randint(jax.random.fold_in(key, t), (batch_size,), 0, x.shape[0])
    batch_indices = jax.vmap(draw)(step_ids)
    state, losses = jax.lax.scan(lambda s, idx: one_step(s, x, y, idx), state, batch_indices)
    return state, jnp.mean(losses)

  return train_chunk
