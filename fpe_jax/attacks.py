"""L_inf adversarial attacks on (ensembles of) classifiers, and gradient-masking checks.

Everything works in pixel space: inputs x in [0, 1], perturbations in the eps ball
||x_adv - x||_inf <= eps intersected with the [0, 1] box.

An attack maximises an *objective* `(x [B, ...], labels [B]) -> [B]` per-example loss;
success is judged by a *predictor* `x -> [B, C]` scores (argmax = prediction). Keeping the
two apart lets one attack an ensemble through a surrogate of its output (mean logits, the
max over members' losses, one member) and judge it on the ensemble itself, and lets a
black-box attack be crafted on a surrogate ensemble and judged on the target.

- `fgsm`: one signed-gradient step of size eps.
- `pgd`: L_inf PGD (Madry et al.), uniform random start, projection after every step, with
  a step-size schedule (`PGD_SCHEDULES`): "apgd" (the default; `apgd`, Croce & Hein 2020:
  momentum, a step that halves at checkpoints where progress stalls, restarts from the best
  point, which it returns) or "fixed" (signed steps of one size, default eps / 5; the last
  iterate). A fixed step plateaus: its iterates lie on a grid of the step's size and cannot
  approach a maximiser between grid points however many steps it takes.
- `mim`: momentum iterative method (Dong et al. 2018), L1-normalised gradients, decay mu.
- `objective_table`: every (target, attack loss) objective of an ensemble from one pass of
  its members; `select_objective` picks one row by a (traced) index, so one compiled
  attack serves every choice.
- `robust_mask`: a point is robust only if it is classified correctly on the clean input
  and after every restart (independent random starts); the restart count may be traced.
- `transfer_counts`: PGD on member i, judged on every member j and on the ensemble, over the
  points every member classifies correctly.
- `gradient_masking_checks`: Carlini et al. (2019)'s sanity checks as named booleans.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fpe_jax import ensemble

Params = Any
MemberApplyFn = ensemble.MemberApplyFn  # one member's (params, x) -> logits
# (x [B, ...], labels [B]) -> [B] per-example losses to maximise (not train.Objective).
AttackObjective = Callable[[jax.Array, jax.Array], jax.Array]
Predictor = Callable[[jax.Array], jax.Array]
AttackFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

ATTACKS = ("fgsm", "pgd", "mim")
ATTACK_LOSSES = ("ce", "margin")
# "member" also needs a member index.
TARGETS = ("ensemble", "mean_logits", "max_member", "member")
PGD_SCHEDULES = ("apgd", "fixed")
DEFAULT_PGD_SCHEDULE = "apgd"
# The step (APGD: the first step) as a fraction of eps, unless given: APGD's 2 eps (Croce &
# Hein 2020; its halvings bring it down), the peers' fixed eps / 5.
DEFAULT_STEP_FRACTIONS = {"apgd": 2.0, "fixed": 0.2}
# APGD's constants, the official code's (fra31/auto-attack, autopgd_base.py): the weight of
# the gradient step against the previous move, and the share of a checkpoint window's steps
# that must raise the objective for the step size to stay (as the integers 3 / 4, so that
# the comparison is exact).
APGD_MOMENTUM = 0.75
APGD_RHO = (3, 4)


def validate(*, eps: float | None = None, attack: str | None = None, loss: str | None = None,
             target: str | None = None, steps: int | None = None,
             restarts: int | None = None, schedule: str | None = None) -> None:
  """Raises a one-line ValueError naming the first invalid argument given.

  Traced values (eps, steps or restarts inside jit) are not checked: their value is unknown
  at trace time.
  """
  if isinstance(eps, int | float) and not eps >= 0:
    raise ValueError(f"eps={eps} must be >= 0")
  if attack is not None and attack not in ATTACKS:
    raise ValueError(f"attack={attack!r} is not one of {list(ATTACKS)}")
  if loss is not None and loss not in ATTACK_LOSSES:
    raise ValueError(f"attack loss={loss!r} is not one of {list(ATTACK_LOSSES)}")
  if target is not None and target not in TARGETS:
    raise ValueError(f"target={target!r} is not one of {list(TARGETS)}")
  if isinstance(steps, int) and steps < 1:
    raise ValueError(f"steps={steps} must be >= 1")
  if isinstance(restarts, int) and restarts < 1:
    raise ValueError(f"restarts={restarts} must be >= 1")
  if schedule is not None and schedule not in PGD_SCHEDULES:
    raise ValueError(f"schedule={schedule!r} is not one of {list(PGD_SCHEDULES)}")


# --------------------------------------------------------------------------- objectives


def attack_loss(scores: jax.Array, labels: jax.Array, loss: str = "ce") -> jax.Array:
  """Per-example loss an attacker maximises.

  Args:
    scores: [B, C] logits or log-probabilities.
    labels: [B] true labels.
    loss: "ce" (softmax cross-entropy of the scores) or "margin" (Carlini-Wagner:
      max_{k != y} s_k - s_y; positive means misclassified).

  Returns:
    [B] losses.
  """
  if loss == "ce":
    return ensemble.cross_entropy(scores, labels)
  if loss == "margin":
    true_mask = jax.nn.one_hot(labels, scores.shape[-1], dtype=bool)
    true_score = jnp.sum(jnp.where(true_mask, scores, 0.0), axis=-1)
    other_best = jnp.max(jnp.where(true_mask, -jnp.inf, scores), axis=-1)
    return other_best - true_score
  raise ValueError(f"attack loss={loss!r} is not one of {list(ATTACK_LOSSES)}")


class ObjectiveChoice(NamedTuple):
  """One way to attack a stacked ensemble: an output of it and a loss on that output.

  Attributes:
    target: one of TARGETS: "ensemble" (log of the mean softmax), "mean_logits",
      "max_member" (per example, the largest of the members' losses) or "member".
    loss: one of ATTACK_LOSSES, "ce" or "margin".
    member: the attacked member's index when target == "member", else None.
  """
  target: str = "ensemble"
  loss: str = "ce"
  member: int | None = None

  @property
  def target_label(self) -> str:
    """The target's name, "member<i>" for member i."""
    return f"member{self.member}" if self.target == "member" else self.target

  @property
  def label(self) -> str:
    """The choice's name, "<target_label>/<loss>"."""
    return f"{self.target_label}/{self.loss}"


def objective_table(apply_fn: MemberApplyFn, stacked: Params, choices: Sequence[ObjectiveChoice],
                    member_map: str = "vmap") -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Every objective in `choices` from one forward pass of the members.

  Args:
    apply_fn: one member's (params, x) -> logits.
    stacked: member params, leaves [M, ...].
    choices: K (target, loss, member) choices (`ObjectiveChoice`).
    member_map: "vmap" or "unroll" (see `ensemble.map_members`).

  Returns:
    (x [B, ...], labels [B]) -> [K, B] losses, row k that of choices[k].
  """
  if not choices:
    raise ValueError("choices must name at least one (target, loss) objective")
  count = ensemble.num_members(stacked)
  for choice in choices:
    validate(target=choice.target, loss=choice.loss)
    if choice.target == "member" and (choice.member is None or not 0 <= choice.member < count):
      raise ValueError(f"member={choice.member} must be an index in [0, {count}) for "
                       "target='member'")

  def table(x, labels):
    logits = ensemble.member_logits(apply_fn, stacked, x, member_map)
    outputs = {"ensemble": ensemble.combine_logits(logits, "log_mean_prob"),
               "mean_logits": ensemble.combine_logits(logits, "mean_logits")}
    rows = []
    for choice in choices:
      if choice.target == "max_member":
        per_member = jax.vmap(attack_loss, in_axes=(0, None, None))(logits, labels, choice.loss)
        rows.append(jnp.max(per_member, axis=0))
      elif choice.target == "member":
        rows.append(attack_loss(logits[choice.member], labels, choice.loss))
      else:
        rows.append(attack_loss(outputs[choice.target], labels, choice.loss))
    return jnp.stack(rows)

  return table


def select_objective(table: Callable[[jax.Array, jax.Array], jax.Array],
                     choice: int | jax.Array) -> AttackObjective:
  """Row `choice` of an `objective_table` as one objective.

  `choice` may be traced: one compiled attack then serves every row (the other rows are
  computed too, but their gradients are zero).
  """
  return lambda x, labels: table(x, labels)[choice]


def ensemble_objective(apply_fn: MemberApplyFn, stacked: Params, target: str = "ensemble",
                       loss: str = "ce", member: int | None = None,
                       member_map: str = "vmap") -> AttackObjective:
  """The objective for attacking a stacked ensemble through one of its outputs.

  Args:
    apply_fn: one member's (params, x) -> logits.
    stacked: member params, leaves [M, ...].
    target: "ensemble", "mean_logits", "max_member" or "member" (see `ObjectiveChoice`).
    loss: "ce" or "margin".
    member: index of the attacked member when target == "member".
    member_map: "vmap" or "unroll" (see `ensemble.map_members`).

  Returns:
    (x [B, ...], labels [B]) -> [B] losses.
  """
  table = objective_table(apply_fn, stacked, [ObjectiveChoice(target, loss, member)],
                          member_map)
  return select_objective(table, 0)


def ensemble_predictor(apply_fn: MemberApplyFn, stacked: Params, combine: str = "log_mean_prob",
                       member_map: str = "vmap") -> Predictor:
  """x [B, ...] -> [B, C] ensemble scores."""
  return lambda x: ensemble.ensemble_logits(apply_fn, stacked, x, combine, member_map)


# --------------------------------------------------------------------------- attacks


def project(x_adv: jax.Array, x: jax.Array, eps: float) -> jax.Array:
  """Projects onto the L_inf ball of radius eps around x, intersected with [0, 1]."""
  return jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)


def input_gradient(objective: AttackObjective, x: jax.Array, labels: jax.Array) -> jax.Array:
  """[B, ...] gradient of each example's objective w.r.t. its own input."""
  return jax.grad(lambda inputs: jnp.sum(objective(inputs, labels)))(x)


def fgsm(objective: AttackObjective, x: jax.Array, labels: jax.Array, eps: float) -> jax.Array:
  """Fast gradient sign method: x + eps * sign(grad), kept in [0, 1].

  Args:
    objective: (x, labels) -> [B] losses to maximise.
    x: [B, ...] clean inputs in [0, 1].
    labels: [B] true labels.
    eps: L_inf radius.

  Returns:
    [B, ...] adversarial inputs.
  """
  return project(x + eps * jnp.sign(input_gradient(objective, x, labels)), x, eps)


def loss_and_gradient(objective: AttackObjective, x: jax.Array,
                      labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """([B] each example's objective, [B, ...] its gradient w.r.t. the example's input)."""
  def total(inputs):
    losses = objective(inputs, labels)
    return jnp.sum(losses), losses

  (_, losses), grad = jax.value_and_grad(total, has_aux=True)(x)
  return losses, grad


def random_start_point(key: jax.Array, x: jax.Array, eps: float) -> jax.Array:
  """A uniform point of the eps ball around x, projected into the box."""
  return project(x + jax.random.uniform(key, x.shape, x.dtype, -eps, eps), x, eps)


def fixed_step_pgd(objective: AttackObjective, x: jax.Array, labels: jax.Array,
                   start: jax.Array, *, eps: float, steps: int,
                   step_size: float) -> jax.Array:
  """`steps` signed-gradient steps of one size from `start`, projected; the last iterate."""
  def body(_, x_adv):
    grad = input_gradient(objective, x_adv, labels)
    return project(x_adv + step_size * jnp.sign(grad), x, eps)

  return jax.lax.fori_loop(0, steps, body, start)


class APGDState(NamedTuple):
  """APGD's iterate, its best point so far and its step-size bookkeeping.

  Attributes:
    iteration: scalar int, steps taken.
    x: [B, ...] the current iterate x^(k).
    x_prev: [B, ...] the iterate it was stepped from, x^(k-1) (the momentum term is
      x^(k) - x^(k-1); after a cut, x^(k) is the best point and x^(k-1) stays).
    loss: [B] the objective at x (after a cut: at the best point).
    grad: [B, ...] its gradient at x.
    step_size: [B] each example's step eta.
    x_best: [B, ...] the iterate of the highest objective so far (the start included).
    loss_best: [B] that objective.
    grad_best: [B, ...] its gradient.
    increases: [B] int, steps of the current window that raised the objective.
    loss_best_at_check: [B] loss_best at the previous checkpoint (the start: its loss).
    cut_at_check: [B] bool, the step was cut at the previous checkpoint (True before the
      first, so that "no progress since" cannot cut there, as in the official code).
    window: scalar int, the current window's length in steps.
    since_check: scalar int, steps since the previous checkpoint.
  """
  iteration: jax.Array
  x: jax.Array
  x_prev: jax.Array
  loss: jax.Array
  grad: jax.Array
  step_size: jax.Array
  x_best: jax.Array
  loss_best: jax.Array
  grad_best: jax.Array
  increases: jax.Array
  loss_best_at_check: jax.Array
  cut_at_check: jax.Array
  window: jax.Array
  since_check: jax.Array


def apgd_windows(steps: int | jax.Array) -> tuple[Any, Any, Any]:
  """APGD's checkpoint windows for a budget of `steps`: (first, decrement, least).

  The first checkpoint comes after `first` steps; each window is `decrement` shorter than
  the one before, never shorter than `least`: the official code's max(int(0.22 N), 1),
  max(int(0.03 N), 1) and max(int(0.06 N), 1) (for small N not the paper's ceil(p_j N),
  which they equal at N = 100), in integer arithmetic: exact whether `steps` is a Python
  int or traced.
  """
  at_least_one = lambda v: jnp.maximum(v, 1) if isinstance(v, jax.Array) else max(v, 1)
  return (at_least_one(22 * steps // 100), at_least_one(3 * steps // 100),
          at_least_one(6 * steps // 100))


def _per_example(values: jax.Array, like: jax.Array) -> jax.Array:
  """[B] values shaped [B, 1, ...] to broadcast against `like` [B, ...]."""
  return values.reshape(values.shape + (1,) * (like.ndim - 1))


def apgd_init(objective: AttackObjective, start: jax.Array, labels: jax.Array, *,
              step_size: float | jax.Array, steps: int | jax.Array) -> APGDState:
  """APGD's state at `start` (one objective and gradient evaluation)."""
  loss, grad = loss_and_gradient(objective, start, labels)
  first_window = apgd_windows(steps)[0]
  return APGDState(
      iteration=jnp.zeros((), jnp.int32), x=start, x_prev=start, loss=loss, grad=grad,
      step_size=jnp.full(loss.shape, step_size, start.dtype), x_best=start, loss_best=loss,
      grad_best=grad, increases=jnp.zeros(loss.shape, jnp.int32), loss_best_at_check=loss,
      cut_at_check=jnp.ones(loss.shape, bool),
      window=jnp.asarray(first_window, jnp.int32), since_check=jnp.zeros((), jnp.int32))


def apgd_update(objective: AttackObjective, state: APGDState, x: jax.Array, labels: jax.Array,
                *, eps: float | jax.Array, steps: int | jax.Array) -> APGDState:
  """One APGD step (Croce & Hein 2020, Algorithm 1, L_inf), then its checkpoint test.

  z = P(x^k + eta sign(g)); x^{k+1} = P(x^k + a (z - x^k) + (1 - a)(x^k - x^{k-1})),
  a = 1 on the first step, APGD_MOMENTUM after; P projects onto the eps ball around the
  clean `x` and the box. When a window of steps ends (`apgd_windows`), an example's step
  halves and it restarts from its best point if at most 3/4 of the window's steps raised
  its objective, or if its step was not cut at the previous checkpoint and its best
  objective has not risen since.
  """
  momentum = jnp.where(state.iteration == 0, 1.0, APGD_MOMENTUM).astype(x.dtype)
  step = _per_example(state.step_size, x)
  towards = project(state.x + step * jnp.sign(state.grad), x, eps)
  moved = project(state.x + momentum * (towards - state.x)
                  + (1 - momentum) * (state.x - state.x_prev), x, eps)
  loss, grad = loss_and_gradient(objective, moved, labels)
  improved = loss > state.loss_best
  keep_best = lambda new, old: jnp.where(_per_example(improved, new), new, old)
  x_best, grad_best = keep_best(moved, state.x_best), keep_best(grad, state.grad_best)
  loss_best = jnp.where(improved, loss, state.loss_best)
  increases = state.increases + (loss > state.loss).astype(jnp.int32)

  since_check = state.since_check + 1
  at_check = since_check == state.window
  rho_num, rho_den = APGD_RHO
  oscillating = rho_den * increases <= rho_num * state.window
  stalled = ~state.cut_at_check & (state.loss_best_at_check >= loss_best)
  cut = at_check & (oscillating | stalled)
  restart = lambda best, current: jnp.where(_per_example(cut, current), best, current)
  _, decrement, least = apgd_windows(steps)
  return APGDState(
      iteration=state.iteration + 1, x=restart(x_best, moved), x_prev=state.x,
      loss=jnp.where(cut, loss_best, loss), grad=restart(grad_best, grad),
      step_size=jnp.where(cut, state.step_size / 2, state.step_size), x_best=x_best,
      loss_best=loss_best, grad_best=grad_best,
      increases=jnp.where(at_check, 0, increases),
      loss_best_at_check=jnp.where(at_check, loss_best, state.loss_best_at_check),
      cut_at_check=jnp.where(at_check, cut, state.cut_at_check),
      window=jnp.where(at_check, jnp.maximum(state.window - decrement, least), state.window),
      since_check=jnp.where(at_check, 0, since_check))


def apgd(objective: AttackObjective, x: jax.Array, labels: jax.Array, start: jax.Array, *,
         eps: float | jax.Array, steps: int | jax.Array,
         step_size: float | jax.Array) -> jax.Array:
  """APGD from `start`: `steps` steps (steps + 1 gradient evaluations); the best iterate.

  The best iterate by the objective, not the last one: the objective is the attacker's
  (a surrogate's, a member's), and success is judged elsewhere on the model under attack.

  Where this differs from the official code (fra31/auto-attack, autopgd_base.py), the paper
  (Croce & Hein 2020, Algorithm 1) is followed: a window's first step is compared with the
  objective at the point it starts from (after a cut, the best point; the official code
  compares with the iterate before the cut, and the very first step with 0). The start is
  the caller's (`pgd`: uniform in the ball, like fixed-step PGD; the official code starts on
  the ball's surface).
  """
  body = lambda _, state: apgd_update(objective, state, x, labels, eps=eps, steps=steps)
  init = apgd_init(objective, start, labels, step_size=step_size, steps=steps)
  return jax.lax.fori_loop(0, steps, body, init).x_best


def pgd(objective: AttackObjective, x: jax.Array, labels: jax.Array, key: jax.Array, *,
        eps: float, steps: int, step_size: float | None = None, random_start: bool = True,
        schedule: str = DEFAULT_PGD_SCHEDULE) -> jax.Array:
  """L_inf projected gradient ascent (Madry et al. 2018) with a step-size schedule.

  Args:
    objective: (x, labels) -> [B] losses to maximise.
    x: [B, ...] clean inputs in [0, 1].
    labels: [B] true labels.
    key: PRNG key of the random start.
    eps: L_inf radius.
    steps: number of steps.
    step_size: the step, APGD's first step (default eps * DEFAULT_STEP_FRACTIONS[schedule]:
      2 eps for APGD, eps / 5 fixed).
    random_start: start from a uniform point of the eps ball (projected into the box).
    schedule: "apgd" (`apgd`: momentum, halving steps; returns its best iterate) or "fixed"
      (`fixed_step_pgd`: the last iterate).

  Returns:
    [B, ...] adversarial inputs, in the eps ball around x and in [0, 1].
  """
  validate(schedule=schedule)
  if step_size is None:
    step_size = eps * DEFAULT_STEP_FRACTIONS[schedule]
  start = random_start_point(key, x, eps) if random_start else x
  attack = apgd if schedule == "apgd" else fixed_step_pgd
  return attack(objective, x, labels, start, eps=eps, steps=steps, step_size=step_size)


def mim(objective: AttackObjective, x: jax.Array, labels: jax.Array, *, eps: float, steps: int,
        step_size: float | None = None, decay: float = 1.0) -> jax.Array:
  """Momentum iterative method (Dong et al. 2018), L_inf.

  m <- decay * m + g / ||g||_1 (per example); x <- project(x + step_size * sign(m)).

  Args:
    objective: (x, labels) -> [B] losses to maximise.
    x: [B, ...] clean inputs in [0, 1].
    labels: [B] true labels.
    eps: L_inf radius.
    steps: iterations.
    step_size: default eps / steps, as in the paper.
    decay: momentum decay mu.

  Returns:
    [B, ...] adversarial inputs.
  """
  step_size = eps / steps if step_size is None else step_size
  batch_axes = tuple(range(1, x.ndim))

  def body(_, carry):
    x_adv, momentum = carry
    grad = input_gradient(objective, x_adv, labels)
    l1 = jnp.sum(jnp.abs(grad), axis=batch_axes, keepdims=True)
    momentum = decay * momentum + grad / jnp.maximum(l1, 1e-12)
    return project(x_adv + step_size * jnp.sign(momentum), x, eps), momentum

  return jax.lax.fori_loop(0, steps, body, (x, jnp.zeros_like(x)))[0]


def make_attack(attack: str, objective: AttackObjective, *, eps: float, steps: int = 50,
                step_size: float | None = None, decay: float = 1.0, random_start: bool = True,
                schedule: str = DEFAULT_PGD_SCHEDULE) -> AttackFn:
  """A uniform (x, labels, key) -> x_adv attack; FGSM and MIM ignore the key.

  eps, steps and step_size may be traced (one compiled attack for every budget); see
  `fgsm`, `pgd` and `mim` for the others (`schedule` is PGD's).
  """
  validate(eps=eps, attack=attack, steps=steps, schedule=schedule)
  if attack == "fgsm":
    return lambda x, labels, key: fgsm(objective, x, labels, eps)
  if attack == "mim":
    return lambda x, labels, key: mim(objective, x, labels, eps=eps, steps=steps,
                                      step_size=step_size, decay=decay)
  return lambda x, labels, key: pgd(objective, x, labels, key, eps=eps, steps=steps,
                                    step_size=step_size, random_start=random_start,
                                    schedule=schedule)


def predicts(predictor: Predictor, x: jax.Array, labels: jax.Array) -> jax.Array:
  """[B] bool: the predictor's argmax equals the label."""
  return jnp.argmax(predictor(x), axis=-1) == labels


def robust_mask(predictor: Predictor, attack_fn: AttackFn, x: jax.Array, labels: jax.Array,
                keys: jax.Array, restarts: int | jax.Array | None = None) -> jax.Array:
  """Which points survive every restart of an attack.

  Args:
    predictor: x -> [B, C] scores of the model under attack.
    attack_fn: (x, labels, key) -> x_adv; crafted on the model itself (white-box) or on a
      surrogate (black-box transfer).
    x: [B, ...] clean inputs.
    labels: [B].
    keys: [R] PRNG keys, one per restart.
    restarts: how many of the keys count (default all R); may be traced, so that one
      compiled program serves every count up to R (the restarts past it are run and
      ignored).

  Returns:
    [B] bool: correct on x and on the first `restarts` adversarial inputs.
  """
  validate(restarts=restarts)
  restarts = keys.shape[0] if restarts is None else restarts

  def restart(carry, key):
    robust, index = carry
    survived = predicts(predictor, attack_fn(x, labels, key), labels)
    return (robust & (survived | (index >= restarts)), index + 1), None

  start = (predicts(predictor, x, labels), jnp.zeros((), jnp.int32))
  return jax.lax.scan(restart, start, keys)[0][0]


def transfer_counts(apply_fn: MemberApplyFn, stacked: Params, x: jax.Array, labels: jax.Array,
                    key: jax.Array, *, eps: float, steps: int, step_size: float | None = None,
                    schedule: str = DEFAULT_PGD_SCHEDULE, loss: str = "ce",
                    combine: str = "log_mean_prob",
                    member_map: str = "vmap") -> dict[str, jax.Array]:
  """Member-to-member transfer of PGD examples, as counts over the points all members get right.

  Args:
    apply_fn: one member's (params, x) -> logits.
    stacked: member params, leaves [M, ...].
    x: [B, ...] clean inputs; labels: [B].
    key: PRNG key (one random start per source member).
    eps, steps, step_size, schedule: PGD settings (see `pgd`).
    loss: the attack loss on the source member.
    combine: how the ensemble combines members when judging transfer to it.
    member_map: "vmap" or "unroll" (see `ensemble.map_members`).

  Returns:
    points: scalar int, points every member classifies correctly (the denominator);
    member_to_member: [M, M] int, fooled[i, j] = PGD on member i misleads member j;
    member_to_ensemble: [M] int, PGD on member i misleads the ensemble.
  """
  validate(eps=eps, steps=steps, loss=loss, schedule=schedule)
  count = ensemble.num_members(stacked)

  def craft(member):
    params, member_key = member
    objective = lambda inputs, y: attack_loss(apply_fn(params, inputs), y, loss)
    return pgd(objective, x, labels, member_key, eps=eps, steps=steps, step_size=step_size,
               schedule=schedule)

  x_adv = ensemble.map_members(craft, (stacked, jax.random.split(key, count)),
                               member_map=member_map)  # [M_src, B, ...]
  clean = ensemble.member_logits(apply_fn, stacked, x, member_map)
  all_correct = jnp.all(jnp.argmax(clean, axis=-1) == labels, axis=0)  # [B]
  # All sources' examples as one batch: [M_src * B, ...] -> [M_tgt, M_src, B, C].
  flat = ensemble.member_logits(apply_fn, stacked, x_adv.reshape(-1, *x.shape[1:]), member_map)
  adv_logits = jnp.swapaxes(flat.reshape(count, count, x.shape[0], -1), 0, 1)
  member_fooled = jnp.argmax(adv_logits, axis=-1) != labels  # [M_src, M_tgt, B]
  ensemble_fooled = jnp.argmax(jax.vmap(ensemble.combine_logits, in_axes=(0, None))(
      adv_logits, combine), axis=-1) != labels  # [M_src, B]
  return {
      "points": jnp.sum(all_correct),
      "member_to_member": jnp.sum(member_fooled & all_correct, axis=-1),
      "member_to_ensemble": jnp.sum(ensemble_fooled & all_correct, axis=-1),
  }


# --------------------------------------------------------------------------- checks


def _non_increasing(accuracy_by_budget: Mapping[Any, float], tolerance: float) -> bool:
  values = [accuracy_by_budget[k] for k in sorted(accuracy_by_budget)]
  return all(later <= earlier + tolerance for earlier, later in itertools.pairwise(values))


def _refinement_lowers_accuracy(accuracy_by_refinement: Mapping[int, float],
                                tolerance: float) -> bool:
  base = accuracy_by_refinement[1]
  return any(accuracy < base - tolerance
             for factor, accuracy in accuracy_by_refinement.items() if factor > 1)


def gradient_masking_checks(
    *,
    large_eps_accuracy: float,
    pgd_accuracy: Mapping[float, float],
    fgsm_accuracy: Mapping[float, float],
    accuracy_by_steps: Mapping[int, float],
    accuracy_by_restarts: Mapping[int, float],
    white_box_accuracy: Mapping[float, float],
    transfer_accuracy: Sequence[Mapping[float, float]] = (),
    accuracy_by_target: Mapping[str, float] | None = None,
    large_eps_single_step_accuracy: float | None = None,
    accuracy_by_refinement: Mapping[int, float] | None = None,
    large_eps_threshold: float = 0.05,
    tolerance: float = 0.0,
    target_tolerance: float = 0.05,
    refinement_tolerance: float = 0.02,
) -> dict[str, bool]:
  """Carlini et al. (2019)'s checks that an evaluation is not fooled by gradient masking.

  Args:
    large_eps_accuracy: robust accuracy at an eps large enough to destroy any image.
    pgd_accuracy: eps -> PGD robust accuracy (same target and loss as fgsm_accuracy).
    fgsm_accuracy: eps -> FGSM robust accuracy.
    accuracy_by_steps: PGD steps -> robust accuracy (one eps, one restart).
    accuracy_by_restarts: restarts -> robust accuracy (one eps).
    white_box_accuracy: eps -> the reported white-box robust accuracy.
    transfer_accuracy: for each transfer attack (black-box surrogate, member-crafted),
      eps -> accuracy of the attacked model on the transferred examples.
    accuracy_by_target: optional, attack target name ("ensemble", "mean_logits",
      "max_member", ...) -> robust accuracy at one eps. The ensemble target may not be much
      weaker than the best other target: that would mean its gradient is masked (members'
      gradients cancelling in the averaged output).
    large_eps_single_step_accuracy: optional, a single-step attack's (FGSM's) robust
      accuracy at the large eps: a gradient that points the right way destroys the image in
      one step too; accuracy left there means the gradient at the clean point misleads.
    accuracy_by_refinement: optional, refinement factor r -> PGD robust accuracy with the
      step divided by r and the steps multiplied by r (one eps, one restart; r = 1 the
      evaluated attack). A finer attack that finds much lower accuracy means the evaluated
      one has not converged (a plateau, which more steps at the same step cannot reveal).
    large_eps_threshold: the most accuracy allowed at large eps.
    tolerance: slack on the monotonicity comparisons (accuracy units).
    target_tolerance: slack on the target comparison.
    refinement_tolerance: how much lower a refined attack's accuracy may be.

  Returns:
    check name -> passed. Names: large_eps_accuracy_near_zero, pgd_not_weaker_than_fgsm,
    more_steps_never_raise_accuracy, more_restarts_never_raise_accuracy,
    transfer_not_stronger_than_white_box, and when their inputs are given
    ensemble_target_not_masked, large_eps_single_step_accuracy_near_zero and
    finer_steps_do_not_lower_accuracy.
  """
  checks = {
      "large_eps_accuracy_near_zero": large_eps_accuracy <= large_eps_threshold,
      "pgd_not_weaker_than_fgsm": all(
          pgd_accuracy[eps] <= fgsm_accuracy[eps] + tolerance
          for eps in set(pgd_accuracy) & set(fgsm_accuracy)),
      "more_steps_never_raise_accuracy": _non_increasing(accuracy_by_steps, tolerance),
      "more_restarts_never_raise_accuracy": _non_increasing(accuracy_by_restarts, tolerance),
      "transfer_not_stronger_than_white_box": all(
          transfer[eps] + tolerance >= white_box_accuracy[eps]
          for transfer in transfer_accuracy for eps in set(transfer) & set(white_box_accuracy)),
  }
  if accuracy_by_target is not None:
    others = [acc for name, acc in accuracy_by_target.items() if name != "ensemble"]
    checks["ensemble_target_not_masked"] = (
        "ensemble" not in accuracy_by_target or not others
        or accuracy_by_target["ensemble"] <= min(others) + target_tolerance)
  if large_eps_single_step_accuracy is not None:
    checks["large_eps_single_step_accuracy_near_zero"] = (
        large_eps_single_step_accuracy <= large_eps_threshold)
  if accuracy_by_refinement is not None:
    checks["finer_steps_do_not_lower_accuracy"] = not _refinement_lowers_accuracy(
        accuracy_by_refinement, refinement_tolerance)
  return {name: bool(passed) for name, passed in checks.items()}
