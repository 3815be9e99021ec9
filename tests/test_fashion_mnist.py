"""Fashion-MNIST and MNIST-5k loaders on the installed data; missing data names the command."""

import gzip

import numpy as np
import pytest

from fpe_jax.data import fashion_mnist, mnist5k


def test_fashion_mnist_splits():
  for split, count in (("train", 60000), ("test", 10000)):
    images, labels = fashion_mnist.load_fashion_mnist(split)
    assert images.shape == (count, 28, 28, 1) and images.dtype == np.float32
    assert labels.shape == (count,) and labels.dtype == np.int32
    assert images.min() == 0.0 and images.max() == 1.0
    np.testing.assert_array_equal(np.bincount(labels), [count // 10] * 10)
    if split == "train":
      # The in-model normalisation constants are these pixel statistics.
      assert abs(images.mean() - fashion_mnist.PIXEL_MEAN) < 1e-3
      assert abs(images.std() - fashion_mnist.PIXEL_STD) < 1e-3


def test_fashion_mnist_reads_idx_format(tmp_path):
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, size=(10000, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, size=10000, dtype=np.uint8)
  with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as f:
    f.write((2051).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (10000, 28, 28))
            + pixels.tobytes())
  with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
    f.write((2049).to_bytes(4, "big") + (10000).to_bytes(4, "big") + labels.tobytes())
  images, got = fashion_mnist.load_fashion_mnist("test", root=tmp_path)
  np.testing.assert_array_equal(images[..., 0], pixels / np.float32(255))
  np.testing.assert_array_equal(got, labels)


def test_missing_data_names_the_install_command(tmp_path):
  with pytest.raises(FileNotFoundError, match="bash scripts/install_data.sh"):
    fashion_mnist.load_fashion_mnist("train", root=tmp_path)
  with pytest.raises(FileNotFoundError, match="bash scripts/install_data.sh"):
    mnist5k.load_mnist5k(path=tmp_path / "absent.csv.gz")
  with pytest.raises(ValueError, match="split='val' is not one of"):
    fashion_mnist.load_fashion_mnist("val")


def test_mnist5k_stratified_split():
  images, labels = mnist5k.load_mnist5k("all")
  assert images.shape == (5000, 28, 28, 1) and images.dtype == np.float32
  assert 0.0 <= images.min() and images.max() <= 1.0
  train_x, train_y = mnist5k.load_mnist5k("train", test_per_class=100)
  test_x, test_y = mnist5k.load_mnist5k("test", test_per_class=100)
  assert len(train_y) == 4000 and len(test_y) == 1000
  np.testing.assert_array_equal(np.bincount(test_y), [100] * 10)
  # The two splits partition the file.
  assert len({x.tobytes() for x in np.concatenate([train_x, test_x])}) == len(
      {x.tobytes() for x in images})
  with pytest.raises(ValueError, match="test_per_class=0"):
    mnist5k.load_mnist5k("test", test_per_class=0)


# mtime=0 and explicit ids: the gzip header holds a timestamp, and pytest-xdist workers
# must collect identical test ids.
@pytest.mark.parametrize("content", [
    b"not gzip at all", gzip.compress(b"\x00\x00\x08\x03", mtime=0)[:-6],
    gzip.compress(b"\x00\x00\x00\x01 wrong magic", mtime=0)],
    ids=["not-gzip", "truncated-gzip", "wrong-magic"])
def test_a_corrupt_fashion_mnist_file_names_itself_and_the_install_command(tmp_path, content):
  for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
    (tmp_path / name).write_bytes(content)
  with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz.*corrupt.*install_data"):
    fashion_mnist.load_fashion_mnist("train", tmp_path)


@pytest.mark.parametrize("content", [b"not gzip", gzip.compress(b"1,2,3\n4,5\n", mtime=0)],
                         ids=["not-gzip", "ragged-csv"])
def test_a_corrupt_mnist5k_file_names_itself_and_the_install_command(tmp_path, content):
  (tmp_path / "mnist5k.csv.gz").write_bytes(content)
  with pytest.raises(ValueError, match=r"mnist5k.csv.gz.*corrupt.*install_data"):
    mnist5k.load_mnist5k("train", path=tmp_path / "mnist5k.csv.gz")
