"""Boolean DNF formulas and the balanced sampler."""

import jax
import numpy as np
import pytest

from fpe_jax.tasks import boolean as dnf


def test_formula_shape_distinct_variables_and_errors():
  f = dnf.sample_formula(jax.random.key(0), d=10, n_clauses=6, k=3)
  assert f.variables.shape == (6, 3) and f.d == 10
  assert all(len(set(row)) == 3 for row in np.asarray(f.variables))
  assert set(np.unique(f.signs)) <= {-1, 1}
  with pytest.raises(ValueError, match=r"k must be in \[1, d=4\]"):
    dnf.sample_formula(jax.random.key(0), d=4, n_clauses=2, k=5)
  with pytest.raises(ValueError, match="n_clauses must be >= 1"):
    dnf.sample_formula(jax.random.key(0), d=4, n_clauses=0, k=2)


def test_labels_match_a_python_evaluation():
  f = dnf.sample_formula(jax.random.key(1), d=8, n_clauses=4, k=2)
  x = np.asarray(jax.random.bernoulli(jax.random.key(2), 0.5, (200, 8)), np.float32)
  want = [any(all((row[v] > 0.5) == (s > 0) for v, s in zip(vs, ss, strict=True))
              for vs, ss in zip(np.asarray(f.variables), np.asarray(f.signs), strict=True))
          for row in x]
  np.testing.assert_array_equal(dnf.label(f, x), np.asarray(want, np.int32))


def test_sampler_is_balanced_deterministic_and_correct():
  f = dnf.sample_formula(jax.random.key(3), d=16, n_clauses=12, k=2)  # negatives are rare
  x, y = dnf.sample_balanced(jax.random.key(4), f, 301, pool_size=512)
  assert x.shape == (301, 16) and int(y.sum()) == 151
  np.testing.assert_array_equal(dnf.label(f, x), y)
  x2, y2 = dnf.sample_balanced(jax.random.key(4), f, 301, pool_size=512)
  np.testing.assert_array_equal(x, x2)
  np.testing.assert_array_equal(y, y2)


def test_sampler_reports_an_impossible_class():
  # x0 OR NOT x0 is always true: there are no negatives to sample.
  formula = dnf.Formula(np.array([[0], [0]]), np.array([[1], [-1]]), 1)
  with pytest.raises(ValueError, match="too rare"):
    dnf.sample_balanced(jax.random.key(0), formula, 10, pool_size=64, max_pools=3)


def test_a_hopeless_formula_fails_in_a_few_rounds_not_all_of_them():
  # No negatives exist: after the first empty rounds the optimistic projection (one
  # negative per round) already needs more than max_pools rounds for 100 negatives.
  formula = dnf.Formula(np.array([[0], [0]]), np.array([[1], [-1]]), 1)
  with pytest.raises(ValueError, match=r"0 negatives in 64 uniform inputs"):
    dnf.sample_balanced(jax.random.key(0), formula, 200, pool_size=64, max_pools=50)
