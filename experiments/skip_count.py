"""Skip connections in DARTS-derived cells over seeds: does the search collapse to skips?

  python experiments/skip_count.py --seeds=4 --epochs=4 --channels=4 --search_fraction=0.05

Runs ``--strategy=darts`` on Fashion-MNIST in the NAS-Bench-201 space for each
variant (DARTS first order, DARTS-, GDAS by default), ``--seeds`` seeds vmapped in
one search each, and counts ``skip_connect`` edges in every seed's derived cell
after every epoch (from the search's metrics.jsonl). DARTS' known failure is a
skip count that grows with search length (Zela et al. 2020; Chu et al. 2021);
DARTS- and GDAS are meant to hold it down. Prints one line per variant and, as
the last line, a JSON object with the per-epoch mean ± std over seeds. The
searches go under ``--workdir`` as ``<variant>-o<order>-k<cache key>``: rerunning
reuses finished searches (and resumes unfinished ones) made under the same key
(``result_cache.py``: the jaxnas source, the conv implementation, the jax
version); one made under another key, or before keys, is recomputed and the
output says why. Reused parts are printed (``[cache] ...``) and recorded
(``variants[...]["search"]``; ``cache``: the key and counts).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from absl import app, flags

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

import result_cache  # noqa: E402
from jaxnas import runner  # noqa: E402

flags.DEFINE_integer("seeds", 4, "Seeds per variant (vmapped in one search).")
flags.DEFINE_integer("epochs", 4, "Search epochs.")
flags.DEFINE_float("search_fraction", 0.05, "Fraction of the training set the search uses.")
flags.DEFINE_integer("channels", 4, "C of the supernet.")
flags.DEFINE_integer("cells", 1, "Cells per stage N.")
flags.DEFINE_string("variants", "darts:1,darts-:1,gdas:1", "variant:order list.")
flags.DEFINE_string("workdir", "runs/skip_count", "Where the searches go.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  t0 = time.time()
  cache = result_cache.Cache()
  out = {}
  for spec in FLAGS.variants.split(","):
    variant, order = spec.split(":")
    config = runner.SearchConfig(
        evaluator="train", dataset="fashion_mnist", strategy="darts", num_seeds=FLAGS.seeds,
        checkpoint_every=1,
        strategy_args=tuple(sorted((("darts_variant", variant), ("darts_order", int(order))))),
        evaluator_args=tuple(sorted((("channels", FLAGS.channels), ("cells", FLAGS.cells),
                                     ("epochs", float(FLAGS.epochs)),
                                     ("train_fraction", FLAGS.search_fraction)))))
    entry = cache.entry(FLAGS.workdir, f"{variant}-o{order}")
    workdir = entry.path
    log_before = result_cache.log_lines(os.path.join(workdir, "metrics.jsonl"))
    results = runner.run(config, workdir)
    record = cache.record(f"search {variant} (order {order})", entry, result_cache.status_of(
        results["already_finished"], log_before))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      epochs = [json.loads(line) for line in f if line.strip()]
    per_epoch = [[a.count("skip_connect") for a in e["archs"]] for e in epochs]
    out[f"{variant} (order {order})"] = {
        "skip_count_per_epoch_mean": [round(float(np.mean(s)), 3) for s in per_epoch],
        "skip_count_per_epoch_std": [round(float(np.std(s)), 3) for s in per_epoch],
        "final_skip_counts": [r["skip_count"] for r in results["runs"]],
        "final_cells": [r["best_arch"] for r in results["runs"]],
        "nb201_cifar10_test12_mean": results["summary"].get("nb201_cifar10_test12_mean"),
        "search": record}
    row = out[f"{variant} (order {order})"]
    print(f"{variant} order {order}: skips per epoch "
          + " ".join(f"{m:.2f}±{s:.2f}" for m, s in zip(row["skip_count_per_epoch_mean"],
                                                        row["skip_count_per_epoch_std"]))
          + f"; final {row['final_skip_counts']}", flush=True)
  print(json.dumps({"variants": out, "seconds": round(time.time() - t0, 1),
                    "cache": cache.summary(),
                    "flags": {k: FLAGS[k].value for k in ("seeds", "epochs", "search_fraction",
                                                          "channels", "cells", "variants")}}))


if __name__ == "__main__":
  app.run(main)
