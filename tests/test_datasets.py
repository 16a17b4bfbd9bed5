"""Dataset loaders: IDX and CIFAR parsing, splits, preprocessing, and one-line errors."""

import gzip
import importlib.util
import os
import pickle

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas import datasets
from jaxnas.datasets import DatasetError

from conftest import FASHION_MNIST_SUBSET


def _idx_bytes(arr: np.ndarray) -> bytes:
  header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
  return header + arr.astype(np.uint8).tobytes()


def _write_idx_dir(d, n_train=12, n_test=5, gz=False, h=8, w=4):
  rng = np.random.default_rng(0)
  out = {}
  for prefix, n in (("train", n_train), ("t10k", n_test)):
    x = rng.integers(0, 256, (n, h, w), dtype=np.uint8)
    y = rng.integers(0, 10, n).astype(np.uint8)
    for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
      path = os.path.join(d, f"{prefix}-{kind}-ubyte" + (".gz" if gz else ""))
      data = _idx_bytes(arr)
      with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(data)
    out[prefix] = (x, y)
  return out


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path, gz):
  ref = _write_idx_dir(str(tmp_path), gz=gz)
  ds = datasets.load_mnist(str(tmp_path))
  assert ds.train_images.shape == (12, 8, 4, 1) and ds.train_images.dtype == np.uint8
  assert ds.test_images.shape == (5, 8, 4, 1)
  assert ds.train_labels.dtype == np.int32
  np.testing.assert_array_equal(ds.train_images[..., 0], ref["train"][0])
  np.testing.assert_array_equal(ds.test_labels, ref["t10k"][1])


def test_idx_errors_name_the_path(tmp_path):
  d = str(tmp_path)
  with pytest.raises(DatasetError, match="not found"):
    datasets.load_mnist(os.path.join(d, "nope"))
  with pytest.raises(DatasetError, match="train-images-idx3-ubyte"):
    datasets.load_mnist(d)
  _write_idx_dir(d)
  bad = os.path.join(d, "train-images-idx3-ubyte")
  with open(bad, "wb") as f:
    f.write(b"\x08\x03\x00\x00garbage")
  with pytest.raises(DatasetError, match="magic") as e:
    datasets.load_mnist(d)
  assert bad in str(e.value) and "\n" not in str(e.value)
  with open(bad, "wb") as f:  # header promises more data than the file holds
    f.write(_idx_bytes(np.zeros((12, 6, 5), np.uint8))[:-7])
  with pytest.raises(DatasetError, match="declares shape"):
    datasets.load_mnist(d)
  with open(bad, "wb") as f:  # a corrupt gzip next to nothing raw
    f.write(b"junk")
  os.rename(bad, bad + ".gz")
  with pytest.raises(DatasetError, match="cannot read"):
    datasets.load_mnist(d)


def _raises_one_line(path, match, fn, *args):
  """``fn(*args)`` raises a one-line DatasetError that names ``path`` and matches ``match``."""
  with pytest.raises(DatasetError, match=match) as e:
    fn(*args)
  assert str(path) in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("shape,data,expected", [
    ((2**31, 2**31, 4), b"", 2**64),  # np.prod wraps this to 0 bytes
    ((2**32 - 1,) * 3, b"x" * 100, (2**32 - 1)**3),
], ids=["2^31x2^31x4", "(2^32-1)^3"])
def test_idx_overflowing_header(tmp_path, shape, data, expected):
  _write_idx_dir(str(tmp_path))
  bad = tmp_path / "train-images-idx3-ubyte"
  bad.write_bytes(bytes([0, 0, 0x08, 3]) + np.asarray(shape, ">u4").tobytes() + data)
  _raises_one_line(bad, f"\\({expected} bytes\\) but holds {len(data)} bytes",
                   datasets.load_mnist, str(tmp_path))
  bad.write_bytes(bytes([0, 0, 0x08, 3]) + np.asarray((0, 2**32 - 1, 2**32 - 1), ">u4").tobytes())
  _raises_one_line(bad, "too big", datasets.read_idx, str(bad))


def test_idx_test_shape_must_match_train(tmp_path):
  _write_idx_dir(str(tmp_path), h=8, w=4)
  bad = tmp_path / "t10k-images-idx3-ubyte"
  bad.write_bytes(_idx_bytes(np.zeros((5, 12, 4), np.uint8)))
  _raises_one_line(bad, "test image shape 12x4x1 differs from training image shape 8x4x1",
                   datasets.load_mnist, str(tmp_path))


@pytest.mark.parametrize("h,w", [(0, 0), (1, 1), (3, 28), (28, 3), (6, 28), (28, 30)])
def test_idx_image_sides_must_be_multiples_of_4(tmp_path, h, w):
  _write_idx_dir(str(tmp_path), h=h, w=w)
  _raises_one_line(tmp_path / "train-images-idx3-ubyte",
                   f"images are {h}x{w}; .* positive multiples of 4",
                   datasets.load_mnist, str(tmp_path))
  for ok in ((4, 4), (12, 8)):
    _write_idx_dir(str(tmp_path), h=ok[0], w=ok[1])
    assert datasets.load_mnist(str(tmp_path)).train_images.shape == (12, *ok, 1)


def test_idx_labels_checked(tmp_path):
  _write_idx_dir(str(tmp_path))
  lab = tmp_path / "t10k-labels-idx1-ubyte"
  lab.write_bytes(bytes([0, 0, 0x0D, 1]) + np.asarray([5], ">u4").tobytes()
                  + np.full(5, 1.7, ">f4").tobytes())  # float32 labels are not truncated
  _raises_one_line(lab, "labels must be integers", datasets.load_mnist, str(tmp_path))
  lab.write_bytes(_idx_bytes(np.array([0, 1, 200, 3, 4])))
  _raises_one_line(lab, "label 200 outside 0..9", datasets.load_mnist, str(tmp_path))


def _cifar_batch(n, label_key, seed):
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  data = images.transpose(0, 3, 1, 2).reshape(n, -1)  # the file stores CHW rows
  labels = rng.integers(0, 10, n).tolist()
  return {b"data": data, label_key: labels, b"batch_label": b"x"}, images


def test_cifar10_parsing(tmp_path):
  folder = tmp_path / "cifar-10-batches-py"
  folder.mkdir()
  images = []
  for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
    d, x = _cifar_batch(3, b"labels", i)
    images.append((x, d[b"labels"]))
    with open(folder / name, "wb") as f:
      pickle.dump(d, f)
  ds = datasets.load_cifar10(str(tmp_path))  # the parent folder works too
  assert ds.train_images.shape == (15, 32, 32, 3) and ds.test_images.shape == (3, 32, 32, 3)
  np.testing.assert_array_equal(ds.train_images[:3], images[0][0])
  np.testing.assert_array_equal(ds.test_labels, images[5][1])
  assert ds.num_classes == 10 and len(ds.mean) == 3


def test_cifar100_and_errors(tmp_path):
  for name in ("train", "test"):
    d, _ = _cifar_batch(4, b"fine_labels", 0)
    with open(tmp_path / name, "wb") as f:
      pickle.dump(d, f)
  ds = datasets.load_cifar100(str(tmp_path))
  assert ds.train_images.shape == (4, 32, 32, 3) and ds.num_classes == 100
  with open(tmp_path / "test", "wb") as f:
    pickle.dump({b"data": np.zeros((2, 10), np.uint8), b"fine_labels": [0, 1]}, f)
  with pytest.raises(DatasetError, match="uint8\\[N, 3072\\]"):
    datasets.load_cifar100(str(tmp_path))
  with open(tmp_path / "test", "wb") as f:
    f.write(b"not a pickle")
  with pytest.raises(DatasetError, match="not a CIFAR python batch"):
    datasets.load_cifar100(str(tmp_path))
  with open(tmp_path / "test", "wb") as f:  # code-executing pickles are refused
    pickle.dump(print, f)
  with pytest.raises(DatasetError, match="not allowed"):
    datasets.load_cifar100(str(tmp_path))
  with pytest.raises(DatasetError, match="not found"):
    datasets.load_cifar10(str(tmp_path))


def _write_cifar10(folder, test_labels):
  for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
    d, _ = _cifar_batch(3, b"labels", i)
    if name == "test_batch":
      d[b"labels"] = test_labels
    with open(folder / name, "wb") as f:
      pickle.dump(d, f)
  return folder / "test_batch"


@pytest.mark.parametrize("labels,match", [
    ([None] * 3, "label 0 is None \\(NoneType\\)"),
    ([0, "3", 1], "label 1 is '3' \\(str\\)"),
    ([1.7] * 3, "label 0 is 1.7 \\(float\\)"),  # not truncated to 1
    ([True, 0, 1], "label 0 is True \\(bool\\)"),
    ([[1]] * 3, "label 0 is \\[1\\] \\(list\\)"),
    ([2**40] * 3, f"label {2**40} outside 0..9"),  # not wrapped to 0 by an int32 cast
    ([1, 2**70, 3], f"label {2**70} outside 0..9"),  # beyond int64
    ([0, -1, 2], "label -1 outside 0..9"),
    ([0, 10, 2], "label 10 outside 0..9"),
    (np.array([1.0, 2.0, 3.0]), "labels must be integers, got float64"),
    (np.array([True, False, True]), "labels must be integers, got bool"),
    (np.array([2**40] * 3, np.int64), f"label {2**40} outside 0..9"),
    (np.array([0, 1]), "2 labels for 3 images"),
    ([0, 1], "2 labels for 3 images"),
    (b"abc", "must be a list or an array, got bytes"),
])
def test_cifar_labels_checked(tmp_path, labels, match):
  path = _write_cifar10(tmp_path, labels)
  _raises_one_line(path, match, datasets.load_cifar10, str(tmp_path))


@pytest.mark.parametrize("labels", [
    np.array([9, 0, 1], np.uint8), np.array([9, 0, 1], np.int64), [np.int64(9), 0, 1], (9, 0, 1)])
def test_cifar_integer_labels_accepted(tmp_path, labels):
  _write_cifar10(tmp_path, labels)
  ds = datasets.load_cifar10(str(tmp_path))
  assert ds.test_labels.dtype == np.int32 and ds.test_labels.tolist() == [9, 0, 1]


def test_split_deterministic_and_disjoint():
  x = np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1)
  y = np.arange(100, dtype=np.int32)
  a = datasets.train_val_split(x, y, 0.2, seed=3)
  b = datasets.train_val_split(x, y, 0.2, seed=3)
  c = datasets.train_val_split(x, y, 0.2, seed=4)
  for u, v in zip(a, b):
    np.testing.assert_array_equal(u, v)
  assert len(a[3]) == 20 and len(a[1]) == 80
  assert not set(a[1]) & set(a[3]) and set(a[1]) | set(a[3]) == set(range(100))
  assert not np.array_equal(a[3], c[3])
  with pytest.raises(ValueError):
    datasets.train_val_split(x, y, 1.0, seed=0)


def test_preprocess_jittable_and_keyed():
  images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
  prep = jax.jit(datasets.make_preprocess((0.5,) * 3, (0.25,) * 3, augment=True))
  k = jax.random.PRNGKey(0)
  a, b, c = prep(k, images), prep(k, images), prep(jax.random.PRNGKey(1), images)
  chex.assert_shape(a, (8, 32, 32, 3))
  chex.assert_trees_all_equal(a, b)
  assert not np.allclose(a, c)
  plain = datasets.make_preprocess((0.5,) * 3, (0.25,) * 3)(None, images)
  np.testing.assert_allclose(plain, (images / 255.0 - 0.5) / 0.25, rtol=1e-5, atol=1e-5)
  # A crop of the padded image: every augmented image is a shifted (maybe flipped) original.
  off = datasets.random_crop_flip(k, jnp.asarray(plain), pad=0, flip=False)
  np.testing.assert_allclose(off, plain)


@pytest.mark.skipif(not os.path.isdir(datasets.FASHION_MNIST_DIR),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist():
  ds = datasets.load_fashion_mnist()
  assert ds.train_images.shape == (60000, 28, 28, 1) and ds.test_images.shape == (10000, 28, 28, 1)
  assert np.bincount(ds.train_labels).tolist() == [6000] * 10
  assert abs(ds.train_images.mean() / 255 - ds.mean[0]) < 1e-3
  # The tests' subset is what its script makes of this set (the IDX data; the gzip bytes
  # also match where zlib compresses as it did: make_fashion_mnist_subset.py --check).
  path = os.path.join(os.path.dirname(FASHION_MNIST_SUBSET), "make_fashion_mnist_subset.py")
  spec = importlib.util.spec_from_file_location("make_fashion_mnist_subset", path)
  make = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(make)
  for name, data in make.subset_files(datasets.FASHION_MNIST_DIR).items():
    with open(os.path.join(FASHION_MNIST_SUBSET, name), "rb") as f:
      assert gzip.decompress(f.read()) == gzip.decompress(data), name


def test_the_tests_fashion_mnist_subset():
  """The Fashion-MNIST every other test trains on (tests/data/fashion-mnist-subset): real
  images, class-balanced, read by the loader as the full set is; its search split holds
  1/20 of the full set's 54000 images (the tests' train fractions are 20x the full set's)."""
  ds = datasets.load_fashion_mnist(FASHION_MNIST_SUBSET)
  assert ds.train_images.shape == (3000, 28, 28, 1) and ds.test_images.shape == (1000, 28, 28, 1)
  assert np.bincount(ds.train_labels).tolist() == [300] * 10
  assert np.bincount(ds.test_labels).tolist() == [100] * 10
  assert abs(ds.train_images.mean() / 255 - ds.mean[0]) < 1e-3  # 0.2863: the full set's stats
  tx, ty, vx, vy = datasets.train_val_split(ds.train_images, ds.train_labels, 0.1, seed=0)
  assert len(ty) == 2700 and len(vy) == 300  # 1/20 of the full set's 54000 / 6000
