"""Seeded stratified subsets: a smaller training or evaluation set with the class shares
of the whole, never a prefix (MNIST-5k ships sorted by label: its first 800 training
images are digits 0 and 1, and its first 100 test images are all 0s)."""

import numpy as np


def stratified_subset(labels, n: int, seed: int) -> np.ndarray:
  """Indices of `n` examples whose class counts follow the classes' shares in `labels`.

  Each class gets floor(n * share) examples, the remaining ones going to the largest
  remainders (ties to the smaller class label); every class present gets at least one,
  taken from the largest class. Within a class, examples are drawn uniformly without
  replacement by `np.random.default_rng(seed)`.

  Args:
    labels: [N] integer class labels.
    n: the subset size, in [number of classes, N].
    seed: the subset's seed (the same seed, labels and n give the same indices).

  Returns:
    [n] int64 indices into `labels`, increasing (the data's own order).

  Raises:
    ValueError: `n` cannot hold one example of every class, or exceeds N.
  """
  labels = np.asarray(labels).reshape(-1)
  classes, counts = np.unique(labels, return_counts=True)
  if not len(classes) <= n <= len(labels):
    raise ValueError(f"n={n}: a stratified subset of {len(labels)} examples of "
                     f"{len(classes)} classes needs n in [{len(classes)}, {len(labels)}]")
  quota = n * counts / len(labels)
  take = np.floor(quota).astype(np.int64)
  by_remainder = np.lexsort((classes, -(quota - take)))  # largest remainder first
  take[by_remainder[:n - take.sum()]] += 1
  while (take == 0).any():
    take[np.argmax(take)] -= 1
    take[np.flatnonzero(take == 0)[0]] += 1
  rng = np.random.default_rng(seed)
  chosen = [rng.choice(np.flatnonzero(labels == c), size=k, replace=False)
            for c, k in zip(classes, take, strict=True)]
  return np.sort(np.concatenate(chosen))
