"""Stacked ensembles and the NCEn / GAL / ADP / TRS loss terms against plain references."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpe_jax import ensemble, sharding, train
from fpe_jax.models import cnn

M, B, C, D = 3, 6, 4, 5


def linear_apply(params, x):
  return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]


def linear_members(key, members=M, d=D, classes=C):
  k1, k2 = jax.random.split(key)
  return {"w": jax.random.normal(k1, (members, d, classes)),
          "b": 0.1 * jax.random.normal(k2, (members, classes))}


def linear_batch(seed=0, members=M):
  """Stacked linear members, x [B, D] and labels [B]."""
  stacked = linear_members(jax.random.key(seed), members=members)
  x = jax.random.normal(jax.random.key(seed + 1), (B, D))
  return stacked, x, jnp.arange(B) % C


def loss_value(loss_fn, stacked, x, y):
  """A `train.LossFn` of dense members: no masks, no step key."""
  return loss_fn(stacked, None, x, y, None)


def np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def np_cosine(a, b):
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def random_grads(seed=0, members=M, batch=B, shape=(2, 3)):
  return np.random.default_rng(seed).normal(size=(members, batch, *shape)).astype(np.float32)


# --------------------------------------------------------------------------- members


def test_vmapped_ensemble_equals_loop_over_members():
  config = cnn.CNNConfig(width=4, hidden=8)
  stacked = ensemble.init_members(lambda k: cnn.init_cnn(k, config), jax.random.key(0), M)
  x = jax.random.uniform(jax.random.key(1), (B, 28, 28, 1))
  apply = lambda p, xb: cnn.apply_cnn(p, xb, config)
  got = jax.jit(lambda s, xb: ensemble.member_logits(apply, s, xb))(stacked, x)
  loop = np.stack([jax.jit(apply)(p, x) for p in ensemble.unstack_members(stacked)])
  np.testing.assert_allclose(got, loop, rtol=1e-5, atol=1e-5)
  unrolled = jax.jit(lambda s, xb: ensemble.member_logits(apply, s, xb, "unroll"))(stacked, x)
  np.testing.assert_allclose(unrolled, loop, rtol=1e-5, atol=1e-5)
  probs = np_softmax(np.asarray(loop, np.float64)).mean(0)
  np.testing.assert_allclose(ensemble.combine_logits(got), np.log(probs), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(ensemble.combine_logits(got, "mean_logits"), loop.mean(0),
                             rtol=1e-5, atol=1e-5)


def test_members_are_distinct_and_stack_roundtrips():
  stacked = linear_members(jax.random.key(0))
  members = ensemble.unstack_members(stacked)
  assert len(members) == M and ensemble.num_members(stacked) == M
  assert not np.allclose(members[0]["w"], members[1]["w"])
  chex.assert_trees_all_equal(ensemble.stack_members(members), stacked)


def test_input_gradients_match_linear_closed_form():
  stacked, x, y = linear_batch()
  ce, logits, grads = jax.jit(ensemble.input_gradients, static_argnums=0)(
      linear_apply, stacked, x, y)
  chex.assert_shape(grads, (M, B, D))
  for i in range(M):
    w, b = np.asarray(stacked["w"][i]), np.asarray(stacked["b"][i])
    z = np.asarray(x) @ w + b
    p = np_softmax(z)
    onehot = np.eye(C)[np.asarray(y)]
    np.testing.assert_allclose(logits[i], z, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ce[i], -np.log((p * onehot).sum(-1)), rtol=1e-5)
    # d CE / d x = W (p - onehot) for a linear softmax classifier.
    np.testing.assert_allclose(grads[i], (p - onehot) @ w.T, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------- loss terms


def test_pairwise_cosine_and_direction_term():
  g = random_grads()
  cos = np.asarray(ensemble.pairwise_cosine(jnp.asarray(g)))
  flat = g.reshape(M, B, -1)
  for i, j, b in itertools.product(range(M), range(M), range(B)):
    np.testing.assert_allclose(cos[i, j, b], np_cosine(flat[i, b], flat[j, b]), rtol=1e-5,
                               atol=1e-6)
  reference = np.mean([np_cosine(flat[i, b], flat[j, b])
                       for i, j in itertools.combinations(range(M), 2) for b in range(B)])
  np.testing.assert_allclose(ensemble.direction_term(jnp.asarray(g)), reference, rtol=1e-5)
  identical = np.broadcast_to(g[:1], g.shape)
  np.testing.assert_allclose(ensemble.direction_term(jnp.asarray(identical)), 1.0, rtol=1e-6)
  opposite = np.stack([g[0], -g[0]])
  np.testing.assert_allclose(ensemble.direction_term(jnp.asarray(opposite)), -1.0, rtol=1e-6)


def test_magnitude_term_is_batch_correlation_of_gradient_norms():
  g = random_grads(1)
  norms = np.linalg.norm(g.reshape(M, B, -1), axis=-1)
  reference = np.mean([np.corrcoef(norms[i], norms[j])[0, 1]
                       for i, j in itertools.combinations(range(M), 2)])
  np.testing.assert_allclose(ensemble.magnitude_term(jnp.asarray(g)), reference, rtol=1e-4)
  # Members whose gradients are positive multiples of one another: correlation 1.
  scaled = np.stack([g[0], 3.0 * g[0], 0.5 * g[0]])
  np.testing.assert_allclose(ensemble.magnitude_term(jnp.asarray(scaled)), 1.0, rtol=1e-5)


def test_liu_yao_term_literal_and_closed_form():
  g = random_grads(2)
  flat = g.reshape(M, B, -1).astype(np.float64)
  gbar = flat.mean(0)
  literal = np.mean([sum((flat[i, b] - gbar[b]) @ sum(flat[j, b] - gbar[b]
                                                      for j in range(M) if j != i)
                         for i in range(M)) for b in range(B)])
  closed = -np.mean(np.sum((flat - gbar) ** 2, axis=(0, 2)))
  np.testing.assert_allclose(literal, closed, rtol=1e-10)
  np.testing.assert_allclose(ensemble.liu_yao_term(jnp.asarray(g)), literal, rtol=1e-4)
  identical = np.broadcast_to(g[:1], g.shape)
  np.testing.assert_allclose(ensemble.liu_yao_term(jnp.asarray(identical)), 0.0, atol=1e-6)


def test_gal_and_trs_terms():
  g = random_grads(3)
  flat = g.reshape(M, B, -1)
  pairs = list(itertools.combinations(range(M), 2))
  gal = np.mean([np.log(sum(np.exp(np_cosine(flat[i, b], flat[j, b])) for i, j in pairs))
                 for b in range(B)])
  np.testing.assert_allclose(ensemble.gal_term(jnp.asarray(g)), gal, rtol=1e-5)
  identical = jnp.asarray(np.broadcast_to(g[:1], g.shape))
  np.testing.assert_allclose(ensemble.gal_term(identical), np.log(len(pairs)) + 1.0, rtol=1e-6)
  abs_cos = np.mean([abs(np_cosine(flat[i, b], flat[j, b])) for i, j in pairs for b in range(B)])
  np.testing.assert_allclose(ensemble.trs_cosine_term(jnp.asarray(g)), abs_cos, rtol=1e-5)
  np.testing.assert_allclose(ensemble.mean_squared_gradient_norm(jnp.asarray(g)),
                             np.mean(np.sum(flat**2, -1)), rtol=1e-5)


def test_adp_entropy_and_log_det():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(M, B, C)).astype(np.float32)
  labels = rng.integers(0, C, size=B)
  probs = np_softmax(logits.astype(np.float64))
  mean = probs.mean(0)
  np.testing.assert_allclose(ensemble.ensemble_entropy(jnp.asarray(logits)),
                             np.mean(-np.sum(mean * np.log(mean), -1)), rtol=1e-5)
  uniform = jnp.zeros((M, B, C))
  np.testing.assert_allclose(ensemble.ensemble_entropy(uniform), np.log(C), rtol=1e-6)
  offset = 1e-6
  log_dets = []
  for b in range(B):
    q = np.delete(probs[:, b], labels[b], axis=-1)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    log_dets.append(np.linalg.slogdet(q @ q.T + offset * np.eye(M))[1])
  np.testing.assert_allclose(ensemble.adp_log_det(jnp.asarray(logits), jnp.asarray(labels)),
                             np.mean(log_dets), rtol=1e-3)
  # Identical members: Gram = 11^T + offset I, det = offset^(M-1) (M + offset).
  same = jnp.broadcast_to(jnp.asarray(logits[:1]), logits.shape)
  np.testing.assert_allclose(ensemble.adp_log_det(same, jnp.asarray(labels), det_offset=1e-2),
                             (M - 1) * np.log(1e-2) + np.log(M + 1e-2), rtol=1e-4)


def test_losses_combine_their_terms():
  stacked, x, y = linear_batch()
  ce, logits, grads = jax.jit(ensemble.input_gradients, static_argnums=0)(
      linear_apply, stacked, x, y)
  ce_sum = float(jnp.sum(jnp.mean(ce, axis=1)))
  config = ensemble.LossConfig(lam_dir=0.7, lam_mag=0.3, lam_ncl=0.01, gal_lam=0.5,
                               adp_alpha=2.0, adp_beta=0.5, trs_coeff=2.0, trs_lam=3.0,
                               trs_scale=0.5, trs_plus_adv=False)
  expected = {
      "independent": ce_sum,
      "ncen": ce_sum + 0.7 * ensemble.direction_term(grads)
              + 0.3 * ensemble.magnitude_term(grads) + 0.01 * ensemble.liu_yao_term(grads),
      "gal": float(jnp.mean(ce)) + 0.5 * ensemble.gal_term(grads),
      "adp": ce_sum - 2.0 * ensemble.ensemble_entropy(logits)
             - 0.5 * ensemble.adp_log_det(logits, y),
      "trs": ce_sum + 0.5 * (2.0 * ensemble.trs_cosine_term(grads / B)
                             + 3.0 * ensemble.trs_smoothness(grads / B)),
      "trs_per_example": ce_sum + 0.5 * (2.0 * ensemble.trs_cosine_term(grads)
                                         + 3.0 * 2.0 * ensemble.mean_squared_gradient_norm(grads)),
  }
  for name, value in expected.items():
    loss_fn = ensemble.make_loss(linear_apply, config._replace(name=name), M)
    loss, metrics = jax.jit(functools.partial(loss_value, loss_fn))(stacked, x, y)
    np.testing.assert_allclose(loss, value, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(metrics["loss"], loss)


def test_unrolled_members_give_the_same_loss_and_gradients():
  stacked, x, y = linear_batch()
  for name in ("ncen", "adp"):
    grads = [jax.jit(jax.grad(lambda p, m=m, name=name: loss_value(ensemble.make_loss(
        linear_apply, ensemble.LossConfig(name=name, member_map=m), M), p, x, y)[0]))(stacked)
             for m in ensemble.MEMBER_MAPS]
    chex.assert_trees_all_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="member_map='pmap' is not one of"):
    ensemble.make_loss(linear_apply, ensemble.LossConfig(member_map="pmap"), M)


def test_double_backprop_matches_closed_form_input_gradient():
  """d(NCEn)/d(params) through jax.grad_x equals autodiff of the closed-form g = W (p - y)."""
  stacked, x, y = linear_batch(5)
  config = ensemble.LossConfig(name="ncen", lam_dir=1.0, lam_mag=0.5, lam_ncl=0.1)

  def reference_loss(params):
    logits = jnp.einsum("bd,mdc->mbc", x, params["w"]) + params["b"][:, None]
    p = jax.nn.softmax(logits, -1)
    onehot = jax.nn.one_hot(y, C)
    grads = jnp.einsum("mbc,mdc->mbd", p - onehot, params["w"])
    ce = -jnp.sum(jax.nn.log_softmax(logits, -1) * onehot, -1)
    return (jnp.sum(jnp.mean(ce, 1)) + ensemble.direction_term(grads)
            + 0.5 * ensemble.magnitude_term(grads) + 0.1 * ensemble.liu_yao_term(grads))

  loss_fn = ensemble.make_loss(linear_apply, config, M)
  got = jax.jit(jax.grad(lambda p: loss_value(loss_fn, p, x, y)[0]))(stacked)
  want = jax.jit(jax.grad(reference_loss))(stacked)
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(got["w"]).sum()) > 0


def test_ncen_training_lowers_gradient_cosine_against_independent():
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(64, D)), jnp.float32)
  y = jnp.asarray(np.argmax(np.asarray(x)[:, :C], -1))
  stacked = linear_members(jax.random.key(8))
  optimizer = train.make_optimizer("adam", 0.05)
  cosines = {}
  for name in ("independent", "ncen"):
    loss_fn = ensemble.make_loss(linear_apply, ensemble.LossConfig(name=name, lam_mag=0.0), M)
    chunk = jax.jit(train.make_train_chunk(loss_fn, optimizer, batch_size=64, steps=40))
    state, metrics = chunk(train.init_state(stacked, optimizer), x, y, jax.random.key(9))
    assert int(state.step) == 40
    stats = jax.jit(ensemble.gradient_statistics, static_argnums=0)(linear_apply, state.params,
                                                                     x, y)
    cosines[name] = float(stats["mean_pairwise_cosine"])
    assert np.isfinite(metrics["loss"])
  assert cosines["ncen"] < cosines["independent"] - 0.2, cosines


# --------------------------------------------------------------------------- TRS, official


TRS_BATCH, TRS_DIM = 5, 6  # an odd batch: 2 clean examples, 3 perturbed


def trs_problem(seed=0):
  """Three linear members on [TRS_BATCH, TRS_DIM] inputs in [0, 1] (some at 0 or 1)."""
  stacked = linear_members(jax.random.key(seed), d=TRS_DIM)
  x = jax.random.uniform(jax.random.key(seed + 1), (TRS_BATCH, TRS_DIM))
  x = x.at[0, :2].set(jnp.array([0.0, 1.0]))
  return stacked, x, jnp.arange(TRS_BATCH) % C


def member_mean_ce(params, x, y):
  """One member's batch-mean cross-entropy (torch's nn.CrossEntropyLoss())."""
  log_probs = jax.nn.log_softmax(linear_apply(params, x))
  return -jnp.mean(jnp.take_along_axis(log_probs, y[:, None], axis=1))


def official_mean_ce_grads(stacked, x, y):
  """[M, B, D] numpy: each member's input gradient of its batch-MEAN CE, by plain jax.grad
  of that member alone (TRS_Trainer's autograd.grad(criterion(model_j(x), y), x))."""
  return np.stack([np.asarray(jax.grad(member_mean_ce, argnums=1)(p, x, y), np.float64)
                   for p in ensemble.unstack_members(stacked)])


def official_mean_ce(stacked, x, y):
  logits = np.asarray(ensemble.member_logits(linear_apply, stacked, x), np.float64)
  return -np.log(np_softmax(logits)[:, np.arange(len(y)), np.asarray(y)]).mean(1)  # [M]


def official_cos(h):
  """Mean over pairs of mean_b |cos| (utils_ensemble.Cosine: torch's eps 1e-8)."""
  return np.mean([np.mean([abs(h[i, b] @ h[j, b]) / max(np.linalg.norm(h[i, b])
                                                         * np.linalg.norm(h[j, b]), 1e-8)
                           for b in range(h.shape[1])])
                  for i, j in itertools.combinations(range(h.shape[0]), 2)])


def official_smoothness(h):
  """Mean over members of utils_ensemble.Magnitude: 2 * mean_b ||h_b||^2."""
  return np.mean([2.0 * np.mean(np.sum(h[i] ** 2, -1)) for i in range(h.shape[0])])


def official_pgd(stacked, x, y, key, eps, steps=6):
  """trainer.PGD written out: uniform start clamped to [0, 1], `steps` sign steps of eps / 3
  up the members' mean Magnitude of their mean-CE input gradients, min/max projection onto
  the eps ball, clamp to [0, 1]."""
  members = ensemble.unstack_members(stacked)

  def grad_loss(inputs):
    magnitudes = [2.0 * jnp.mean(jnp.sum(jax.grad(member_mean_ce, argnums=1)(p, inputs, y) ** 2,
                                         -1)) for p in members]
    return sum(magnitudes) / len(members)

  adv = jnp.clip(x + jax.random.uniform(key, x.shape, x.dtype, -eps, eps), 0.0, 1.0)
  for _ in range(steps):
    adv = adv + eps / 3.0 * jnp.sign(jax.grad(grad_loss)(adv))
    adv = jnp.clip(jnp.maximum(jnp.minimum(adv, x + eps), x - eps), 0.0, 1.0)
  return adv


TRS_CONFIG = ensemble.LossConfig(name="trs", trs_adv_ramp_steps=100)  # official defaults


def trs_value(config, stacked, x, y, step_key=None, step=None):
  loss_fn = ensemble.make_loss(linear_apply, config, M)
  return jax.jit(loss_fn)(stacked, None, x, y, step_key, step)


def test_trs_defaults_are_the_official_launchers():
  config = ensemble.DEFAULT_LOSS_CONFIG
  assert (config.trs_scale, config.trs_coeff, config.trs_lam) == (5.0, 2.0, 2.0)
  assert config.trs_plus_adv and config.trs_adv_steps == 6
  assert (config.trs_adv_eps_start, config.trs_adv_eps_end) == (0.1, 0.2)
  assert ensemble.TRS_ADV_STEP_FRACTION == 1.0 / 3.0


def test_trs_terms_on_the_clean_batch_are_the_official_formulas():
  stacked, x, y = trs_problem()
  loss, metrics = trs_value(TRS_CONFIG._replace(trs_plus_adv=False), stacked, x, y)
  h = official_mean_ce_grads(stacked, x, y)
  ce = official_mean_ce(stacked, x, y)
  cos, smooth = official_cos(h), official_smoothness(h)
  np.testing.assert_allclose(metrics["abs_cosine"], cos, rtol=1e-5)
  np.testing.assert_allclose(metrics["smoothness"], smooth, rtol=1e-5)
  np.testing.assert_allclose(loss, ce.sum() + 5.0 * (2.0 * cos + 2.0 * smooth), rtol=1e-5)
  # The batch-mean CE's gradient carries 1/B: the smoothness is 1/B^2 of the per-example one.
  per_example = np.asarray(ensemble.input_gradients(linear_apply, stacked, x, y)[2])
  np.testing.assert_allclose(smooth * TRS_BATCH**2,
                             2.0 * np.mean(np.sum(per_example**2, -1)), rtol=1e-5)
  assert "adv_eps" not in metrics


def test_trs_plus_adv_smoothness_is_on_the_clean_and_perturbed_halves():
  stacked, x, y = trs_problem(1)
  step_key, step = jax.random.key(3), 50
  loss, metrics = trs_value(TRS_CONFIG, stacked, x, y, step_key, step)
  eps = 0.15  # halfway up the ramp
  np.testing.assert_allclose(metrics["adv_eps"], eps, rtol=1e-6)
  clean = TRS_BATCH // 2
  perturbed = official_pgd(stacked, x[clean:], y[clean:], jax.random.fold_in(step_key, 1), eps)
  smooth_x = jnp.concatenate([x[:clean], perturbed])
  h_clean = official_mean_ce_grads(stacked, x, y)
  h_smooth = official_mean_ce_grads(stacked, smooth_x, y)  # mean CE over all B
  cos, smooth = official_cos(h_clean), official_smoothness(h_smooth)
  np.testing.assert_allclose(metrics["abs_cosine"], cos, rtol=1e-5)
  np.testing.assert_allclose(metrics["smoothness"], smooth, rtol=1e-4)
  np.testing.assert_allclose(loss, official_mean_ce(stacked, x, y).sum()
                             + 5.0 * (2.0 * cos + 2.0 * smooth), rtol=1e-5)
  assert smooth > official_smoothness(h_clean)  # the perturbed half is rougher
  # The parameter gradient treats the perturbed inputs as constants.
  def reference(params):
    def term(inputs):
      hs = jax.vmap(lambda p: jax.grad(member_mean_ce, argnums=1)(p, inputs, y))(params)
      return hs.reshape(M, TRS_BATCH, -1)
    ce_sum = sum(member_mean_ce(p, x, y) for p in ensemble.unstack_members(params))
    return ce_sum + 5.0 * (2.0 * ensemble.trs_cosine_term(term(x))
                           + 2.0 * ensemble.trs_smoothness(term(smooth_x)))
  loss_fn = ensemble.make_loss(linear_apply, TRS_CONFIG, M)
  got = jax.jit(jax.grad(lambda p: loss_fn(p, None, x, y, step_key, step)[0]))(stacked)
  chex.assert_trees_all_close(got, jax.jit(jax.grad(reference))(stacked), rtol=1e-4, atol=1e-6)


def test_trs_perturbation_stays_in_the_ball_and_box_and_roughens_the_members():
  stacked, x, y = trs_problem(2)
  key = jax.random.key(4)
  for eps in (0.1, 0.3):
    adv = jax.jit(ensemble.trs_smoothness_perturbation, static_argnums=(0, 6))(
        linear_apply, stacked, x, y, key, eps, 6)
    np.testing.assert_allclose(adv, official_pgd(stacked, x, y, key, eps), rtol=1e-6,
                               atol=1e-7)
    assert float(jnp.max(jnp.abs(adv - x))) <= eps + 1e-6
    assert float(jnp.min(adv)) >= 0.0 and float(jnp.max(adv)) <= 1.0
    assert float(jnp.max(jnp.abs(adv - x))) > 0.5 * eps  # it moved
    # A property: the members' gradient magnitude is larger at the perturbed point.
    before = official_smoothness(official_mean_ce_grads(stacked, x, y))
    after = official_smoothness(official_mean_ce_grads(stacked, adv, y))
    assert after > before, (eps, before, after)


def test_trs_radius_ramps_linearly_over_the_ramp_steps():
  config = TRS_CONFIG._replace(trs_adv_ramp_steps=100)
  for step, want in [(0, 0.1), (50, 0.15), (99, 0.1 + 0.1 * 99 / 100), (100, 0.2), (150, 0.2)]:
    np.testing.assert_allclose(jax.jit(ensemble.trs_adv_eps, static_argnums=0)(config, step),
                               want, rtol=1e-6, err_msg=str(step))
  # In training: the chunk passes each step (with_step=True); metrics are chunk means.
  stacked, x, y = trs_problem(3)
  optimizer = train.make_optimizer("adam", 1e-2)
  loss_fn = ensemble.make_loss(linear_apply, config._replace(trs_adv_ramp_steps=4), M)
  chunk = jax.jit(train.make_train_chunk(loss_fn, optimizer, batch_size=TRS_BATCH, steps=4,
                                         with_step=True))
  state, metrics = chunk(train.init_state(stacked, optimizer), x, y, jax.random.key(5))
  np.testing.assert_allclose(metrics["adv_eps"], np.mean([0.1, 0.125, 0.15, 0.175]), rtol=1e-6)
  assert int(state.step) == 4 and np.isfinite(metrics["loss"])


def test_trs_per_example_is_the_official_smoothness_times_b_squared():
  stacked, x, y = trs_problem(4)
  config = TRS_CONFIG._replace(trs_plus_adv=False, trs_scale=1.0)
  official, official_metrics = trs_value(config, stacked, x, y)
  old, old_metrics = trs_value(config._replace(name="trs_per_example"), stacked, x, y)
  np.testing.assert_allclose(2.0 * old_metrics["sq_grad_norm"],
                             TRS_BATCH**2 * official_metrics["smoothness"], rtol=1e-5)
  np.testing.assert_allclose(old_metrics["abs_cosine"], official_metrics["abs_cosine"],
                             rtol=1e-5)
  ce_sum = official_mean_ce(stacked, x, y).sum()
  cos_part = 2.0 * official_metrics["abs_cosine"]
  np.testing.assert_allclose(old - ce_sum - cos_part,
                             TRS_BATCH**2 * (official - ce_sum - cos_part), rtol=1e-4)
  # trs_plus_adv does not change the per-example variant.
  again, _ = trs_value(config._replace(name="trs_per_example", trs_plus_adv=True), stacked, x, y)
  np.testing.assert_allclose(again, old, rtol=1e-6)


def test_ncen_smoothness_adds_trs_smoothness_term_as_trs_computes_it():
  stacked, x, y = trs_problem(5)
  ncen = ensemble.LossConfig(name="ncen", lam_dir=0.7, lam_mag=0.3, trs_adv_ramp_steps=100)
  plain, plain_metrics = trs_value(ncen, stacked, x, y)
  assert "smoothness" not in plain_metrics
  # On the clean batch: + scale * lam * the official Magnitude of the mean-CE gradients.
  clean = ncen._replace(ncen_smoothness=True, trs_plus_adv=False, trs_lam=3.0)
  loss, metrics = trs_value(clean, stacked, x, y)
  smooth = official_smoothness(official_mean_ce_grads(stacked, x, y))
  np.testing.assert_allclose(metrics["smoothness"], smooth, rtol=1e-5)
  np.testing.assert_allclose(loss, plain + 5.0 * 3.0 * smooth, rtol=1e-5)
  np.testing.assert_allclose(metrics["cosine"], plain_metrics["cosine"], rtol=1e-6)
  # With trs_plus_adv: TRS's own perturbed term, from the same key and step.
  step_key, step = jax.random.key(6), 50
  loss, metrics = trs_value(ncen._replace(ncen_smoothness=True), stacked, x, y, step_key, step)
  _, trs_metrics = trs_value(TRS_CONFIG, stacked, x, y, step_key, step)
  np.testing.assert_allclose(metrics["smoothness"], trs_metrics["smoothness"], rtol=1e-6)
  np.testing.assert_allclose(metrics["adv_eps"], 0.15, rtol=1e-6)
  np.testing.assert_allclose(loss, plain + 5.0 * 2.0 * trs_metrics["smoothness"], rtol=1e-5)
  with pytest.raises(ValueError, match="loss='ncen' with trs_plus_adv ramps its radius"):
    ensemble.make_loss(linear_apply, ncen._replace(ncen_smoothness=True, trs_adv_ramp_steps=0), M)
  # ncen_smoothness means nothing to the other losses: GAL stays deterministic.
  ensemble.make_loss(linear_apply, ensemble.LossConfig(name="gal", ncen_smoothness=True), M)


def test_trs_settings_are_checked():
  with pytest.raises(ValueError, match="trs_adv_ramp_steps=0: loss='trs' with trs_plus_adv"):
    ensemble.make_loss(linear_apply, ensemble.LossConfig(name="trs"), M)
  ensemble.make_loss(linear_apply, ensemble.LossConfig(name="trs", trs_plus_adv=False), M)
  for field, value, message in [("trs_adv_eps_start", -0.1, "must be a finite number >= 0"),
                                ("trs_adv_eps_end", float("inf"), "must be a finite number"),
                                ("trs_adv_steps", 0, "must be >= 1"),
                                ("trs_adv_ramp_steps", -1, "must be >= 0")]:
    with pytest.raises(ValueError, match=f"{field}=.*{message}"):
      ensemble.make_loss(linear_apply, TRS_CONFIG._replace(**{field: value}), M)
  stacked, x, y = trs_problem()
  with pytest.raises(ValueError, match="pass step"):
    ensemble.make_loss(linear_apply, TRS_CONFIG, M)(stacked, None, x, y, jax.random.key(0))


# --------------------------------------------------------------------------- errors, sharding


def test_bad_arguments_raise_one_line_errors():
  with pytest.raises(ValueError, match="loss='nope' is not one of"):
    ensemble.make_loss(linear_apply, ensemble.LossConfig(name="nope"), M)
  for name in ensemble.CORRELATION_LOSSES:
    with pytest.raises(ValueError, match="num_members=1.*needs num_members >= 2"):
      ensemble.make_loss(linear_apply, ensemble.LossConfig(name=name), 1)
  ensemble.make_loss(linear_apply, ensemble.LossConfig(name="independent"), 1)
  with pytest.raises(ValueError, match="combine='median'"):
    ensemble.combine_logits(jnp.zeros((M, B, C)), "median")
  with pytest.raises(ValueError, match="inconsistent leading"):
    ensemble.num_members({"a": jnp.zeros((2, 3)), "b": jnp.zeros((3, 3))})


def test_member_axis_shards_over_mesh():
  members = 4
  mesh = sharding.make_mesh({"member": 4}, devices=jax.devices()[:4])
  stacked, x, _ = linear_batch(9, members=members)
  sharded = ensemble.shard_members(stacked, mesh)
  assert sharded["w"].sharding.spec[0] == "member"
  assert len(sharded["w"].addressable_shards) == 4
  assert sharded["w"].addressable_shards[0].data.shape == (1, D, C)
  np.testing.assert_allclose(
      jax.jit(lambda s: ensemble.member_logits(linear_apply, s, x))(sharded),
      ensemble.member_logits(linear_apply, stacked, x), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="3 members cannot be split"):
    ensemble.member_sharding(linear_members(jax.random.key(0), members=3), mesh)


@pytest.mark.parametrize("data, member, member_map", [(4, 2, "vmap"), (8, 1, "unroll")])
def test_training_on_a_data_member_mesh_gives_the_one_device_params(data, member, member_map):
  """What experiments.ncen does on a `data` x `member` mesh, against one device."""
  assert len(jax.devices()) == 8, "conftest fakes 8 CPU devices"
  members, batch, steps = 2, 16, 3
  config = cnn.CNNConfig(width=2, hidden=8, activation="leaky_relu")
  images = jax.random.uniform(jax.random.key(1), (64, 28, 28, 1))
  labels = jax.random.randint(jax.random.key(2), (64,), 0, 10)
  stacked = ensemble.init_members(functools.partial(cnn.init_cnn, config=config),
                                  jax.random.key(0), members)
  optimizer = train.make_optimizer("adam", 1e-2)

  def trained(loss_config, mesh=None):
    loss_fn = ensemble.make_loss(functools.partial(cnn.apply_cnn, config=config), loss_config,
                                 members)
    params, x, y = stacked, images, labels
    batch_sharding = None
    if mesh is not None:
      params = ensemble.shard_members(stacked, mesh)
      x, y = (jax.device_put(a, sharding.replicated(mesh)) for a in (images, labels))
      batch_sharding = sharding.batch_sharding(mesh, x.ndim)
    chunk = jax.jit(train.make_train_chunk(loss_fn, optimizer, batch_size=batch, steps=steps,
                                           batch_sharding=batch_sharding))
    state, metrics = chunk(train.init_state(params, optimizer), x, y, jax.random.key(3))
    return state.params, metrics

  mesh = sharding.make_mesh({"data": data, "member": member})
  loss_config = ensemble.LossConfig(name="ncen", member_map=member_map)
  got, got_metrics = trained(loss_config, mesh)
  assert len(got["dense1"]["w"].sharding.device_set) == 8
  # The reference: one device, members unrolled (the 1-device default of experiments.ncen).
  want, want_metrics = trained(loss_config._replace(member_map="unroll"))
  assert {d for leaf in jax.tree.leaves(want) for d in leaf.devices()} == {jax.devices()[0]}
  # Equal up to float order: the mesh sums gradients across devices in another order
  # (3 Adam steps; jax 0.12 reaches 1.4e-4 relative on one weight of 3,136).
  chex.assert_trees_all_close(got, want, rtol=5e-4, atol=1e-6)
  chex.assert_trees_all_close(got_metrics, want_metrics, rtol=5e-4, atol=1e-6)
