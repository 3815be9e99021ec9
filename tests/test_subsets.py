"""fpe_jax.data.subsets: class shares kept, seeded, never a prefix of a sorted file."""

import numpy as np
import pytest

from fpe_jax.data.subsets import stratified_subset


def test_class_counts_follow_the_shares_by_largest_remainder():
  labels = np.repeat([0, 1, 2], [50, 30, 20])  # sorted by label, like MNIST-5k
  idx = stratified_subset(labels, 10, seed=0)
  np.testing.assert_array_equal(np.bincount(labels[idx]), [5, 3, 2])
  # 7 of 100: quotas 3.5, 2.1, 1.4 -> floors 3, 2, 1 and the one left to the largest
  # remainder (class 0).
  np.testing.assert_array_equal(np.bincount(labels[stratified_subset(labels, 7, 1)]), [4, 2, 1])


def test_every_class_present_even_when_its_share_rounds_to_zero():
  labels = np.repeat([0, 1, 2], [98, 1, 1])
  counts = np.bincount(labels[stratified_subset(labels, 3, seed=0)], minlength=3)
  np.testing.assert_array_equal(counts, [1, 1, 1])


def test_seeded_distinct_increasing_and_not_a_prefix():
  labels = np.repeat(np.arange(10), 400)  # sorted: a prefix of 800 would be digits 0 and 1
  a, b = stratified_subset(labels, 800, seed=3), stratified_subset(labels, 800, seed=3)
  np.testing.assert_array_equal(a, b)
  assert len(np.unique(a)) == 800 and np.all(np.diff(a) > 0)
  np.testing.assert_array_equal(np.bincount(labels[a]), [80] * 10)
  assert not np.array_equal(a, stratified_subset(labels, 800, seed=4))
  np.testing.assert_array_equal(stratified_subset(labels, 4000, seed=0), np.arange(4000))


@pytest.mark.parametrize("n", [2, 4001])
def test_sizes_that_cannot_be_stratified_name_n(n):
  with pytest.raises(ValueError, match=r"n=\d+: .* needs n in \[10, 4000\]"):
    stratified_subset(np.repeat(np.arange(10), 400), n, seed=0)
