"""Boolean DNF tasks: an OR of clauses, each an AND of k signed literals over d bits.

Interference is turned by the number of clauses per hidden neuron: more clauses at a
fixed width means more features that must share a neuron.

The distribution (documented, since the paper does not say): inputs are uniform random
bits x in {0, 1}^d conditioned on the label, with classes exactly balanced. Sampling is
exact rejection from the uniform distribution: each class gets a uniform sample of the
inputs of that class, so positives are uniform over the satisfying assignments (not
"one clause plus noise") and negatives are uniform over the falsifying ones. The host
draws pools of uniform bits (from explicit keys) until each class has enough examples.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["variables", "signs"], meta_fields=["d"]
)
@dataclasses.dataclass(frozen=True)
class Formula:
  """A DNF formula over d bits: clause c is AND_l (x[variables[c, l]] == (signs[c, l] > 0))."""

  variables: jax.Array  # [n_clauses, k] int32, distinct within a clause
  signs: jax.Array  # [n_clauses, k] int32 in {+1, -1}; -1 is a negated literal
  d: int  # number of input variables (static)

  @property
  def num_clauses(self) -> int:
    return self.variables.shape[0]


def sample_formula(key: jax.Array, *, d: int, n_clauses: int, k: int) -> Formula:
  """Draws `n_clauses` clauses of `k` literals on distinct variables out of `d`.

  Different clauses may share variables (they must when n_clauses * k > d); each
  literal is negated with probability 1/2.
  """
  if d < 1:
    raise ValueError(f"d must be >= 1, got {d}")
  if n_clauses < 1:
    raise ValueError(f"n_clauses must be >= 1, got {n_clauses}")
  if not 1 <= k <= d:
    raise ValueError(f"k must be in [1, d={d}] (a clause uses k distinct variables), got {k}")
  var_key, sign_key = jax.random.split(key)
  var_keys = jax.random.split(var_key, n_clauses)
  variables = jax.vmap(lambda kk: jax.random.permutation(kk, d)[:k])(var_keys)
  signs = jnp.where(jax.random.bernoulli(sign_key, 0.5, (n_clauses, k)), 1, -1)
  return Formula(variables.astype(jnp.int32), signs.astype(jnp.int32), d)


def clause_satisfaction(formula: Formula, x: jax.Array) -> jax.Array:
  """[n, n_clauses] bool: which clauses each input satisfies, x: [n, d] in {0, 1}."""
  bits = x[:, formula.variables] > 0.5  # [n, c, k]
  return jnp.all(bits == (formula.signs > 0), axis=-1)


def label(formula: Formula, x: jax.Array) -> jax.Array:
  """[n] int32: 1 where some clause holds."""
  return jnp.any(clause_satisfaction(formula, x), axis=-1).astype(jnp.int32)


def sample_balanced(
    key: jax.Array, formula: Formula, n: int, *, pool_size: int = 16384, max_pools: int = 4096
) -> tuple[jax.Array, jax.Array]:
  """n examples, n // 2 negatives and the rest positives, in a random order.

  Args:
    key: PRNG key; the same key gives the same examples.
    formula: the target.
    n: number of examples (>= 2).
    pool_size: uniform inputs drawn per round of rejection.
    max_pools: give up (ValueError) once the rate seen so far projects more rounds than
      this (an empty class counts as one draw, the most optimistic guess): a class is
      then too rare, and a hopeless formula fails in a few rounds, not after all of them.

  Returns:
    x: [n, d] float32 in {0, 1}; y: [n] int32.
  """
  if n < 2:
    raise ValueError(f"n must be >= 2 to hold both classes, got {n}")
  n_pos, n_neg = n - n // 2, n // 2
  pool_key, order_key = jax.random.split(key)
  draw = jax.jit(functools.partial(_draw_pool, formula=formula, pool_size=pool_size))
  pos, neg = [], []
  have_pos = have_neg = 0
  for round_ in range(max_pools):
    x, y = (np.asarray(a) for a in draw(jax.random.fold_in(pool_key, round_)))
    take = x[y == 1][: n_pos - have_pos]
    pos.append(take)
    have_pos += len(take)
    take = x[y == 0][: n_neg - have_neg]
    neg.append(take)
    have_neg += len(take)
    if have_pos == n_pos and have_neg == n_neg:
      break
    rounds = round_ + 1
    projected = max(rounds * want / max(have, 1)
                    for want, have in ((n_pos, have_pos), (n_neg, have_neg)))
    if projected > max_pools:
      raise ValueError(
          f"one class is too rare for this formula: {have_pos} positives and {have_neg} "
          f"negatives in {rounds * pool_size} uniform inputs, where {n_pos} and {n_neg} are "
          f"needed (more than {max_pools * pool_size} inputs); use fewer or longer clauses")
  x = np.concatenate(pos + neg)
  y = np.concatenate([np.ones(n_pos, np.int32), np.zeros(n_neg, np.int32)])
  order = np.asarray(jax.random.permutation(order_key, n))
  return jnp.asarray(x[order]), jnp.asarray(y[order])


def _draw_pool(key: jax.Array, *, formula: Formula, pool_size: int):
  x = jax.random.bernoulli(key, 0.5, (pool_size, formula.d)).astype(jnp.float32)
  return x, label(formula, x)
