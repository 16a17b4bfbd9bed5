"""Do DARTS' derived NAS-Bench-201 cells beat random cells when retrained the same way?

  python experiments/darts_vs_random.py --seeds=3 --random_cells=6 --search_epochs=2 \
      --retrain_epochs=0.5 --channels=8

Runs ``--strategy=darts`` searches on Fashion-MNIST (one vmapped search per
variant, ``--seeds`` seeds each: DARTS first order, DARTS second order, GDAS),
retrains every derived cell with ``--mode=retrain`` settings (full training
set, test set scored once), retrains ``--random_cells`` uniformly random cells
identically, and prints per-method mean ± std test accuracy and skip counts;
the last line is a JSON object. Writes its runs under ``--workdir``.

``--selection=perturbation`` reads each search's cell by DARTS-PT instead of
alpha's argmax (``--darts_selection``). The selection does not change the
search, so when the magnitude search of the same settings is already in the
workdir, its checkpoints seed the new search's workdir (the search resumes at
its last saved epoch, reruns that epoch bit-identically and then selects)
instead of being recomputed.
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

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

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


def _retrain(arch: str, seed: int) -> dict:
  c = retrain.RetrainConfig(arch=arch, epochs=FLAGS.retrain_epochs, channels=FLAGS.channels,
                            cells=FLAGS.cells, seed=seed)
  tag = (hashlib.sha1(arch.encode()).hexdigest()[:10] +
         f"-s{seed}-e{FLAGS.retrain_epochs:g}-c{FLAGS.channels}-n{FLAGS.cells}")
  return retrain.retrain(c, os.path.join(FLAGS.workdir, "retrain", tag))


def main(argv):
  del argv
  import jax
  from jaxnas.spaces import nb201_space
  t0 = time.time()
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
    if FLAGS.selection == "perturbation":
      selection = (("darts_selection", "perturbation"),
                   ("darts_selection_batches", FLAGS.selection_batches))
      if FLAGS.tune_steps >= 0:
        selection += (("darts_tune_steps", FLAGS.tune_steps),)
      config = dataclasses.replace(config, strategy_args=tuple(sorted(config.strategy_args +
                                                                      selection)))
      magnitude = os.path.join(FLAGS.workdir, name, "checkpoints")
      name += f"-pt{FLAGS.tune_steps if FLAGS.tune_steps >= 0 else ''}b{FLAGS.selection_batches}"
      seeded = os.path.join(FLAGS.workdir, name, "checkpoints")
      if os.path.isdir(magnitude) and not os.path.exists(seeded):
        shutil.copytree(magnitude, seeded)
        shutil.copy(os.path.join(os.path.dirname(magnitude), "metrics.jsonl"),
                    os.path.dirname(seeded))
    runner.validate(config)
    results = runner.run(config, os.path.join(FLAGS.workdir, name))
    accs = [_retrain(r["best_arch"], 0)["test_accuracy"] for r in results["runs"]]
    label = f"{variant} (order {order})" + (", PT" if FLAGS.selection == "perturbation" else "")
    rows[label] = {
        "test_accuracy": accs, "cells": [r["best_arch"] for r in results["runs"]],
        "skip_count": [r["skip_count"] for r in results["runs"]]}
    print(f"{label}: {np.mean(accs):.2f} ± {np.std(accs):.2f} %", flush=True)
  space = nb201_space()
  keys = jax.random.split(jax.random.PRNGKey(12345), FLAGS.random_cells)
  cells = [space.encode(space.sample(k)) for k in keys]
  accs = [_retrain(c, 0)["test_accuracy"] for c in cells]
  rows["random"] = {"test_accuracy": accs, "cells": cells,
                    "skip_count": [c.count("skip_connect") for c in cells]}
  print(f"random: {np.mean(accs):.2f} ± {np.std(accs):.2f} %", flush=True)
  summary = {k: {"mean": round(float(np.mean(v["test_accuracy"])), 3),
                 "std": round(float(np.std(v["test_accuracy"])), 3),
                 "n": len(v["test_accuracy"]),
                 "skip_count_mean": round(float(np.mean(v["skip_count"])), 3)}
             for k, v in rows.items()}
  for k, v in summary.items():
    print(f"{k:>18}: {v['mean']:.2f} ± {v['std']:.2f} % (n={v['n']}), "
          f"{v['skip_count_mean']:.2f} skips")
  print(json.dumps({"summary": summary, "rows": rows, "seconds": round(time.time() - t0, 1),
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
