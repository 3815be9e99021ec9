"""L_inf adversarial attacks on (ensembles of) classifiers, and gradient-masking checks.

Everything works in pixel space: inputs x in [0, 1], perturbations in the eps ball
||x_adv - x||_inf <= eps intersected with the [0, 1] box.

An attack maximises an *objective* `(x [B, ...], labels [B]) -> [B]` per-example loss;
success is judged by a *predictor* `x -> [B, C]` scores (argmax = prediction). Keeping the
two apart lets one attack an ensemble through a surrogate of its output (mean logits, the
max over members' losses, one member) and judge it on the ensemble itself, and lets a
black-box attack be crafted on a surrogate ensemble and judged on the target.

- `fgsm`: one signed-gradient step of size eps.
- `pgd`: L_inf PGD (Madry et al.), uniform random start, signed steps of `step_size`
  (default eps / 5), projection after every step.
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
DEFAULT_STEP_FRACTION = 0.2  # PGD step = eps / 5 unless given


def validate(*, eps: float | None = None, attack: str | None = None, loss: str | None = None,
             target: str | None = None, steps: int | None = None,
             restarts: int | None = None) -> None:
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


def pgd(objective: AttackObjective, x: jax.Array, labels: jax.Array, key: jax.Array, *,
        eps: float, steps: int, step_size: float | None = None,
        random_start: bool = True) -> jax.Array:
  """L_inf projected gradient ascent (Madry et al. 2018).

  Args:
    objective: (x, labels) -> [B] losses to maximise.
    x: [B, ...] clean inputs in [0, 1].
    labels: [B] true labels.
    key: PRNG key of the random start.
    eps: L_inf radius.
    steps: number of signed-gradient steps.
    step_size: size of each step (default eps / 5).
    random_start: start from a uniform point of the eps ball (projected into the box).

  Returns:
    [B, ...] the last iterate.
  """
  step_size = eps * DEFAULT_STEP_FRACTION if step_size is None else step_size
  start = x
  if random_start:
    start = project(x + jax.random.uniform(key, x.shape, x.dtype, -eps, eps), x, eps)

  def body(_, x_adv):
    grad = input_gradient(objective, x_adv, labels)
    return project(x_adv + step_size * jnp.sign(grad), x, eps)

  return jax.lax.fori_loop(0, steps, body, start)


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
                step_size: float | None = None, decay: float = 1.0,
                random_start: bool = True) -> AttackFn:
  """A uniform (x, labels, key) -> x_adv attack; FGSM and MIM ignore the key.

  eps, steps and step_size may be traced (one compiled attack for every budget); see
  `fgsm`, `pgd` and `mim` for the others.
  """
  validate(eps=eps, attack=attack, steps=steps)
  if attack == "fgsm":
    return lambda x, labels, key: fgsm(objective, x, labels, eps)
  if attack == "mim":
    return lambda x, labels, key: mim(objective, x, labels, eps=eps, steps=steps,
                                      step_size=step_size, decay=decay)
  return lambda x, labels, key: pgd(objective, x, labels, key, eps=eps, steps=steps,
                                    step_size=step_size, random_start=random_start)


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
                    loss: str = "ce", combine: str = "log_mean_prob",
                    member_map: str = "vmap") -> dict[str, jax.Array]:
  """Member-to-member transfer of PGD examples, as counts over the points all members get right.

  Args:
    apply_fn: one member's (params, x) -> logits.
    stacked: member params, leaves [M, ...].
    x: [B, ...] clean inputs; labels: [B].
    key: PRNG key (one random start per source member).
    eps, steps, step_size: PGD settings.
    loss: the attack loss on the source member.
    combine: how the ensemble combines members when judging transfer to it.
    member_map: "vmap" or "unroll" (see `ensemble.map_members`).

  Returns:
    points: scalar int, points every member classifies correctly (the denominator);
    member_to_member: [M, M] int, fooled[i, j] = PGD on member i misleads member j;
    member_to_ensemble: [M] int, PGD on member i misleads the ensemble.
  """
  validate(eps=eps, steps=steps, loss=loss)
  count = ensemble.num_members(stacked)

  def craft(member):
    params, member_key = member
    objective = lambda inputs, y: attack_loss(apply_fn(params, inputs), y, loss)
    return pgd(objective, x, labels, member_key, eps=eps, steps=steps, step_size=step_size)

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
    large_eps_threshold: float = 0.05,
    tolerance: float = 0.0,
    target_tolerance: float = 0.05,
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
    large_eps_threshold: the most accuracy allowed at large eps.
    tolerance: slack on the monotonicity comparisons (accuracy units).
    target_tolerance: slack on the target comparison.

  Returns:
    check name -> passed. Names: large_eps_accuracy_near_zero, pgd_not_weaker_than_fgsm,
    more_steps_never_raise_accuracy, more_restarts_never_raise_accuracy,
    transfer_not_stronger_than_white_box, and ensemble_target_not_masked when
    accuracy_by_target is given.
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
  return {name: bool(passed) for name, passed in checks.items()}
