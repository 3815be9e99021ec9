"""Training chunks: masks hold, vmap over runs == a loop, data parallel == one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fpe_jax import nn, sharding, train


def _problem(seed, n=256, d=6):
  x = jax.random.normal(jax.random.key(seed), (n, d))
  y = (x[:, 0] * x[:, 1] > 0).astype(jnp.int32)
  return x, y


def _state(seed, optimizer, sizes=(6, 8, 1), sparsity=0.5):
  params = nn.init_mlp(jax.random.key(seed), list(sizes))
  keep = jax.random.bernoulli(jax.random.key(seed + 100), 1 - sparsity, (sizes[0], sizes[1]))
  masks = nn.full_masks(params)
  masks["dense_0"]["w"] = keep.astype(jnp.float32)
  return train.init_state(params, optimizer, masks)


def _chunk(optimizer, steps=50, **kw):
  return train.make_train_chunk(train.supervised_loss(nn.apply_mlp, train.sigmoid_bce),
                                optimizer, batch_size=32, steps=steps, **kw)


def test_off_mask_weights_stay_exactly_zero_and_loss_falls():
  optimizer = train.make_optimizer("adam", 1e-2)
  state = _state(0, optimizer)
  x, y = _problem(0)
  chunk = jax.jit(_chunk(optimizer, steps=200))
  _, first = chunk(state, x, y, jax.random.key(1))
  for _ in range(3):
    state, metrics = chunk(state, x, y, jax.random.key(1))
  assert float(metrics["loss"]) < float(first["loss"])
  off = state.params["dense_0"]["w"] * (1 - state.masks["dense_0"]["w"])
  assert np.all(np.asarray(off) == 0.0)
  assert int(state.step) == 600


def test_vmap_over_runs_equals_a_loop():
  optimizer = train.make_optimizer("adam", 1e-2)
  chunk = _chunk(optimizer)
  states = [_state(s, optimizer) for s in range(3)]
  data = [_problem(s) for s in range(3)]
  keys = [jax.random.key(10 + s) for s in range(3)]
  stack = lambda trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)
  batched, losses = jax.jit(jax.vmap(chunk))(
      stack(states), stack([d[0] for d in data]), stack([d[1] for d in data]), stack(keys))
  for i in range(3):
    single, loss = jax.jit(chunk)(states[i], *data[i], keys[i])
    np.testing.assert_allclose(losses["loss"][i], loss["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(single.params),
                    jax.tree.leaves(jax.tree.map(lambda t, i=i: t[i], batched.params)),
                    strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_data_parallel_over_8_devices_equals_one_device():
  assert len(jax.devices()) == 8, "tests/conftest.py fakes 8 CPU devices"
  optimizer = train.make_optimizer("sgd", 0.1)
  mesh = sharding.make_mesh()
  assert mesh.shape == {"data": 8}
  state = _state(0, optimizer)
  x, y = _problem(0)
  single, loss1 = jax.jit(_chunk(optimizer))(state, x, y, jax.random.key(3))
  parallel_fn = jax.jit(jax.vmap(_chunk(optimizer,
                                        batch_sharding=sharding.batch_sharding(mesh, 2))))
  stack1 = lambda t: jax.tree.map(lambda a: a[None], t)
  parallel, loss8 = parallel_fn(stack1(state), x[None], y[None], stack1(jax.random.key(3)))
  np.testing.assert_allclose(loss8["loss"][0], loss1["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(parallel.params), strict=True):
    np.testing.assert_allclose(b[0], a, rtol=1e-5, atol=1e-6)
  lowered = parallel_fn.lower(stack1(state), x[None], y[None], stack1(jax.random.key(3)))
  assert "sharding" in lowered.as_text()


def test_mesh_and_rules():
  mesh = sharding.make_mesh({"data": 2, "member": 4})
  assert mesh.shape == {"data": 2, "member": 4}
  tree = {"w": jnp.zeros((4, 3, 2)), "b": jnp.zeros((4, 2))}
  placed = sharding.shard_tree(tree, mesh, sharding.MEMBER_RULES)
  assert placed["w"].sharding.spec[0] == "member"
  with pytest.raises(ValueError, match="multiply to 8 devices"):
    sharding.make_mesh({"data": 3})
  with pytest.raises(ValueError, match="mesh axes must be among"):
    sharding.make_mesh({"batch": 8})


def test_optimizer_errors():
  with pytest.raises(ValueError, match="optimizer must be one of"):
    train.make_optimizer("lion", 1e-3)
  with pytest.raises(ValueError, match="learning_rate must be > 0"):
    train.make_optimizer("adam", 0.0)
  with pytest.raises(ValueError, match="weight_decay"):
    train.make_optimizer("adam", 1e-3, weight_decay=float("nan"))


def test_minibatch_t_is_drawn_from_step_key_t():
  # One step on a recorded batch equals the chunk's step 0: the PRNG stream is named.
  optimizer = train.make_optimizer("sgd", 0.1)
  state = _state(0, optimizer)._replace(step=jnp.asarray(7, jnp.int32))
  x, y = _problem(0)
  key = jax.random.key(5)
  after, _ = jax.jit(_chunk(optimizer, steps=1))(state, x, y, key)
  idx = jax.random.randint(jax.random.fold_in(key, 7), (32,), 0, x.shape[0])
  loss_fn = train.supervised_loss(nn.apply_mlp, train.sigmoid_bce)
  grads = jax.grad(lambda p: loss_fn(p, state.masks, x[idx], y[idx], None)[0])(state.params)
  want = nn.apply_masks(jax.tree.map(lambda p, g: p - 0.1 * g, state.params, grads),
                        state.masks)
  for a, b in zip(jax.tree.leaves(after.params), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert int(after.step) == 8


def test_with_step_passes_each_steps_index_before_the_loss_args():
  optimizer = train.make_optimizer("sgd", 0.1)
  state = _state(0, optimizer)._replace(step=jnp.asarray(7, jnp.int32))
  x, y = _problem(0)
  base = train.supervised_loss(nn.apply_mlp, train.sigmoid_bce)

  def loss_fn(params, masks, xb, yb, step_key, step, offset):
    loss, _ = base(params, masks, xb, yb, step_key)
    return loss, {"loss": loss, "step": step.astype(jnp.float32) + offset}

  chunk = jax.jit(train.make_train_chunk(loss_fn, optimizer, batch_size=32, steps=4,
                                         with_step=True))
  after, metrics = chunk(state, x, y, jax.random.key(5), 0.5)
  assert float(metrics["step"]) == np.mean([7, 8, 9, 10]) + 0.5  # chunk means
  assert int(after.step) == 11


def test_dropconnect_keep_one_is_plain_training_and_keeps_masks():
  optimizer = train.make_optimizer("adam", 1e-2)
  state = _state(1, optimizer)
  x, y = _problem(1)
  plain = jax.jit(_chunk(optimizer, steps=20))(state, x, y, jax.random.key(2))[0]
  drop_fn = train.make_train_chunk(
      train.dropconnect_loss(nn.apply_mlp, train.sigmoid_bce, ["dense_0"]), optimizer,
      batch_size=32, steps=20)
  kept = jax.jit(drop_fn)(state, x, y, jax.random.key(2), 1.0)[0]
  for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(kept.params), strict=True):
    np.testing.assert_array_equal(a, b)
  dropped = jax.jit(drop_fn)(state, x, y, jax.random.key(2), 0.5)[0]
  off = np.asarray(dropped.params["dense_0"]["w"]) * (1 - np.asarray(state.masks["dense_0"]["w"]))
  assert np.all(off == 0.0)
  assert not np.allclose(dropped.params["dense_0"]["w"], plain.params["dense_0"]["w"])


def test_weight_decay_is_torch_l2_for_sgd_and_decoupled_for_adamw():
  params = {"w": jnp.asarray([1.0, -2.0])}
  grads = {"w": jnp.asarray([0.5, 0.25])}
  sgd = train.make_optimizer("sgd", 0.1, weight_decay=0.01)
  updates, _ = sgd.update(grads, sgd.init(params), params)
  # torch.optim.SGD(weight_decay=wd): p -= lr * (g + wd * p)
  np.testing.assert_allclose(updates["w"], -0.1 * (grads["w"] + 0.01 * params["w"]), rtol=1e-6)
  adamw = train.make_optimizer("adamw", 0.1, weight_decay=0.01)
  updates, _ = adamw.update(grads, adamw.init(params), params)
  # First Adam step is -lr * sign(g); decoupled decay adds -lr * wd * p.
  np.testing.assert_allclose(updates["w"], -0.1 * (np.sign(grads["w"]) + 0.01 * params["w"]),
                             rtol=1e-5)


def test_schedules():
  assert train.make_schedule("constant", 0.1) == 0.1
  cosine = train.make_schedule("cosine", 0.1, total_steps=100)
  np.testing.assert_allclose([cosine(0), cosine(50), cosine(100)], [0.1, 0.05, 0.0], atol=1e-7)
  step = train.make_schedule("step", 0.1, boundaries=(10, 20), decay_factor=0.1)
  np.testing.assert_allclose([step(9), step(10), step(25)], [0.1, 0.01, 0.001], rtol=1e-6)
  with pytest.raises(ValueError, match="schedule must be one of"):
    train.make_schedule("linear", 0.1)
  with pytest.raises(ValueError, match="boundaries"):
    train.make_schedule("step", 0.1, boundaries=(20, 10))


def test_the_ncen_recipe_steps_the_rate_and_adds_l2_as_torch_does():
  """experiments.ncen's optimiser (the peers' recipe: L2 weight decay, the rate x decay at
  each boundary of the training step) against torch's SGD update written out."""
  from experiments import ncen  # noqa: PLC0415 (defines the binary's flags)

  config = ncen.TrainConfig(methods=("independent",), num_members=1, optimizer="sgd",
                            learning_rate=0.1, batch_size=1, train_steps=4, chunk_steps=1,
                            weight_decay=0.01, schedule="step", schedule_boundaries=(2,),
                            schedule_decay=0.5)
  optimizer = config.make_optimizer()
  params, grad = {"w": jnp.asarray([1.0, -2.0])}, jnp.asarray([0.5, 0.25])
  state = optimizer.init(params)
  want = np.asarray(params["w"])
  for step in range(4):
    updates, state = optimizer.update({"w": grad}, state, params)
    params = {"w": params["w"] + updates["w"]}
    rate = 0.1 * (0.5 if step >= 2 else 1.0)
    want = want - rate * (np.asarray(grad) + 0.01 * want)  # p -= lr_t * (g + wd * p)
    np.testing.assert_allclose(params["w"], want, rtol=1e-6)
