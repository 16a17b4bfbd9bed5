"""Do DARTS' derived NAS-Bench-201 cells beat random cells when retrained the same way?

  python experiments/darts_vs_random.py --seeds=3 --random_cells=6 --search_epochs=2 \
      --retrain_epochs=0.5 --channels=8

Runs ``--strategy=darts`` searches on Fashion-MNIST (one vmapped search per
variant, ``--seeds`` seeds each: DARTS first order, DARTS second order, GDAS),
retrains every derived cell with ``--mode=retrain`` settings (full training
set, test set scored once), retrains ``--random_cells`` uniformly random cells
identically, and prints per-method mean ± std test accuracy and skip counts;
the last line is a JSON object. Writes its runs under ``--workdir``; a rerun
reuses finished searches and retrains (and resumes unfinished ones) made under
the same cache key (``result_cache.py``: the jaxnas source, the conv
implementation, the jax version; it ends each run's name, ``-k<digest>``). An
entry made under another key, or before keys, is recomputed and the output
says why it was not reused. What was reused is printed (``[cache] ...``) and in
the JSON: ``rows[...]["search"]`` and ``["retrains"]`` per part, ``cache`` the
key and counts of reused, resumed and computed parts.

``--selection=perturbation`` reads each search's cell by DARTS-PT instead of
alpha's argmax (``--darts_selection``). The selection does not change the
search, so when the magnitude search of the same settings is already in the
workdir, its checkpoints seed the new search's workdir (the search resumes at
its last saved epoch, reruns that epoch bit-identically and then selects)
instead of being recomputed (its record: ``"resumed"``, ``seeded_from``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time

import numpy as np
from absl import app, flags

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

import result_cache  # noqa: E402
from jaxnas import retrain, runner  # noqa: E402

flags.DEFINE_integer("seeds", 3, "Seeds per DARTS variant (vmapped in one search).")
flags.DEFINE_integer("random_cells", 6, "Random cells retrained as the baseline.")
flags.DEFINE_float("search_epochs", 2.0, "Epochs of each DARTS search.")
flags.DEFINE_float("search_fraction", 0.2, "Fraction of the training set the search uses.")
flags.DEFINE_float("retrain_epochs", 0.5, "Epochs of each retrain (full training set).")
flags.DEFINE_integer("channels", 8, "C of the supernet and of the retrained networks.")
flags.DEFINE_integer("cells", 1, "Cells per stage N.")
flags.DEFINE_string("variants", "darts:1,darts:2,gdas:1",
                    "variant:order list; empty: only the random cells (e.g. to retrain them in a "
                    "second process beside a search, sharing the workdir's retrain cache).")
flags.DEFINE_integer("warmup_epochs", 0, "Search epochs with alpha frozen (--darts_warmup_epochs).")
flags.DEFINE_float("alpha_learning_rate", 0.0, "Adam learning rate of alpha "
                   "(--alpha_learning_rate; 0: the strategy's default, 3e-4).")
flags.DEFINE_enum("selection", "magnitude", ["magnitude", "perturbation"],
                  "How the cell is read from each search (--darts_selection).")
flags.DEFINE_integer("tune_steps", -1, "perturbation: weight steps between edge decisions "
                     "(--darts_tune_steps; -1: one search epoch).")
flags.DEFINE_integer("selection_batches", 8, "perturbation: validation minibatches per removal.")
flags.DEFINE_string("workdir", "runs/darts_vs_random", "Where searches and retrains go.")
FLAGS = flags.FLAGS


def _retrain(cache: result_cache.Cache, name: str, arch: str, seed: int) -> tuple[dict, dict]:
  """The retrain of ``arch`` (reused when finished under this cache key) and its record."""
  c = retrain.RetrainConfig(arch=arch, epochs=FLAGS.retrain_epochs, channels=FLAGS.channels,
                            cells=FLAGS.cells, seed=seed)
  tag = (hashlib.sha1(arch.encode()).hexdigest()[:10] +
         f"-s{seed}-e{FLAGS.retrain_epochs:g}-c{FLAGS.channels}-n{FLAGS.cells}")
  entry = cache.entry(os.path.join(FLAGS.workdir, "retrain"), tag)
  log_before = result_cache.log_lines(os.path.join(entry.path, "metrics.jsonl"))
  results = retrain.retrain(c, entry.path)
  return results, cache.record(name, entry, result_cache.status_of(
      results["already_finished"], log_before), arch=arch)


def _search(cache: result_cache.Cache, label: str, config, name: str, magnitude_name: str | None):
  """Runs (or reuses, or resumes) the search ``config`` under this cache key; with
  ``magnitude_name`` a missing perturbation search starts from that magnitude search's
  checkpoints (same settings, same key). Returns its results and its record."""
  entry = cache.entry(FLAGS.workdir, name)
  seeded_from = None
  if magnitude_name is not None:
    magnitude = cache.entry(FLAGS.workdir, magnitude_name).path
    if (os.path.isdir(os.path.join(magnitude, "checkpoints")) and
        not os.path.exists(os.path.join(entry.path, "checkpoints"))):
      shutil.copytree(os.path.join(magnitude, "checkpoints"),
                      os.path.join(entry.path, "checkpoints"))
      shutil.copy(os.path.join(magnitude, "metrics.jsonl"), entry.path)
      seeded_from = magnitude
  log_before = result_cache.log_lines(os.path.join(entry.path, "metrics.jsonl"))
  results = runner.run(config, entry.path)
  extra = {"seeded_from": seeded_from} if seeded_from else {}
  return results, cache.record(f"search {label}", entry, result_cache.status_of(
      results["already_finished"], log_before), **extra)


def main(argv):
  del argv
  import jax
  from jaxnas.spaces import nb201_space
  t0 = time.time()
  cache = result_cache.Cache()
  rows = {}
  for spec in filter(None, FLAGS.variants.split(",")):
    variant, order = spec.split(":")
    config = runner.SearchConfig(
        evaluator="train", dataset="fashion_mnist", strategy="darts", num_seeds=FLAGS.seeds,
        checkpoint_every=1,
        strategy_args=tuple(sorted((("darts_variant", variant), ("darts_order", int(order))) +
                                   ((("darts_warmup_epochs", FLAGS.warmup_epochs),)
                                    if FLAGS.warmup_epochs else ()) +
                                   ((("alpha_learning_rate", FLAGS.alpha_learning_rate),)
                                    if FLAGS.alpha_learning_rate else ()))),
        evaluator_args=tuple(sorted((("channels", FLAGS.channels), ("cells", FLAGS.cells),
                                     ("epochs", FLAGS.search_epochs),
                                     ("train_fraction", FLAGS.search_fraction)))))
    name = (f"search-{variant}-o{order}-e{FLAGS.search_epochs:g}-f{FLAGS.search_fraction:g}"
            f"-c{FLAGS.channels}-n{FLAGS.cells}" +
            (f"-s{FLAGS.seeds}" if FLAGS.seeds != 3 else "") +  # 3: the runs before seeds were named
            (f"-w{FLAGS.warmup_epochs}" if FLAGS.warmup_epochs else "") +
            (f"-a{FLAGS.alpha_learning_rate:g}" if FLAGS.alpha_learning_rate else ""))
    magnitude_name = None
    if FLAGS.selection == "perturbation":
      selection = (("darts_selection", "perturbation"),
                   ("darts_selection_batches", FLAGS.selection_batches))
      if FLAGS.tune_steps >= 0:
        selection += (("darts_tune_steps", FLAGS.tune_steps),)
      config = dataclasses.replace(config, strategy_args=tuple(sorted(config.strategy_args +
                                                                      selection)))
      magnitude_name = name
      name += f"-pt{FLAGS.tune_steps if FLAGS.tune_steps >= 0 else ''}b{FLAGS.selection_batches}"
    runner.validate(config)
    label = f"{variant} (order {order})" + (", PT" if FLAGS.selection == "perturbation" else "")
    results, search_record = _search(cache, label, config, name, magnitude_name)
    retrained = [_retrain(cache, f"retrain {label} seed {i}", r["best_arch"], 0)
                 for i, r in enumerate(results["runs"])]
    accs = [r["test_accuracy"] for r, _ in retrained]
    rows[label] = {
        "test_accuracy": accs, "cells": [r["best_arch"] for r in results["runs"]],
        "skip_count": [r["skip_count"] for r in results["runs"]],
        "search": search_record, "retrains": [rec for _, rec in retrained]}
    print(f"{label}: {np.mean(accs):.2f} ± {np.std(accs):.2f} %", flush=True)
  space = nb201_space()
  keys = jax.random.split(jax.random.PRNGKey(12345), FLAGS.random_cells)
  cells = [space.encode(space.sample(k)) for k in keys]
  retrained = [_retrain(cache, f"retrain random {i}", c, 0) for i, c in enumerate(cells)]
  accs = [r["test_accuracy"] for r, _ in retrained]
  rows["random"] = {"test_accuracy": accs, "cells": cells,
                    "skip_count": [c.count("skip_connect") for c in cells],
                    "retrains": [rec for _, rec in retrained]}
  print(f"random: {np.mean(accs):.2f} ± {np.std(accs):.2f} %", flush=True)
  summary = {k: {"mean": round(float(np.mean(v["test_accuracy"])), 3),
                 "std": round(float(np.std(v["test_accuracy"])), 3),
                 "n": len(v["test_accuracy"]),
                 "skip_count_mean": round(float(np.mean(v["skip_count"])), 3)}
             for k, v in rows.items()}
  for k, v in summary.items():
    print(f"{k:>18}: {v['mean']:.2f} ± {v['std']:.2f} % (n={v['n']}), "
          f"{v['skip_count_mean']:.2f} skips")
  counts = cache.summary()
  print(f"[cache] {counts['reused']} parts reused, {counts['resumed']} resumed, "
        f"{counts['computed']} computed (key {counts['digest']})", flush=True)
  print(json.dumps({"summary": summary, "rows": rows, "seconds": round(time.time() - t0, 1),
                    "cache": counts,
                    "flags": {k: FLAGS[k].value for k in ("seeds", "random_cells",
                                                          "search_epochs", "search_fraction",
                                                          "retrain_epochs", "channels",
                                                          "cells", "variants",
                                                          "warmup_epochs",
                                                          "alpha_learning_rate",
                                                          "selection", "tune_steps",
                                                          "selection_batches")}}))


if __name__ == "__main__":
  app.run(main)
