"""The one training core: a `TrainState`, optimisers, loss functions and the chunk builder.

Every binary that trains (Boolean, real-data FPE, ensembles) goes through
`make_train_chunk`: `steps` optimiser steps rolled into one `lax.scan`, so a jitted call
does a whole chunk of training between two checkpoints. What differs between the
binaries is only the loss function (`LossFn`): a supervised loss of a masked model
(`supervised_loss`), the same under DropConnect (`dropconnect_loss`), or an ensemble
loss with input gradients (`fpe_jax.ensemble.make_loss`).

Runs of equal shapes (seeds, sweep points, FPE arms) are batched by `jax.vmap` over a
leading run axis of every argument: one compiled program trains them all. Minibatches
are drawn inside the program from the run's training set, minibatch t with
`fold_in(key, t)` (`step_key`), so training is a pure function of (state, data, key)
and a run resumed from a checkpoint takes exactly the steps an uninterrupted one would.

PRNG streams, by name: `step_key(key, t) = fold_in(key, t)` draws minibatch t's indices
(`randint(step_key, (batch_size,), 0, n)`); the loss gets the same `step_key` for any
randomness of its own and must fold in a constant of its own first (DropConnect uses
`fold_in(step_key, 1)`), so its stream never coincides with the minibatch stream.
A loss with a schedule of its own (TRS's attack radius, `fpe_jax.ensemble`) also takes the
index of the step being taken: `make_train_chunk(..., with_step=True)` passes it.
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fpe_jax import nn

ApplyFn = Callable[[nn.Params, nn.Masks, jax.Array], jax.Array]
Objective = Callable[[jax.Array, jax.Array], jax.Array]  # (logits, labels) -> scalar
Metrics = dict[str, jax.Array]
# loss_fn(params, masks, x_batch, y_batch, step_key, *loss_args) -> (loss, metrics), or
# loss_fn(params, masks, x_batch, y_batch, step_key, step, *loss_args) for a chunk built
# with_step; metrics include "loss" (the phase loop checks it is finite, logs every metric).
LossFn = Callable[..., tuple[jax.Array, Metrics]]
TrainChunk = Callable[..., tuple["TrainState", Metrics]]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "step")


class TrainState(NamedTuple):
  """What a run carries between steps (and into a checkpoint).

  Attributes:
    params: the model's parameters (any pytree).
    opt_state: the optimiser state that mirrors them.
    step: int32 scalar, optimiser steps taken (minibatch t is drawn from
      `step_key(key, t)`); a phase may start at a non-zero step.
    masks: fixed 0/1 masks mirroring `params`, re-applied after every update so off-mask
      parameters stay exactly 0; None trains every parameter.
  """
  params: Any
  opt_state: optax.OptState
  step: jax.Array
  masks: Any = None


def init_state(params, optimizer: optax.GradientTransformation, masks=None, *,
               step: int = 0) -> TrainState:
  """A fresh optimiser state at `step`; with `masks`, the params are masked first."""
  if masks is not None:
    params = nn.apply_masks(params, masks)
  return TrainState(params=params, opt_state=optimizer.init(params),
                    step=jnp.asarray(step, jnp.int32), masks=masks)


# ------------------------------------------------------------------------ optimisers


def make_schedule(kind: str, learning_rate: float, *, total_steps: int = 0,
                  boundaries: Sequence[int] = (), decay_factor: float = 0.1):
  """A learning rate or optax schedule of the optimiser's step count.

  Args:
    kind: one of `SCHEDULES`: "constant" (the float itself), "cosine" (cosine decay from
      `learning_rate` to 0 over `total_steps`), "step" (multiplied by `decay_factor` at
      each of `boundaries`, the peers' step decay).
    learning_rate: the initial rate, > 0.
    total_steps: for "cosine", the steps over which it decays (>= 1).
    boundaries: for "step", increasing step counts.
    decay_factor: for "step", in (0, 1].
  """
  if kind not in SCHEDULES:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
  if not learning_rate > 0 or learning_rate == float("inf"):
    raise ValueError(f"learning_rate must be a finite number > 0, got {learning_rate}")
  if kind == "constant":
    return learning_rate
  if kind == "cosine":
    if total_steps < 1:
      raise ValueError(f"total_steps must be >= 1 for a cosine schedule, got {total_steps}")
    return optax.cosine_decay_schedule(learning_rate, total_steps)
  if list(boundaries) != sorted(set(boundaries)) or any(b < 1 for b in boundaries):
    raise ValueError(f"boundaries must be increasing step counts >= 1, got {boundaries}")
  if not 0 < decay_factor <= 1:
    raise ValueError(f"decay_factor must be in (0, 1], got {decay_factor}")
  return optax.piecewise_constant_schedule(learning_rate,
                                           {int(b): decay_factor for b in boundaries})


def make_optimizer(name: str, learning_rate, *, weight_decay: float = 0.0,
                   momentum: float = 0.0) -> optax.GradientTransformation:
  """An optax optimiser by name (`OPTIMIZERS`).

  Args:
    name: "adam", "adamw" or "sgd".
    learning_rate: a float > 0 or a schedule (`make_schedule`).
    weight_decay: >= 0. For "adam" and "sgd" it is an L2 term added to the gradient
      before the update (torch's `weight_decay`, what the peers' code uses); for "adamw"
      it is decoupled (Loshchilov & Hutter). 0 leaves the optimiser exactly optax's.
    momentum: SGD momentum in [0, 1) (0: plain SGD).
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
  if not callable(learning_rate) and not learning_rate > 0:
    raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
  if not 0 <= weight_decay < float("inf"):
    raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
  if not 0 <= momentum < 1:
    raise ValueError(f"momentum must be in [0, 1), got {momentum}")
  if name == "adamw":
    return optax.adamw(learning_rate, weight_decay=weight_decay)
  base = (optax.adam(learning_rate) if name == "adam"
          else optax.sgd(learning_rate, momentum=momentum or None))
  if weight_decay == 0:
    return base
  return optax.chain(optax.add_decayed_weights(weight_decay), base)


# ---------------------------------------------------------------------------- losses


def sigmoid_bce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean binary cross-entropy, logits: [n, 1] or [n], labels: [n] in {0, 1}."""
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits.reshape(labels.shape),
                                                     labels.astype(logits.dtype)))


def softmax_ce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy, logits: [n, classes], labels: [n] int."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def supervised_loss(apply_fn: ApplyFn, objective: Objective) -> LossFn:
  """`objective(apply_fn(params, masks, x), y)` as a `LossFn`; metrics: {"loss"}."""

  def loss_fn(params, masks, x, y, step_key):
    del step_key  # deterministic
    loss = objective(apply_fn(params, masks, x), y)
    return loss, {"loss": loss}

  return loss_fn


def dropconnect_loss(apply_fn: ApplyFn, objective: Objective, layers: Sequence[str]) -> LossFn:
  """A supervised loss under inverted DropConnect on the weights of `layers`.

  `loss_fn(params, masks, x, y, step_key, keep)`: each weight of each layer in `layers`
  is multiplied by Bernoulli(keep) / keep, drawn from `fold_in(step_key, 1)` split over
  the layers; `keep` may be a traced per-run scalar (vmapped); keep=1 is plain training.
  Off-mask weights stay masked (the draw multiplies the fixed mask).
  """

  def loss_fn(params, masks, x, y, step_key, keep):
    drop_keys = jax.random.split(jax.random.fold_in(step_key, 1), len(layers))
    dropped = dict(masks)
    for name, key in zip(layers, drop_keys, strict=True):
      w_mask = nn.dense_mask(masks[name]["w"])
      kept = jax.random.bernoulli(key, keep, w_mask.shape).astype(w_mask.dtype)
      dropped[name] = {**masks[name], "w": w_mask * kept / keep}
    loss = objective(apply_fn(params, dropped, x), y)
    return loss, {"loss": loss}

  return loss_fn


def predictions(logits: jax.Array) -> jax.Array:
  """Class predictions: a single logit is a sigmoid classifier (> 0 is class 1)."""
  if logits.shape[-1] == 1:
    return (logits[..., 0] > 0).astype(jnp.int32)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def accuracy(apply_fn: ApplyFn, params: nn.Params, masks: nn.Masks, x: jax.Array,
             y: jax.Array) -> jax.Array:
  """Fraction of `x: [n, ...]` classified as `y: [n]`."""
  return jnp.mean(predictions(apply_fn(params, masks, x)) == y)


# ----------------------------------------------------------------------------- chunk


def step_key(key: jax.Array, step: jax.Array) -> jax.Array:
  """The key of optimiser step `step` of a run: its minibatch and its loss's randomness."""
  return jax.random.fold_in(key, step)


def make_train_chunk(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    batch_size: int,
    steps: int,
    batch_sharding: jax.sharding.Sharding | None = None,
    with_step: bool = False,
) -> TrainChunk:
  """Builds `train_chunk(state, x, y, key, *loss_args) -> (state, metrics)`.

  Args:
    loss_fn: `loss_fn(params, masks, x_batch, y_batch, step_key, *loss_args) ->
      (loss, metrics)`; differentiated w.r.t. params (through any input gradients it
      takes: double backprop).
    optimizer: an optax transformation (`make_optimizer`).
    batch_size: examples per step, drawn uniformly with replacement from `x`.
    steps: steps per call (the chunk between two checkpoints).
    batch_sharding: if given, each minibatch is constrained to this sharding (the `data`
      axis of a mesh, `sharding.batch_sharding`): XLA splits the batch over devices and
      all-reduces the gradients.
    with_step: pass the loss the index of the step being taken (int32 scalar, the state's
      `step` before the update) after `step_key`, for a loss with a schedule of its own.

  Returns:
    An unjitted pure function; jit it (donating the state), or vmap it over a leading
    run axis first. `x: [n, ...]`, `y: [n]`, `key`: the run's training key. `metrics`
    are the loss's metrics averaged over the chunk's steps.
  """
  if batch_size < 1 or steps < 1:
    raise ValueError(f"batch_size and steps must be >= 1, got {batch_size}, {steps}")
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def one_step(state: TrainState, x, y, idx, key, loss_args):
    # Indices are in range by construction: "clip" skips the bounds handling of x[idx],
    # which costs more than the model itself under vmap on CPU.
    xb = jnp.take(x, idx, axis=0, mode="clip")
    yb = jnp.take(y, idx, axis=0, mode="clip")
    if batch_sharding is not None:
      xb = jax.lax.with_sharding_constraint(xb, batch_sharding)
    step_args = (state.step,) if with_step else ()
    (_, metrics), grads = grad_fn(state.params, state.masks, xb, yb, key, *step_args,
                                  *loss_args)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if state.masks is not None:
      params = nn.apply_masks(params, state.masks)
    return state._replace(params=params, opt_state=opt_state, step=state.step + 1), metrics

  def train_chunk(state: TrainState, x, y, key, *loss_args):
    # All minibatch indices of the chunk at once (one vectorised draw instead of one small
    # draw per step); minibatch t is still drawn from step_key(key, t).
    keys = jax.vmap(lambda t: step_key(key, t))(state.step + jnp.arange(steps))
    batch_indices = jax.vmap(lambda k: jax.random.randint(k, (batch_size,), 0, x.shape[0]))(keys)
    state, metrics = jax.lax.scan(
        lambda s, xs: one_step(s, x, y, *xs, loss_args), state, (batch_indices, keys))
    return state, jax.tree.map(jnp.mean, metrics)

  return train_chunk
