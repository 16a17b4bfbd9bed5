"""Image-classification data for real training: IDX (MNIST, Fashion-MNIST) and CIFAR.

Loading happens on the host, once, into numpy ``uint8`` NHWC images and
``int32`` labels; everything per step (normalisation, augmentation) is a pure
jittable function of an explicit PRNG key, so a training loop can stay inside
one ``lax.scan`` (purejaxrl style). File formats:

* IDX (LeCun et al. 1998; Xiao, Rasul & Vollgraf 2017 for Fashion-MNIST):
  big-endian header ``0x00 0x00 <dtype> <ndim>`` then ``ndim`` uint32 sizes,
  raw or gzip-compressed (Debian's ``dataset-fashion-mnist`` ships ``.gz``).
* CIFAR-10/100 "python version" (Krizhevsky 2009): pickled dicts with
  ``b"data"`` uint8[N, 3072] in CHW row order and ``b"labels"`` (CIFAR-10) or
  ``b"fine_labels"`` (CIFAR-100). They are read with an unpickler that only
  admits numpy array reconstruction, so a hostile file cannot run code.

Every user-caused failure (missing file, wrong magic, truncated data) raises
``DatasetError`` with a one-line message naming the path.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


class DatasetError(ValueError):
  """A dataset file is missing or malformed (the message names the path)."""


class Dataset(NamedTuple):
  """A labelled image dataset held on the host.

  Images are ``uint8[N, H, W, C]`` (NHWC, the layout XLA's CPU and GPU convs
  prefer for ``lax.conv_general_dilated`` with ``("NHWC", "HWIO", "NHWC")``);
  labels are ``int32[N]``. ``mean``/``std`` are per-channel statistics on the
  0..1 scale used by ``normalize``.
  """
  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]


# Channel statistics on the training sets (0..1 scale), the usual published values.
_STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}

# ---------------------------------------------------------------------------
# IDX
# ---------------------------------------------------------------------------

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def _read_bytes(path: str) -> bytes:
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        return f.read()
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError:
    raise DatasetError(f"dataset file not found: {path}") from None
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    raise DatasetError(f"cannot read dataset file {path}: {e}") from None


def read_idx(path: str) -> np.ndarray:
  """Parses one IDX file (raw or ``.gz``) into a numpy array of its declared shape."""
  raw = _read_bytes(path)
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
    raise DatasetError(f"not an IDX file (bad magic number): {path}")
  code, ndim = raw[2], raw[3]
  if code not in _IDX_DTYPES or ndim == 0:
    raise DatasetError(f"not an IDX file (dtype code {code:#x}, {ndim} dims): {path}")
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise DatasetError(f"truncated IDX header: {path}")
  shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  dtype = np.dtype(_IDX_DTYPES[code])
  expected = math.prod(shape) * dtype.itemsize  # Python ints: no overflow for huge headers
  if len(raw) - header != expected:
    raise DatasetError(
        f"IDX file {path} declares shape {shape} ({expected} bytes) but holds "
        f"{len(raw) - header} bytes of data")
  try:
    arr = np.frombuffer(raw, dtype, offset=header).reshape(shape)
  except ValueError:  # e.g. (0, 2**32 - 1, 2**32 - 1): empty, yet too big for numpy's indexing
    raise DatasetError(f"IDX file {path} declares shape {shape}, too big for numpy") from None
  return arr.astype(dtype.newbyteorder("="))


def _find(data_dir: str, stem: str) -> str:
  """The raw or gzipped file ``stem`` in ``data_dir`` (raw preferred: no decompression)."""
  for name in (stem, stem + ".gz"):
    path = os.path.join(data_dir, name)
    if os.path.isfile(path):
      return path
  raise DatasetError(f"dataset file not found: {os.path.join(data_dir, stem)}[.gz]")


# Both networks halve the image twice (two stride-2 reductions, each with a shortcut that
# must meet its conv's output), so each side is a positive multiple of 4.
IMAGE_SIDE_MULTIPLE = 4


def _check_image_side(images: np.ndarray, path: str):
  h, w = images.shape[1:3]
  if min(h, w) < 1 or h % IMAGE_SIDE_MULTIPLE or w % IMAGE_SIDE_MULTIPLE:
    raise DatasetError(f"images are {h}x{w}; the networks need sides that are positive "
                       f"multiples of {IMAGE_SIDE_MULTIPLE} (they halve the image twice): {path}")


def _check_test_shape(train: np.ndarray, test: np.ndarray, test_path: str):
  if train.shape[1:] != test.shape[1:]:
    te, tr = ("x".join(map(str, x.shape[1:])) for x in (test, train))
    raise DatasetError(f"test image shape {te} differs from training image shape {tr}: {test_path}")


def _checked_labels(labels: np.ndarray, num_classes: int, path: str) -> np.ndarray:
  """``labels`` as int32 after checking, before any cast, that they are integers in range."""
  if labels.dtype.kind not in "iu":
    raise DatasetError(f"labels must be integers, got {labels.dtype}: {path}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    bad = labels[(labels < 0) | (labels >= num_classes)][0]
    raise DatasetError(f"label {bad} outside 0..{num_classes - 1}: {path}")
  return labels.astype(np.int32)


def _idx_split(data_dir: str, prefix: str, num_classes: int):
  """``(images uint8[N, H, W, 1], labels int32[N], image path)`` of one split."""
  img_path = _find(data_dir, f"{prefix}-images-idx3-ubyte")
  lab_path = _find(data_dir, f"{prefix}-labels-idx1-ubyte")
  images, labels = read_idx(img_path), read_idx(lab_path)
  if images.ndim != 3 or images.dtype != np.uint8:
    raise DatasetError(f"expected uint8 images [N, H, W], got {images.dtype}{list(images.shape)}: "
                       f"{img_path}")
  _check_image_side(images, img_path)
  if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
    raise DatasetError(f"{lab_path} has {labels.shape} labels for {images.shape[0]} images")
  return images[..., None], _checked_labels(labels, num_classes, lab_path), img_path


def load_idx_dataset(data_dir: str = FASHION_MNIST_DIR, name: str = "fashion_mnist",
                     num_classes: int = 10) -> Dataset:
  """MNIST-format dataset from ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``."""
  if not os.path.isdir(data_dir):
    raise DatasetError(f"dataset directory not found: {data_dir}")
  tr_x, tr_y, _ = _idx_split(data_dir, "train", num_classes)
  te_x, te_y, te_path = _idx_split(data_dir, "t10k", num_classes)
  _check_test_shape(tr_x, te_x, te_path)
  mean, std = _STATS.get(name, ((0.5,), (0.5,)))
  return Dataset(name, tr_x, tr_y, te_x, te_y, num_classes, mean, std)


def load_fashion_mnist(data_dir: str = FASHION_MNIST_DIR) -> Dataset:
  """Fashion-MNIST (Xiao et al. 2017): 60k/10k 28x28 grey images, 10 classes."""
  return load_idx_dataset(data_dir, "fashion_mnist", 10)


def load_mnist(data_dir: str) -> Dataset:
  """MNIST (LeCun et al. 1998) in the same IDX layout."""
  return load_idx_dataset(data_dir, "mnist", 10)


# ---------------------------------------------------------------------------
# CIFAR
# ---------------------------------------------------------------------------

# What a CIFAR pickle may reference: numpy's array/dtype reconstruction only.
_PICKLE_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):

  def find_class(self, module, name):
    if (module, name) in _PICKLE_ALLOWED:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")


def _short(value) -> str:
  r = " ".join(repr(value).split())
  return r if len(r) <= 40 else r[:37] + "..."


def _cifar_labels(raw, n: int, num_classes: int, path: str) -> np.ndarray:
  """A batch's labels (a list of ints or an integer array) as int32, checked before the cast."""
  if isinstance(raw, np.ndarray):
    if raw.shape != (n,):
      raise DatasetError(f"{raw.shape[0] if raw.ndim else 0} labels for {n} images: {path}")
    return _checked_labels(raw, num_classes, path)
  if not isinstance(raw, (list, tuple)):
    raise DatasetError(f"labels must be a list or an array, got {type(raw).__name__}: {path}")
  if len(raw) != n:
    raise DatasetError(f"{len(raw)} labels for {n} images: {path}")
  for i, v in enumerate(raw):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
      raise DatasetError(f"labels must be integers, label {i} is {_short(v)} "
                         f"({type(v).__name__}): {path}")
  try:
    labels = np.asarray(raw, np.int64)
  except OverflowError:  # a Python int beyond int64, reported as it is
    bad = next(v for v in raw if not -2**63 <= v < 2**63)
    raise DatasetError(f"label {bad} outside 0..{num_classes - 1}: {path}") from None
  return _checked_labels(labels, num_classes, path)


def _read_cifar_batch(path: str, label_key: bytes,
                      num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  raw = _read_bytes(path)
  try:
    d = _SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
  except Exception as e:  # pickle raises many types on garbage input
    raise DatasetError(f"not a CIFAR python batch ({type(e).__name__}: {e}): {path}") from None
  if not isinstance(d, dict) or b"data" not in d or label_key not in d:
    raise DatasetError(f"CIFAR batch lacks b'data' or {label_key!r}: {path}")
  data = np.asarray(d[b"data"])
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
    raise DatasetError(f"CIFAR data must be uint8[N, 3072], got {data.dtype}{list(data.shape)}: "
                       f"{path}")
  labels = _cifar_labels(d[label_key], data.shape[0], num_classes, path)
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW rows -> NHWC
  return np.ascontiguousarray(images), labels


def _cifar_dir(data_dir: str, subdir: str, probe: str) -> str:
  """Accepts the extracted folder itself or its parent (``.../cifar-10-batches-py``)."""
  if not os.path.isdir(data_dir):
    raise DatasetError(f"dataset directory not found: {data_dir}")
  nested = os.path.join(data_dir, subdir)
  if not os.path.exists(os.path.join(data_dir, probe)) and os.path.isdir(nested):
    return nested
  return data_dir


def _cat(parts):
  xs, ys = zip(*parts)
  return np.concatenate(xs), np.concatenate(ys)


def load_cifar10(data_dir: str) -> Dataset:
  """CIFAR-10 (Krizhevsky 2009): ``data_batch_1..5`` and ``test_batch`` pickles."""
  d = _cifar_dir(data_dir, "cifar-10-batches-py", "test_batch")
  tr_x, tr_y = _cat([_read_cifar_batch(os.path.join(d, f"data_batch_{i}"), b"labels", 10)
                     for i in range(1, 6)])
  te_path = os.path.join(d, "test_batch")
  te_x, te_y = _read_cifar_batch(te_path, b"labels", 10)
  _check_test_shape(tr_x, te_x, te_path)
  return Dataset("cifar10", tr_x, tr_y, te_x, te_y, 10, *_STATS["cifar10"])


def load_cifar100(data_dir: str) -> Dataset:
  """CIFAR-100 (Krizhevsky 2009): ``train`` and ``test`` pickles, fine labels."""
  d = _cifar_dir(data_dir, "cifar-100-python", "test")
  tr_x, tr_y = _read_cifar_batch(os.path.join(d, "train"), b"fine_labels", 100)
  te_path = os.path.join(d, "test")
  te_x, te_y = _read_cifar_batch(te_path, b"fine_labels", 100)
  _check_test_shape(tr_x, te_x, te_path)
  return Dataset("cifar100", tr_x, tr_y, te_x, te_y, 100, *_STATS["cifar100"])


DATASETS = {
    "fashion_mnist": load_fashion_mnist,
    "mnist": load_mnist,
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
}


def load_dataset(name: str, data_dir: str | None = None) -> Dataset:
  """Loads a registered dataset; ``data_dir`` defaults only for Fashion-MNIST."""
  if name not in DATASETS:
    raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
  if data_dir is None:
    if name != "fashion_mnist":
      raise DatasetError(f"dataset {name!r} needs a data_dir")
    data_dir = FASHION_MNIST_DIR
  return DATASETS[name](data_dir)


# ---------------------------------------------------------------------------
# Splits and on-device preprocessing
# ---------------------------------------------------------------------------


def train_val_split(images: np.ndarray, labels: np.ndarray, val_fraction: float, seed: int):
  """Deterministic random hold-out: the same ``seed`` always gives the same split.

  Returns ``(train_images, train_labels, val_images, val_labels)``. Uses numpy's
  PCG64 so the split does not depend on the JAX version or backend.
  """
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
  n = len(labels)
  if len(images) != n:
    raise ValueError(f"{len(images)} images but {n} labels")
  n_val = int(round(n * val_fraction))
  if not 0 < n_val < n:
    raise ValueError(f"val_fraction {val_fraction} of {n} examples leaves an empty side")
  perm = np.random.default_rng(seed).permutation(n)
  val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
  return images[train], labels[train], images[val], labels[val]


def normalize(images, mean, std):
  """uint8 NHWC -> float32 ``(x / 255 - mean) / std`` per channel (jittable)."""
  x = jnp.asarray(images, jnp.float32) * (1.0 / 255.0)
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def random_crop_flip(key, images, pad: int = 4, flip: bool = True):
  """Per-image random crop after zero padding, and random horizontal flip (jittable).

  The standard CIFAR augmentation of He et al. (2016) used by NAS-Bench-201.
  Works on a normalised float batch ``[B, H, W, C]``, so the zero padding is
  the mean colour (torchvision's usual ``RandomCrop`` before ``Normalize`` pads
  black); padding after normalising keeps the whole step one fused pass.
  """
  b, h, w, _ = images.shape
  k_off, k_flip = jax.random.split(key)
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = jax.random.randint(k_off, (b, 2), 0, 2 * pad + 1)

  def crop(img, off):
    return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))

  out = jax.vmap(crop)(padded, offsets)
  if flip:
    do_flip = jax.random.bernoulli(k_flip, 0.5, (b, 1, 1, 1))
    out = jnp.where(do_flip, out[:, :, ::-1, :], out)
  return out


def default_augment(dataset: str, augment: bool | None = None) -> bool:
  """``augment`` if set, else the usual choice: crop + flip for CIFAR, none for (Fashion-)MNIST."""
  return dataset.startswith("cifar") if augment is None else bool(augment)


def make_preprocess(mean, std, augment: bool = False, pad: int = 4, flip: bool = True):
  """``preprocess(key, uint8_batch) -> float32_batch``: normalise, then augment if asked.

  For CIFAR use ``augment=True`` (crop + flip); for (Fashion-)MNIST the usual
  choice is no augmentation (flips change the meaning of digits).
  """
  mean, std = tuple(mean), tuple(std)

  def preprocess(key, images):
    x = normalize(images, mean, std)
    if augment:
      x = random_crop_flip(key, x, pad=pad, flip=flip)
    return x

  return preprocess
