"""Attacks against closed forms on linear models, the eps ball and box, and the checks."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpe_jax import attacks, ensemble
from fpe_jax.models import cnn

D = 4


def linear_apply(params, x):
  return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]


def linear_model(seed, classes, d=D):
  rng = np.random.default_rng(seed)
  return {"w": jnp.asarray(rng.normal(size=(d, classes)), jnp.float32),
          "b": jnp.asarray(0.3 * rng.normal(size=(classes,)), jnp.float32)}


def points(seed, n, d=D):
  return jnp.asarray(np.random.default_rng(seed).uniform(size=(n, d)), jnp.float32)


def brute_force_robust(params, x, y, eps):
  """Exact L_inf robustness of a linear classifier: its worst case over the box
  [max(0, x - eps), min(1, x + eps)] is at one of the 2^d corners, so try them all."""
  w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
  x = np.asarray(x, np.float64)
  lo, hi = np.maximum(x - eps, 0), np.minimum(x + eps, 1)
  robust = np.argmax(x @ w + b, -1) == np.asarray(y)
  for corner in itertools.product((0, 1), repeat=x.shape[1]):
    choice = np.asarray(corner, bool)
    robust &= np.argmax(np.where(choice, hi, lo) @ w + b, -1) == np.asarray(y)
  return robust


def worst_margin(params, x, y, eps):
  """max_k max_{x' in box} z_k - z_y for a linear model, in closed form (per coordinate)."""
  w, b = np.asarray(params["w"], np.float64), np.asarray(params["b"], np.float64)
  x, y = np.asarray(x, np.float64), np.asarray(y)
  lo, hi = np.maximum(x - eps, 0), np.minimum(x + eps, 1)
  best = np.full(len(x), -np.inf)
  for k in range(w.shape[1]):
    diff = w[:, k][None] - w[:, y].T  # [n, d]
    value = np.sum(np.where(diff > 0, hi, lo) * diff, -1) + b[k] - b[y]
    best = np.where(k == y, best, np.maximum(best, value))
  return best


def objective(params, loss):
  return lambda x, y: attacks.attack_loss(linear_apply(params, x), y, loss)


def predictor(params):
  return lambda x: linear_apply(params, x)


def test_attack_losses_match_numpy():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(5, 4)).astype(np.float32)
  y = rng.integers(0, 4, 5)
  zs = z - z.max(-1, keepdims=True)
  ce = -(zs[np.arange(5), y] - np.log(np.exp(zs).sum(-1)))
  np.testing.assert_allclose(attacks.attack_loss(jnp.asarray(z), jnp.asarray(y), "ce"), ce,
                             rtol=1e-5)
  margin = [max(z[i, k] for k in range(4) if k != y[i]) - z[i, y[i]] for i in range(5)]
  np.testing.assert_allclose(attacks.attack_loss(jnp.asarray(z), jnp.asarray(y), "margin"),
                             margin, rtol=1e-5)


def test_binary_linear_fgsm_pgd_mim_reach_closed_form_worst_case():
  """Binary linear model: the optimum is x + eps * sign(w_other - w_true), cut to [0, 1]."""
  params = linear_model(1, classes=2)
  x = points(2, 64)
  y = jnp.argmax(linear_apply(params, x), -1)
  eps = 0.1
  w = np.asarray(params["w"])
  direction = np.sign(w[:, 1 - np.asarray(y)] - w[:, np.asarray(y)]).T  # [n, d]
  optimum = np.clip(np.asarray(x) + eps * direction, 0, 1)
  run = jax.jit(lambda x, y, key: (
      attacks.fgsm(objective(params, "ce"), x, y, eps),
      attacks.pgd(objective(params, "margin"), x, y, key, eps=eps, steps=20),
      attacks.mim(objective(params, "ce"), x, y, eps=eps, steps=10)))
  for found in run(x, y, jax.random.key(0)):
    np.testing.assert_allclose(found, optimum, atol=1e-6)


def test_pgd_robustness_matches_brute_force_on_multiclass_linear_model():
  params = linear_model(3, classes=4)
  x = points(4, 256)
  y = jnp.argmax(linear_apply(params, x), -1)
  y = jnp.where(jnp.arange(256) % 7 == 0, (y + 1) % 4, y)  # some points start misclassified
  eps = 0.08
  keys = jax.random.split(jax.random.key(5), 5)
  robust = jax.jit(lambda x, y: attacks.robust_mask(
      predictor(params), attacks.make_attack("pgd", objective(params, "margin"), eps=eps,
                                             steps=50), x, y, keys))(x, y)
  exact = brute_force_robust(params, x, y, eps)
  np.testing.assert_array_equal(exact, worst_margin(params, x, y, eps) < 0)
  robust = np.asarray(robust)
  # Sound: PGD never breaks a point that is truly robust.
  assert not np.any(exact & ~robust)
  # Complete up to points within a hair of the decision boundary.
  clear = np.abs(worst_margin(params, x, y, eps)) > 1e-3
  np.testing.assert_array_equal(robust[clear], exact[clear])
  assert 0.1 < exact.mean() < 0.9  # the test point set exercises both outcomes


def test_more_steps_and_restarts_never_raise_accuracy():
  params = linear_model(7, classes=2)
  x = points(7, 256)
  y = jnp.argmax(linear_apply(params, x), -1)
  eps = 0.1
  keys = jax.random.split(jax.random.key(8), 4)

  @jax.jit
  def accuracy(steps_mask):
    def attack(x, y, key):
      # Steps past the budget are masked out so one program covers every budget.
      def body(t, x_adv):
        grad = attacks.input_gradient(objective(params, "ce"), x_adv, y)
        moved = attacks.project(x_adv + 0.2 * eps * jnp.sign(grad), x, eps)
        return jnp.where(steps_mask[t], moved, x_adv)
      return jax.lax.fori_loop(0, steps_mask.shape[0], body, x)
    return jnp.mean(attacks.robust_mask(predictor(params), attack, x, y, keys[:1]))

  by_steps = [float(accuracy(jnp.arange(20) < s)) for s in (0, 1, 2, 3, 5, 10, 20)]
  assert all(b <= a for a, b in itertools.pairwise(by_steps)), by_steps
  assert by_steps[-1] < by_steps[0] == 1.0
  # Binary linear model: 20 steps of eps/5 reach the exact worst case.
  assert by_steps[-1] == brute_force_robust(params, x, y, eps).mean()
  pgd = attacks.make_attack("pgd", objective(params, "ce"), eps=eps, steps=1)
  restarts = jax.jit(lambda r: attacks.robust_mask(predictor(params), pgd, x, y, r))
  by_restarts = [float(jnp.mean(restarts(keys[:r]))) for r in (1, 2, 4)]
  assert all(b <= a for a, b in itertools.pairwise(by_restarts)), by_restarts


def test_traced_restarts_and_steps_compile_once_and_match_fixed_ones():
  params = linear_model(9, classes=3)
  x = points(9, 128)
  y = jnp.argmax(linear_apply(params, x), -1)
  keys = jax.random.split(jax.random.key(10), 4)
  traces = []

  @jax.jit
  def robust(eps, steps, restarts):
    traces.append(None)
    attack = attacks.make_attack("pgd", objective(params, "ce"), eps=eps, steps=steps,
                                 step_size=0.25 * eps)
    return attacks.robust_mask(predictor(params), attack, x, y, keys, restarts)

  for eps, steps, restarts in ((0.05, 3, 1), (0.1, 5, 4), (0.1, 5, 2)):
    fixed = attacks.robust_mask(
        predictor(params), attacks.make_attack("pgd", objective(params, "ce"), eps=eps,
                                               steps=steps, step_size=0.25 * eps),
        x, y, keys[:restarts])
    np.testing.assert_array_equal(robust(eps, steps, restarts), fixed)
  assert len(traces) == 1


def test_attacks_stay_in_eps_ball_and_box_for_every_target():
  config = cnn.CNNConfig(width=4, hidden=8)
  stacked = ensemble.init_members(lambda k: cnn.init_cnn(k, config), jax.random.key(0), 2)
  apply = lambda p, x: cnn.apply_cnn(p, x, config)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.choice([0.0, 0.5, 1.0], size=(4, 28, 28, 1)), jnp.float32)
  y = jnp.arange(4) % 10
  eps = 0.2
  targets = [("ensemble", None), ("mean_logits", None), ("max_member", None), ("member", 1)]

  @jax.jit
  def all_attacks(x, y, key):
    out = []
    # Each target once, the losses alternating: every objective path, fewer compiles.
    for (target, member), loss in zip(targets, attacks.ATTACK_LOSSES * 2, strict=True):
      obj = attacks.ensemble_objective(apply, stacked, target, loss, member)
      out.append(attacks.pgd(obj, x, y, key, eps=eps, steps=3, step_size=0.15))
    obj = attacks.ensemble_objective(apply, stacked)
    out.append(attacks.fgsm(obj, x, y, eps))
    out.append(attacks.mim(obj, x, y, eps=eps, steps=3, step_size=0.15))
    return jnp.stack(out)

  found = np.asarray(all_attacks(x, y, jax.random.key(2)))
  assert np.all(np.abs(found - np.asarray(x)[None]) <= eps + 1e-6)
  assert found.min() >= 0.0 and found.max() <= 1.0
  assert np.any(np.abs(found - np.asarray(x)[None]) > 0.1)  # they do move


def test_objectives_match_their_definitions():
  stacked = ensemble.stack_members([linear_model(s, classes=3) for s in (10, 11, 12)])
  x = points(13, 8)
  y = jnp.arange(8) % 3
  logits = np.stack([np.asarray(linear_apply(p, x)) for p in ensemble.unstack_members(stacked)])
  log_mean_prob = np.log(np.mean(jax.nn.softmax(jnp.asarray(logits), -1), 0))
  want = {}
  for loss in attacks.ATTACK_LOSSES:
    per_member = np.stack([attacks.attack_loss(jnp.asarray(z), y, loss) for z in logits])
    want[("max_member", loss, None)] = per_member.max(0)
    want[("member", loss, 2)] = per_member[2]
    want[("mean_logits", loss, None)] = attacks.attack_loss(jnp.asarray(logits.mean(0)), y, loss)
    want[("ensemble", loss, None)] = attacks.attack_loss(jnp.asarray(log_mean_prob), y, loss)
  choices = [attacks.ObjectiveChoice(*c) for c in want]
  table = jax.jit(attacks.objective_table(linear_apply, stacked, choices))(x, y)
  for row, (choice, value) in zip(table, want.items(), strict=True):
    np.testing.assert_allclose(row, value, rtol=1e-4, atol=1e-6, err_msg=str(choice))
    single = attacks.ensemble_objective(linear_apply, stacked, *choice)(x, y)
    np.testing.assert_allclose(single, value, rtol=1e-4, atol=1e-6, err_msg=str(choice))
  assert [c.label for c in choices[:2]] == ["max_member/ce", "member2/ce"]
  # A traced row index: one program, the gradient of the chosen objective alone.
  objectives = attacks.objective_table(linear_apply, stacked, choices)
  grad = jax.jit(lambda k: attacks.input_gradient(attacks.select_objective(objectives, k), x, y))
  for k, choice in enumerate(choices):
    np.testing.assert_allclose(grad(k), attacks.input_gradient(attacks.ensemble_objective(
        linear_apply, stacked, *choice), x, y), rtol=1e-4, atol=1e-6)


def test_transfer_counts_match_a_loop_reference():
  base = linear_model(20, classes=3)
  # Members close to one shared model, so that most points are right for all of them.
  stacked = ensemble.stack_members([jax.tree.map(lambda a, b: a + 0.3 * b, base,
                                                 linear_model(s, classes=3)) for s in (21, 22, 23)])
  x = points(23, 128)
  y = jnp.argmax(ensemble.ensemble_logits(linear_apply, stacked, x), -1)
  key = jax.random.key(24)
  eps, steps = 0.1, 10
  got, unrolled = (jax.jit(lambda x, y, m=m: attacks.transfer_counts(
      linear_apply, stacked, x, y, key, eps=eps, steps=steps, member_map=m))(x, y)
                   for m in ("vmap", "unroll"))
  chex.assert_trees_all_equal(got, unrolled)
  members = ensemble.unstack_members(stacked)
  predict = lambda p, xs: np.argmax(np.asarray(linear_apply(p, xs)), -1)
  all_correct = np.all([predict(p, x) == np.asarray(y) for p in members], axis=0)
  assert int(got["points"]) == all_correct.sum() > 20
  pgd = jax.jit(lambda p, k: attacks.pgd(objective(p, "ce"), x, y, k, eps=eps, steps=steps))
  for i, (p, k) in enumerate(zip(members, jax.random.split(key, 3), strict=True)):
    x_adv = pgd(p, k)
    for j, q in enumerate(members):
      fooled = (predict(q, x_adv) != np.asarray(y)) & all_correct
      assert int(got["member_to_member"][i, j]) == fooled.sum()
    ens = np.argmax(np.asarray(ensemble.ensemble_logits(linear_apply, stacked, x_adv)), -1)
    assert int(got["member_to_ensemble"][i]) == ((ens != np.asarray(y)) & all_correct).sum()


def test_gradient_masking_checks_pass_and_fail_by_name():
  good = dict(large_eps_accuracy=0.0, pgd_accuracy={0.1: 0.3, 0.2: 0.1},
              fgsm_accuracy={0.1: 0.5, 0.2: 0.3}, accuracy_by_steps={10: 0.4, 50: 0.3},
              accuracy_by_restarts={1: 0.35, 5: 0.3}, white_box_accuracy={0.1: 0.25, 0.2: 0.05},
              transfer_accuracy=[{0.1: 0.6, 0.2: 0.4}],
              accuracy_by_target={"ensemble": 0.3, "mean_logits": 0.32, "max_member": 0.31})
  checks = attacks.gradient_masking_checks(**good)
  assert checks == {"large_eps_accuracy_near_zero": True, "pgd_not_weaker_than_fgsm": True,
                    "more_steps_never_raise_accuracy": True,
                    "more_restarts_never_raise_accuracy": True,
                    "transfer_not_stronger_than_white_box": True,
                    "ensemble_target_not_masked": True}
  bad = {
      "large_eps_accuracy_near_zero": dict(large_eps_accuracy=0.3),
      "pgd_not_weaker_than_fgsm": dict(pgd_accuracy={0.1: 0.6, 0.2: 0.1}),
      "more_steps_never_raise_accuracy": dict(accuracy_by_steps={10: 0.3, 50: 0.4}),
      "more_restarts_never_raise_accuracy": dict(accuracy_by_restarts={1: 0.3, 5: 0.31}),
      "transfer_not_stronger_than_white_box": dict(transfer_accuracy=[{0.1: 0.1, 0.2: 0.4}]),
      "ensemble_target_not_masked": dict(
          accuracy_by_target={"ensemble": 0.5, "mean_logits": 0.1, "max_member": 0.3}),
  }
  for name, change in bad.items():
    checks = attacks.gradient_masking_checks(**{**good, **change})
    assert [k for k, passed in checks.items() if not passed] == [name]


def test_bad_arguments_raise_one_line_errors():
  params = linear_model(0, classes=2)
  with pytest.raises(ValueError, match=r"eps=-0.1 must be >= 0"):
    attacks.make_attack("pgd", objective(params, "ce"), eps=-0.1)
  with pytest.raises(ValueError, match="attack='cw' is not one of"):
    attacks.make_attack("cw", objective(params, "ce"), eps=0.1)
  with pytest.raises(ValueError, match="attack loss='hinge' is not one of"):
    attacks.attack_loss(jnp.zeros((2, 2)), jnp.zeros(2, jnp.int32), "hinge")
  stacked = ensemble.stack_members([params, params])
  with pytest.raises(ValueError, match="target='worst' is not one of"):
    attacks.ensemble_objective(linear_apply, stacked, "worst")
  with pytest.raises(ValueError, match=r"member=2 must be an index in \[0, 2\)"):
    attacks.ensemble_objective(linear_apply, stacked, "member", member=2)
  with pytest.raises(ValueError, match="steps=0 must be >= 1"):
    attacks.make_attack("pgd", objective(params, "ce"), eps=0.1, steps=0)
  with pytest.raises(ValueError, match="restarts=0 must be >= 1"):
    pgd = attacks.make_attack("pgd", objective(params, "ce"), eps=0.1, steps=1)
    attacks.robust_mask(predictor(params), pgd, points(0, 2), jnp.zeros(2, jnp.int32),
                        jax.random.split(jax.random.key(0), 2), restarts=0)
  with pytest.raises(ValueError, match="choices must name at least one"):
    attacks.objective_table(linear_apply, stacked, [])
  with pytest.raises(ValueError, match=r"member=None must be an index"):
    attacks.objective_table(linear_apply, stacked, [attacks.ObjectiveChoice("member", "ce")])
