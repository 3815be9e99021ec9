"""Rotten Tomatoes tasks: counts as documented, disjoint stratified deterministic splits."""
import numpy as np
import pytest

from fpe_jax.data import rotten_tomatoes as rt


@pytest.fixture(scope="module")
def reviews():
  return rt.load_reviews()


def test_corpus_counts(reviews):
  assert len(reviews.texts) == 12808  # 7,403 fresh + 5,405 rotten; plot rows dropped
  assert int(reviews.fresh.sum()) == 7403
  assert len(set(reviews.movies)) == 508


@pytest.mark.parametrize("task,num_classes,num_rows", [("sentiment", 2, 12808),
                                                      ("movie", 338, 11234)])
def test_task_split(reviews, task, num_classes, num_rows):
  t = rt.make_task(reviews, task, test_fraction=0.2, seed=3)
  assert t.num_classes == num_classes and len(t.rows) == num_rows
  assert t.labels.min() == 0 and t.labels.max() == num_classes - 1
  # Disjoint and complete.
  assert np.intersect1d(t.train, t.test).size == 0
  np.testing.assert_array_equal(np.sort(np.concatenate([t.train, t.test])), np.arange(num_rows))
  # Stratified: every class on both sides, about 20% of each class in test.
  train_counts = np.bincount(t.labels[t.train], minlength=num_classes)
  test_counts = np.bincount(t.labels[t.test], minlength=num_classes)
  total = train_counts + test_counts
  assert train_counts.min() >= 1 and test_counts.min() >= 1
  np.testing.assert_array_equal(test_counts, np.round(0.2 * total).astype(int))
  # Deterministic in the seed, different across seeds.
  again = rt.make_task(reviews, task, test_fraction=0.2, seed=3)
  np.testing.assert_array_equal(again.test, t.test)
  other = rt.make_task(reviews, task, test_fraction=0.2, seed=4)
  assert not np.array_equal(other.test, t.test)


def test_movie_labels_follow_names(reviews):
  t = rt.make_task(reviews, "movie")
  counts = np.bincount(t.labels)
  assert counts.min() >= rt.MIN_SNIPPETS_PER_MOVIE
  for position in (0, 100, 5000):
    row = t.rows[position]
    assert t.class_names[t.labels[position]] == reviews.movies[row]
  assert list(t.class_names) == sorted(t.class_names)


def test_bad_input(reviews, monkeypatch):
  with pytest.raises(ValueError, match="task: unknown 'genre'"):
    rt.make_task(reviews, "genre")
  with pytest.raises(ValueError, match="test_fraction"):
    rt.make_task(reviews, "sentiment", test_fraction=1.0)
  monkeypatch.setattr(rt.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match="install_data.sh"):
    rt.load_reviews()
