"""Attacks against closed forms on linear models, the eps ball and box, and the checks."""

import functools
import itertools
import math

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


@pytest.mark.parametrize("schedule", attacks.PGD_SCHEDULES)
def test_binary_linear_fgsm_pgd_mim_reach_closed_form_worst_case(schedule):
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
      attacks.pgd(objective(params, "margin"), x, y, key, eps=eps, steps=20,
                  schedule=schedule),
      attacks.mim(objective(params, "ce"), x, y, eps=eps, steps=10)))
  for found in run(x, y, jax.random.key(0)):
    np.testing.assert_allclose(found, optimum, atol=1e-6)


@pytest.mark.parametrize("schedule", attacks.PGD_SCHEDULES)
def test_pgd_robustness_matches_brute_force_on_multiclass_linear_model(schedule):
  params = linear_model(3, classes=4)
  x = points(4, 256)
  y = jnp.argmax(linear_apply(params, x), -1)
  y = jnp.where(jnp.arange(256) % 7 == 0, (y + 1) % 4, y)  # some points start misclassified
  eps = 0.08
  keys = jax.random.split(jax.random.key(5), 5)
  robust = jax.jit(lambda x, y: attacks.robust_mask(
      predictor(params), attacks.make_attack("pgd", objective(params, "margin"), eps=eps,
                                             steps=50, schedule=schedule), x, y, keys))(x, y)
  exact = brute_force_robust(params, x, y, eps)
  np.testing.assert_array_equal(exact, worst_margin(params, x, y, eps) < 0)
  robust = np.asarray(robust)
  # Sound: PGD never breaks a point that is truly robust.
  assert not np.any(exact & ~robust)
  # Complete up to points within a hair of the decision boundary.
  clear = np.abs(worst_margin(params, x, y, eps)) > 1e-3
  np.testing.assert_array_equal(robust[clear], exact[clear])
  assert 0.1 < exact.mean() < 0.9  # the test point set exercises both outcomes


# --------------------------------------------------------------------------- APGD


def tanh_mlp(seed, d=D, hidden=6, classes=3):
  """A small tanh MLP: nonlinear, so that APGD's steps overshoot and its step gets cut."""
  rng = np.random.default_rng(seed)
  return {"w1": 3.0 * rng.normal(size=(d, hidden)), "b1": rng.normal(size=hidden),
          "w2": 2.0 * rng.normal(size=(hidden, classes)), "b2": rng.normal(size=classes)}


def tanh_mlp_apply(params, x):
  return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def numpy_ce_and_gradient(params, x, y):
  """One example's cross-entropy of `tanh_mlp_apply` and its input gradient, by hand."""
  h = np.tanh(x @ params["w1"] + params["b1"])
  z = h @ params["w2"] + params["b2"]
  p = np.exp(z - z.max())
  p /= p.sum()
  dz = p - np.eye(len(z))[y]
  return -np.log(p[y]), ((dz @ params["w2"].T) * (1 - h ** 2)) @ params["w1"].T


def official_checkpoints(steps):
  """The steps after which APGD tests its step size, as the official code
  (fra31/auto-attack, autopgd_base.py) counts them, in its floats: windows of
  max(int(0.22 N), 1) steps, each max(int(0.03 N), 1) shorter, at least max(int(0.06 N), 1)."""
  window, least = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1)
  end, checkpoints = window, []
  while end <= steps:
    checkpoints.append(end)
    window = max(window - max(int(0.03 * steps), 1), least)
    end += window
  return checkpoints


def paper_checkpoints(steps):
  """Croce & Hein (2020), section 3.2: w_j = ceil(p_j N), p_0 = 0, p_1 = 0.22,
  p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), in exact fractions."""
  from fractions import Fraction

  p_prev, p, checkpoints = Fraction(0), Fraction(22, 100), []
  while math.ceil(p * steps) <= steps:
    checkpoints.append(math.ceil(p * steps))
    p_prev, p = p, p + max(p - p_prev - Fraction(3, 100), Fraction(6, 100))
  return checkpoints


def numpy_apgd(loss_and_grad, x, start, eps, steps, step_size):
  """APGD on ONE example, written plainly from Croce & Hein (2020), Algorithm 1 (L_inf):
  the whole history of objective values kept, the step-size conditions tested on it at the
  checkpoints (`official_checkpoints`; the second condition disabled at the first, as in
  the official code).

  Returns:
    (the iterates x^(1..N) after each step's checkpoint, their step sizes, x_max).
  """
  project = lambda v: np.clip(np.clip(v, x - eps, x + eps), 0.0, 1.0)
  checkpoints = official_checkpoints(steps)
  value, grad = loss_and_grad(start)
  history = [value]  # f(x^(k)) of the point step k+1 moves from (after a cut: f_max)
  best = (start, value, grad)
  x_prev, x_cur, eta = start, start, step_size
  last_check, cut_last, best_at_last = 0, True, value
  iterates, etas = [], []
  for k in range(steps):
    a = 1.0 if k == 0 else 0.75
    z = project(x_cur + eta * np.sign(grad))
    x_new = project(x_cur + a * (z - x_cur) + (1 - a) * (x_cur - x_prev))
    value, grad = loss_and_grad(x_new)
    if value > best[1]:
      best = (x_new, value, grad)
    history.append(value)
    x_prev, x_cur = x_cur, x_new
    if k + 1 in checkpoints:
      window = k + 1 - last_check
      increases = sum(history[i + 1] > history[i] for i in range(last_check, k + 1))
      cut = increases <= 0.75 * window or (not cut_last and best_at_last >= best[1])
      last_check, cut_last, best_at_last = k + 1, cut, best[1]
      if cut:
        eta /= 2
        x_cur, history[-1], grad = best
    iterates.append(x_cur)
    etas.append(eta)
  return np.stack(iterates), np.asarray(etas), best[0]


def test_apgd_windows_are_the_official_codes_and_at_100_steps_the_papers():
  """Checkpoints from `apgd_windows`, for Python and traced budgets, against the official
  code's float formula; at N = 100 that is the paper's schedule (22, 41, 57, ..., 99)."""
  def checkpoints(windows, steps):
    first, decrement, least = (int(v) for v in windows)
    ends, window, end = [], first, first
    while end <= steps:
      ends.append(end)
      window = max(window - decrement, least)
      end += window
    return ends

  traced = jax.jit(attacks.apgd_windows)
  for steps in (*range(1, 60), 99, 100, 101, 333, 1000):
    want = official_checkpoints(steps)
    assert checkpoints(attacks.apgd_windows(steps), steps) == want, steps
    assert checkpoints(traced(jnp.int32(steps)), steps) == want, steps
  assert official_checkpoints(100) == paper_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_apgd_iterates_match_a_numpy_reference():
  """Every iterate, step size and the returned best point of APGD on a tanh MLP equal a
  per-example numpy implementation of the paper's algorithm (in float64: no near-tie of
  two objective values may flip between the two)."""
  params = tanh_mlp(30)
  eps, steps, n = 0.15, 40, 48
  rng = np.random.default_rng(31)
  x = rng.uniform(size=(n, D))
  x[:8, :2] = [0.0, 1.0]  # some pixels on the box's faces
  y = rng.integers(0, 3, n)
  with jax.enable_x64(True):
    jparams = jax.tree.map(jnp.asarray, params)
    obj = lambda xs, ys: attacks.attack_loss(tanh_mlp_apply(jparams, xs), ys, "ce")
    xj, yj = jnp.asarray(x), jnp.asarray(y)
    start = attacks.random_start_point(jax.random.key(32), xj, eps)
    state = attacks.apgd_init(obj, start, yj, step_size=2 * eps, steps=steps)
    update = jax.jit(lambda s: attacks.apgd_update(obj, s, xj, yj, eps=eps, steps=steps))
    iterates, etas = [], []
    for _ in range(steps):
      state = update(state)
      iterates.append(np.asarray(state.x))
      etas.append(np.asarray(state.step_size))
    found = np.asarray(jax.jit(lambda: attacks.pgd(obj, xj, yj, jax.random.key(32), eps=eps,
                                                   steps=steps))())
    start = np.asarray(start)
  iterates, etas = np.stack(iterates, 1), np.stack(etas, 1)  # [n, steps, ...]
  for i in range(n):
    want_x, want_eta, want_best = numpy_apgd(
        lambda v, i=i: numpy_ce_and_gradient(params, v, y[i]), x[i], start[i], eps, steps,
        2 * eps)
    np.testing.assert_allclose(iterates[i], want_x, atol=1e-12, err_msg=str(i))
    np.testing.assert_array_equal(etas[i], want_eta, err_msg=str(i))
    np.testing.assert_allclose(found[i], want_best, atol=1e-12, err_msg=str(i))
  # The case exercises the schedule: steps cut 1 to several times, some examples restarted
  # from a best point that was not their last iterate.
  cuts = np.log2(2 * eps / etas[:, -1])
  assert cuts.min() >= 1 and cuts.max() >= 3 and len(set(cuts)) > 1, cuts
  assert np.any(np.any(found != iterates[:, -1], -1))


@pytest.mark.parametrize("eps", [0.03, 0.3, 1.0])
def test_apgd_never_leaves_the_ball_or_the_box(eps):
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tanh_mlp(33))
  obj = lambda xs, ys: attacks.attack_loss(tanh_mlp_apply(params, xs), ys, "margin")
  rng = np.random.default_rng(34)
  x = jnp.asarray(rng.choice([0.0, 0.02, 0.5, 0.98, 1.0], size=(64, D)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 64))
  steps = 30
  start = attacks.random_start_point(jax.random.key(35), x, eps)

  @jax.jit
  def trajectory():
    def body(state, _):
      state = attacks.apgd_update(obj, state, x, y, eps=eps, steps=steps)
      return state, (state.x, state.x_best)
    init = attacks.apgd_init(obj, start, y, step_size=2 * eps, steps=steps)
    return jnp.concatenate(jax.lax.scan(body, init, None, length=steps)[1])

  points = np.asarray(trajectory())  # every iterate and every best point
  assert np.all(np.abs(points - np.asarray(x)[None]) <= eps + 1e-6)
  assert points.min() >= 0.0 and points.max() <= 1.0
  assert np.abs(points - np.asarray(x)[None]).max() > 0.5 * min(eps, 0.5)  # it does move


def test_apgd_vmaps_over_eps_and_step_size_as_one_program():
  params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tanh_mlp(36))
  obj = lambda xs, ys: attacks.attack_loss(tanh_mlp_apply(params, xs), ys, "ce")
  x = points(37, 16)
  y = jnp.arange(16) % 3
  run = lambda eps, fraction: attacks.pgd(obj, x, y, jax.random.key(38), eps=eps, steps=12,
                                          step_size=fraction * eps)
  radii, fractions = jnp.asarray([0.05, 0.1, 0.2]), jnp.asarray([2.0, 1.0, 0.5])
  batched = jax.jit(jax.vmap(run))(radii, fractions)
  for i in range(3):
    np.testing.assert_allclose(batched[i], run(float(radii[i]), float(fractions[i])),
                               atol=1e-6)


def plateau_problem(n=64, d=4, eps=0.1):
  """A classifier that fixed-step PGD (step eps / 5, no random start) provably cannot break.

  Each example's wrong class wins only inside a ball of radius r = 0.01 around a point c
  whose every coordinate sits (j + 1/2) steps from the clean x (j in 0..3: inside the eps
  ball). Fixed-step iterates stay on the grid x + m * eps / 5 (the ball's faces x +- eps
  lie on it; the box is far), at least half a step from c in every coordinate: distance
  >= sqrt(d) * eps / 10 = 0.02 > r. Maximising the loss means moving towards c, so a
  step that shrinks gets there.
  """
  rng = np.random.default_rng(40)
  x = rng.uniform(0.3, 0.7, size=(n, d))
  step = eps / 5
  centre = x + step * (rng.integers(0, 4, size=(n, d)) + 0.5) * rng.choice([-1, 1], (n, d))
  radius_sq, curvature = 0.01 ** 2, 100.0  # logits within [-2, 0.01]: no underflow
  x, centre = jnp.asarray(x, jnp.float32), jnp.asarray(centre, jnp.float32)

  def logits(inputs):
    wrong = curvature * (radius_sq - jnp.sum((inputs - centre) ** 2, -1))
    return jnp.stack([jnp.zeros_like(wrong), wrong], -1)

  return x, jnp.zeros(n, jnp.int32), logits


def test_apgd_breaks_a_problem_where_fixed_step_pgd_plateaus():
  eps = 0.1
  x, y, logits = plateau_problem(eps=eps)
  obj = lambda xs, ys: attacks.attack_loss(logits(xs), ys, "ce")
  key = jax.random.key(41)

  @functools.partial(jax.jit, static_argnames=("schedule", "steps", "random_start"))
  def attack(schedule, steps, random_start=False):
    x_adv = attacks.pgd(obj, x, y, key, eps=eps, steps=steps, schedule=schedule,
                        random_start=random_start)
    return jnp.mean(attacks.predicts(logits, x_adv, y)), jnp.mean(obj(x_adv, y))

  assert float(jnp.mean(attacks.predicts(logits, x, y))) == 1.0
  fixed = {steps: attack("fixed", steps) for steps in (20, 100, 400)}
  # The plateau: more fixed steps never break a point, and the loss stops rising.
  assert all(float(accuracy) == 1.0 for accuracy, _ in fixed.values())
  assert float(fixed[400][1]) == pytest.approx(float(fixed[100][1]), rel=1e-6)
  apgd_accuracy, apgd_loss = attack("apgd", 100)
  assert float(apgd_accuracy) == 0.0 and float(apgd_loss) > float(fixed[400][1])
  assert float(attack("apgd", 100, random_start=True)[0]) == 0.0


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
              accuracy_by_target={"ensemble": 0.3, "mean_logits": 0.32, "max_member": 0.31},
              large_eps_single_step_accuracy=0.05, accuracy_by_refinement={1: 0.35, 2: 0.33})
  checks = attacks.gradient_masking_checks(**good)
  assert checks == {"large_eps_accuracy_near_zero": True, "pgd_not_weaker_than_fgsm": True,
                    "more_steps_never_raise_accuracy": True,
                    "more_restarts_never_raise_accuracy": True,
                    "transfer_not_stronger_than_white_box": True,
                    "ensemble_target_not_masked": True,
                    "large_eps_single_step_accuracy_near_zero": True,
                    "finer_steps_do_not_lower_accuracy": True}
  # The optional checks are absent without their inputs.
  optional = ("accuracy_by_target", "large_eps_single_step_accuracy", "accuracy_by_refinement")
  assert len(attacks.gradient_masking_checks(
      **{k: v for k, v in good.items() if k not in optional})) == 5
  # The refinement tolerance (default 0.02) is the largest drop that passes.
  refined = lambda finer, **tolerance: attacks.gradient_masking_checks(
      **{**good, "accuracy_by_refinement": {1: 0.35, 2: finer}}, **tolerance)[
          "finer_steps_do_not_lower_accuracy"]
  assert refined(0.33) and not refined(0.325) and refined(0.325, refinement_tolerance=0.05)
  bad = {
      "large_eps_accuracy_near_zero": dict(large_eps_accuracy=0.3),
      "pgd_not_weaker_than_fgsm": dict(pgd_accuracy={0.1: 0.6, 0.2: 0.1}),
      "more_steps_never_raise_accuracy": dict(accuracy_by_steps={10: 0.3, 50: 0.4}),
      "more_restarts_never_raise_accuracy": dict(accuracy_by_restarts={1: 0.3, 5: 0.31}),
      "transfer_not_stronger_than_white_box": dict(transfer_accuracy=[{0.1: 0.1, 0.2: 0.4}]),
      "ensemble_target_not_masked": dict(
          accuracy_by_target={"ensemble": 0.5, "mean_logits": 0.1, "max_member": 0.3}),
      "large_eps_single_step_accuracy_near_zero": dict(large_eps_single_step_accuracy=0.1),
      "finer_steps_do_not_lower_accuracy": dict(accuracy_by_refinement={1: 0.35, 2: 0.3,
                                                                        4: 0.36}),
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
  with pytest.raises(ValueError, match="schedule='cosine' is not one of"):
    attacks.make_attack("pgd", objective(params, "ce"), eps=0.1, schedule="cosine")
  with pytest.raises(ValueError, match="schedule='cosine' is not one of"):
    attacks.pgd(objective(params, "ce"), points(0, 2), jnp.zeros(2, jnp.int32),
                jax.random.key(0), eps=0.1, steps=1, schedule="cosine")
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
