"""Fashion-MNIST (60,000 train + 10,000 test 28x28 grey images, 10 classes) from Debian.

The Debian package `dataset-fashion-mnist` installs the original idx files, gzipped, under
/usr/share/datasets/fashion-mnist; `bash scripts/install_data.sh` installs it.
"""

from __future__ import annotations

import gzip
import os
import pathlib

import numpy as np

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
INSTALL_COMMAND = "bash scripts/install_data.sh"
NUM_CLASSES = 10
CLASS_NAMES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
               "sneaker", "bag", "ankle boot")
# Per-pixel statistics of the 60k training images in [0, 1]; models normalise inside.
PIXEL_MEAN = 0.2860
PIXEL_STD = 0.3530

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049


def _read_idx(path: pathlib.Path, magic: int) -> np.ndarray:
  """An idx array; ValueError naming the file and the install command if it is corrupt."""
  try:
    with gzip.open(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:  # not gzip, or cut short
    raise ValueError(f"{path} is not a readable gzip file ({e}): the file is corrupt; "
                     f"reinstall the data with `{INSTALL_COMMAND}`") from None
  found = int.from_bytes(data[:4], "big")
  if found != magic:
    raise ValueError(f"{path}: idx magic number {found}, expected {magic}: the file is "
                     f"corrupt; reinstall the data with `{INSTALL_COMMAND}`")
  ndim = magic & 0xFF
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
  if array.size != int(np.prod(shape)):
    raise ValueError(f"{path}: {array.size} values for idx shape {shape}: the file is "
                     f"truncated; reinstall the data with `{INSTALL_COMMAND}`")
  return array.reshape(shape)


def load_fashion_mnist(split: str = "train",
                       root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Loads one split of Fashion-MNIST.

  Args:
    split: "train" (60,000 images) or "test" (10,000 images).
    root: folder holding the four idx .gz files; defaults to Debian's install location.

  Returns:
    images: [n, 28, 28, 1] float32 in [0, 1].
    labels: [n] int32 in [0, 10).

  Raises:
    ValueError: unknown split, or a corrupt file (the message names the file and the
      install command).
    FileNotFoundError: the data is not installed (the message names the install command).
  """
  if split not in _FILES:
    raise ValueError(f"split={split!r} is not one of {sorted(_FILES)}")
  folder = pathlib.Path(root if root is not None else DEFAULT_ROOT)
  images_name, labels_name, count = _FILES[split]
  missing = [name for name in (images_name, labels_name) if not (folder / name).is_file()]
  if missing:
    raise FileNotFoundError(
        f"Fashion-MNIST file(s) {', '.join(missing)} not found in {folder}; "
        f"install the data with `{INSTALL_COMMAND}`")
  images = _read_idx(folder / images_name, _IMAGES_MAGIC)
  labels = _read_idx(folder / labels_name, _LABELS_MAGIC)
  if images.shape != (count, 28, 28) or labels.shape != (count,):
    raise ValueError(f"Fashion-MNIST {split}: shapes {images.shape}, {labels.shape}, expected "
                     f"({count}, 28, 28), ({count},)")
  images = (images.astype(np.float32) / 255.0)[..., None]
  return images, labels.astype(np.int32)
