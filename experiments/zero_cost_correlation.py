"""How well do zero-cost proxies rank NAS-Bench-201 cells? Spearman's rho against real training.

Samples ``--num_archs`` distinct NB201 cells (seeded), trains each briefly on
Fashion-MNIST with ``jaxnas.models.train_population`` (one compiled program for
the population), scores the same cells with every proxy of
``jaxnas.estimators.zero_cost`` (one vmapped call) and reports Spearman's rank
correlation of each proxy with

* the trained Fashion-MNIST validation accuracy of this run, and
* the NB201 table's 12-epoch CIFAR-10 validation accuracy (a second,
  independent reference: long training on another dataset).

  python experiments/zero_cost_correlation.py --num_archs=50 --steps=120 --channels=8

Disconnected cells (no input-output path) are kept: they are part of the space,
train to chance and score ``-inf`` in every proxy (ties, average ranks). The
LAST line printed is a JSON object, also written to ``--out`` with per-cell data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

T_START = time.perf_counter()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxnas.datasets import load_dataset, normalize, train_val_split  # noqa: E402
from jaxnas.estimators import zero_cost as zc  # noqa: E402
from jaxnas.estimators.nb201 import load_table  # noqa: E402
from jaxnas.models import train as train_lib  # noqa: E402
from jaxnas.spaces import nb201_space  # noqa: E402


def ranks(x) -> np.ndarray:
  """Ranks 0..n-1 of ``x``, ties sharing their average rank (``-inf`` sorts first)."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind="stable")
  r = np.empty(len(x), np.float64)
  r[order] = np.arange(len(x), dtype=np.float64)
  for v in np.unique(x):
    tie = x == v
    if tie.sum() > 1:
      r[tie] = r[tie].mean()
  return r


def spearman(a, b) -> float:
  """Spearman's rho: Pearson correlation of average ranks, over pairs where neither is NaN."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  ok = ~(np.isnan(a) | np.isnan(b))
  ra, rb = ranks(a[ok]), ranks(b[ok])
  ra, rb = ra - ra.mean(), rb - rb.mean()
  denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
  return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--num_archs", type=int, default=50)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--steps", type=int, default=120, help="SGD steps of the short training")
  p.add_argument("--batch", type=int, default=128, help="training batch size")
  p.add_argument("--channels", type=int, default=8, help="C of the trained and scored network")
  p.add_argument("--cells", type=int, default=1, help="cells per stage (N)")
  p.add_argument("--proxy_batch", type=int, default=64, help="minibatch of the proxies")
  p.add_argument("--proxy_chunk", type=int, default=10, help="members vmapped at a time")
  p.add_argument("--val_examples", type=int, default=5000)
  p.add_argument("--data_dir", default=None)
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results", "zero_cost.json"))
  args = p.parse_args()

  space = nb201_space()
  rng = np.random.default_rng(args.seed)
  ranks_drawn = np.sort(rng.choice(space.size, args.num_archs, replace=False))
  archs = np.asarray(space.unrank(jnp.asarray(ranks_drawn, jnp.int32)), np.int32)
  names = [space.encode(a) for a in archs]

  ds = load_dataset("fashion_mnist", args.data_dir)
  tx, ty, vx, vy = train_val_split(ds.train_images, ds.train_labels, 1 / 6, seed=args.seed)
  data = train_lib.make_data(tx, ty, vx[:args.val_examples], vy[:args.val_examples], ds.mean,
                             ds.std)
  config = train_lib.TrainConfig(steps=args.steps, batch_size=args.batch, channels=args.channels,
                                 cells=args.cells, num_classes=ds.num_classes)

  # Proxies first (seconds), on a minibatch of the training split.
  t = time.perf_counter()
  idx = rng.choice(len(ty), args.proxy_batch, replace=False)
  images = np.asarray(normalize(tx[idx], ds.mean, ds.std))
  scores = zc.zero_cost_scores(archs, jax.random.PRNGKey(args.seed), images, ty[idx],
                               channels=args.channels, cells=args.cells,
                               num_classes=ds.num_classes, chunk=args.proxy_chunk)
  scores = {k: np.asarray(jax.block_until_ready(v), np.float64) for k, v in scores.items()}
  proxy_s = time.perf_counter() - t
  print(f"proxies: {proxy_s:.1f} s for {args.num_archs} cells (incl. compilation)", flush=True)

  t = time.perf_counter()
  acc = np.asarray(jax.block_until_ready(
      train_lib.train_population(archs, jax.random.PRNGKey(args.seed + 1), data, config)),
      np.float64)
  train_s = time.perf_counter() - t
  print(f"training: {train_s:.1f} s for {args.num_archs} cells x {args.steps} steps "
        f"(incl. compilation); mean val acc {np.nanmean(acc):.4f}", flush=True)

  table = load_table()
  nb201 = np.asarray(table["val/cifar10"], np.float64)[np.asarray(space.rank(archs))]
  rho = {name: {"fashion_mnist_trained": spearman(s, acc), "nb201_cifar10_val12": spearman(s, nb201)}
         for name, s in scores.items()}
  for name, r in rho.items():
    print(f"  {name:10s} rho vs trained {r['fashion_mnist_trained']:+.3f}   "
          f"vs NB201 cifar10 {r['nb201_cifar10_val12']:+.3f}")
  connected = np.asarray(zc.is_connected(archs))
  summary = {
      "experiment": "zero_cost_correlation", "jax": jax.__version__,
      "backend": jax.default_backend(), "num_archs": args.num_archs, "seed": args.seed,
      "steps": args.steps, "batch": args.batch, "channels": args.channels, "cells": args.cells,
      "proxy_batch": args.proxy_batch, "val_examples": args.val_examples,
      "num_disconnected": int((~connected).sum()), "num_failed": int(np.isnan(acc).sum()),
      "val_accuracy_mean": float(np.nanmean(acc)),
      "trained_vs_nb201_cifar10": spearman(acc, nb201),
      "spearman": rho,
      "spearman_connected_only": {
          name: {"fashion_mnist_trained": spearman(s[connected], acc[connected]),
                 "nb201_cifar10_val12": spearman(s[connected], nb201[connected])}
          for name, s in scores.items()},
      "proxy_s": round(proxy_s, 1), "train_s": round(train_s, 1),
      "total_s": round(time.perf_counter() - T_START, 1),
  }
  finite = lambda v: float(v) if np.isfinite(v) else None  # strict JSON: -inf/NaN as null
  cells = [{"arch": n, "val_accuracy": finite(a), "nb201_cifar10_val12": finite(b),
            **{k: finite(v[i]) for k, v in scores.items()}}
           for i, (n, a, b) in enumerate(zip(names, acc, nb201))]
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({**summary, "cells": cells}, f, indent=1)
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
