"""Writes tests/data/fashion-mnist-subset/ from the full Fashion-MNIST (Xiao et al. 2017).

The subset is the first ``TRAIN_PER_CLASS`` training and ``TEST_PER_CLASS`` test images of
each class, in the files' own order (no random draw: nothing to seed), written as gzipped IDX
files with the full set's names, so ``jaxnas.datasets.load_fashion_mnist`` reads it unchanged.
The gzip stream has no file name and a zero time stamp, so rerunning this script on the same
files gives the same bytes (with the same zlib: CPython's ``zlib`` at level 9).

  python tests/data/make_fashion_mnist_subset.py [--src DIR] [--out DIR] [--check]

Only numpy and the standard library: it runs without JAX.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import sys

import numpy as np

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fashion-mnist-subset")
# 3000 training images: the tests' search splits (90 % of them) then hold exactly 1/20 of
# the full set's 54000, so a test's train_fraction is 20x what it was on the full set and
# trains on as many images as before (tests/data/fashion-mnist-subset/README.md).
TRAIN_PER_CLASS = 300
TEST_PER_CLASS = 100
NUM_CLASSES = 10


def _read_idx(path: str) -> np.ndarray:
  """A gzipped uint8 IDX file (the only kind Fashion-MNIST has) as an array."""
  with gzip.open(path, "rb") as f:
    raw = f.read()
  if raw[:3] != b"\0\0\x08":
    raise ValueError(f"not a uint8 IDX file: {path}")
  ndim = raw[3]
  shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _idx_gz(arr: np.ndarray) -> bytes:
  """``arr`` (uint8) as a gzipped IDX file, byte for byte reproducible."""
  header = bytes([0, 0, 0x08, arr.ndim]) + np.asarray(arr.shape, ">u4").tobytes()
  buf = io.BytesIO()
  with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as f:
    f.write(header + np.ascontiguousarray(arr, np.uint8).tobytes())
  return buf.getvalue()


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
  """Sorted indices of the first ``per_class`` examples of each class."""
  picked = [np.flatnonzero(labels == c)[:per_class] for c in range(NUM_CLASSES)]
  if any(len(p) < per_class for p in picked):
    raise ValueError(f"fewer than {per_class} examples in some class")
  return np.sort(np.concatenate(picked))


def subset_files(src: str = DEBIAN_DIR) -> dict[str, bytes]:
  """``{file name: gzipped IDX bytes}`` of the subset of the full set in ``src``."""
  files = {}
  for prefix, per_class in (("train", TRAIN_PER_CLASS), ("t10k", TEST_PER_CLASS)):
    images = _read_idx(os.path.join(src, f"{prefix}-images-idx3-ubyte.gz"))
    labels = _read_idx(os.path.join(src, f"{prefix}-labels-idx1-ubyte.gz"))
    keep = first_per_class(labels, per_class)
    files[f"{prefix}-images-idx3-ubyte.gz"] = _idx_gz(images[keep])
    files[f"{prefix}-labels-idx1-ubyte.gz"] = _idx_gz(labels[keep])
  return files


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--src", default=DEBIAN_DIR, help="the full set's folder")
  p.add_argument("--out", default=OUT_DIR, help="where the subset goes")
  p.add_argument("--check", action="store_true",
                 help="compare with the files in --out instead of writing them")
  args = p.parse_args(argv)
  files = subset_files(args.src)
  if args.check:
    differ = []
    for name, data in files.items():
      path = os.path.join(args.out, name)
      if not os.path.isfile(path) or open(path, "rb").read() != data:
        differ.append(name)
    print("differs: " + ", ".join(differ) if differ else f"{args.out} is up to date")
    return 1 if differ else 0
  os.makedirs(args.out, exist_ok=True)
  for name, data in files.items():
    with open(os.path.join(args.out, name), "wb") as f:
      f.write(data)
    print(f"{name}: {len(data)} bytes")
  return 0


if __name__ == "__main__":
  sys.exit(main())
