"""Does a one-shot supernet rank networks like stand-alone training does?

  python experiments/spos_correlation.py                      # NAS-Bench-201 cells, SPOS
  python experiments/spos_correlation.py --space=mbconv --sampling=sandwich \
      --out=experiments/results/spos_correlation_mbconv_sandwich.json

Trains a weight-sharing supernet (``--evaluator=supernet``,
``jaxnas.estimators.one_shot``) on the Fashion-MNIST proxy split, samples
``--num_archs`` distinct random members of ``--space`` (fixed ``--seed``), scores
them with inherited weights (BN recalibrated per member), trains the same
members stand-alone with jaxnas' training evaluator on the same split
(``--standalone_epochs``), and reports rank agreement: Spearman's rho, Kendall's
tau-b, top-k overlap, plus both scores' Spearman rho with the parameter count
(the baseline a cheap estimator must beat).

``--sampling`` is how the supernet trains: ``uniform`` is single-path one-shot
(Guo et al. 2020, SPOS: one uniformly random member per step); ``sandwich`` is the
sandwich rule (Yu et al. 2020, BigNAS; the largest/smallest idea of Cai et al.
2020, Once-for-All): the largest member, the smallest and one random member each
step, their gradients summed into one update (no in-place distillation).
NAS-Bench-201's ops have no size order: use ``uniform`` there.

``--space=nb201``: NAS-Bench-201 cells (Dong & Yang 2020) with ``--channels``
and ``--cells``; agreement over all cells and over connected cells only (a
disconnected cell sits at chance under both, so those ties flatter the
correlation), and each score's Spearman rho with the NAS-Bench-201 12-epoch
CIFAR-10 validation accuracy (a reference from long training on another
dataset). ``--space=mbconv``: the MBConv macro space (``jaxnas.spaces.mbconv``:
depth per stage, kernel and expansion per block, width per stage; its layout is
fixed, so ``--channels``/``--cells`` are refused), members distinct as networks
(canonical vectors), all counted as connected, and the Spearman rho with FLOPs
as well as parameters (the model's exact cost); no table column.

Under ``--workdir`` the supernet is checkpointed
(``supernet-<hash of its training settings, sampling and space included>-k<cache key>``:
a rerun resumes or reuses it, also with other ``--bn_batches``) and the
stand-alone accuracies are cached (``standalone-<hash of members and
settings>-k<cache key>.json``: a variant of the supernet settings, ``--sampling``
included, does not retrain them). The cache key (``result_cache.py``) covers the
jaxnas source, the conv implementation and the jax version: an entry made under
another key (or by this script before keys) is recomputed, not reused, and the
output says so. What was reused is printed (``[cache] ...`` lines) and recorded
(``summary["cache"]``: the key, counts of reused, resumed and computed parts,
and one record per part). The LAST line printed is a JSON object, also written
to ``--out`` with per-member data.
"""

from __future__ import annotations

import hashlib
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
from jaxnas.multifidelity import spearman  # noqa: E402  (average ranks for ties)

SPACES = ("nb201", "mbconv")

flags.DEFINE_enum("space", "nb201", SPACES, "The built-in space whose supernet is trained: "
                  "NAS-Bench-201 cells or the MBConv macro space (fixed layout).")
flags.DEFINE_enum("sampling", "uniform", ("uniform", "sandwich"), "Members trained per supernet "
                  "step: uniform (SPOS) or sandwich (largest, smallest, random; BigNAS).")
flags.DEFINE_integer("num_archs", 32, "Distinct random members scored both ways.")
flags.DEFINE_integer("seed", 0, "Seed of the member sample (and of stand-alone training).")
flags.DEFINE_integer("standalone_seed", None, "Seed of stand-alone training (init, minibatch "
                     "order) if not --seed: two seeds measure the ground truth's own noise.")
flags.DEFINE_integer("channels", 8, "C of the supernet and of the stand-alone networks "
                     "(nb201 only).")
flags.DEFINE_integer("cells", 1, "Cells per stage N (nb201 only).")
flags.DEFINE_integer("batch_size", 128, "Minibatch of both trainings and of BN recalibration.")
flags.DEFINE_float("train_fraction", 0.2, "Fraction of the search train/val split used.")
flags.DEFINE_float("supernet_epochs", 15.0, "Supernet epochs over the proxy training subset.")
flags.DEFINE_float("standalone_epochs", 1.5, "Stand-alone training epochs per member.")
flags.DEFINE_integer("bn_batches", 4, "BN recalibration batches per scored member.")
flags.DEFINE_integer("top_k", 5, "Top-k overlap between the two rankings.")
flags.DEFINE_string("data_dir", None, "Fashion-MNIST folder (default: the Debian package's).")
flags.DEFINE_string("workdir", "runs/spos_correlation", "Supernet checkpoints and the "
                    "stand-alone cache go under it.")
flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                        "spos_correlation.json"), "Per-member JSON output.")
FLAGS = flags.FLAGS


def kendall_tau_b(a, b) -> float:
  """Kendall's tau-b (ties in either variable corrected), O(n^2)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  da = np.sign(a[:, None] - a[None, :])
  db = np.sign(b[:, None] - b[None, :])
  iu = np.triu_indices(len(a), 1)
  da, db = da[iu], db[iu]
  denom = np.sqrt(np.count_nonzero(da) * np.count_nonzero(db))
  return float((da * db).sum() / denom) if denom > 0 else float("nan")


def top_k_overlap(a, b, k: int) -> float:
  """|top-k by a ∩ top-k by b| / k (ties broken by index)."""
  top = lambda x: set(np.argsort(-np.asarray(x, np.float64), kind="stable")[:k].tolist())
  return len(top(a) & top(b)) / k


def _digest(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def agreement(supernet, standalone, k) -> dict:
  return {"n": len(supernet), "spearman": round(spearman(supernet, standalone), 4),
          "kendall_tau_b": round(kendall_tau_b(supernet, standalone), 4),
          f"top{k}_overlap": round(top_k_overlap(supernet, standalone, k), 4)}


def sample_members(space, n: int, seed: int) -> np.ndarray:
  """``int32[n, D]``: the canonical vectors of ``n`` distinct uniformly drawn members of
  ``space`` (two vectors of one network are one member), deterministic in ``seed``."""
  import jax
  sample = jax.jit(lambda k: space.canonical(space.to_vector(space.sample(k))))
  vectors, seen, i = [], set(), 0
  while len(vectors) < n:
    v = np.asarray(sample(jax.random.fold_in(jax.random.PRNGKey(seed), i)))
    i += 1
    if tuple(v) not in seen:
      seen.add(tuple(v))
      vectors.append(v)
  return np.stack(vectors).astype(np.int32)


def main(argv):
  del argv
  nb201 = FLAGS.space == "nb201"
  if not nb201:
    given = [f"--{name}" for name in ("channels", "cells") if FLAGS[name].present]
    if given:
      raise app.UsageError(f"{' and '.join(given)} do not apply to --space={FLAGS.space} "
                           "(its layout is fixed)")
  import jax
  from jaxnas.estimators import one_shot
  from jaxnas.estimators.training import ProxySpec, train_evaluator

  t0 = time.time()
  config = one_shot.SupernetConfig(
      dataset="fashion_mnist", data_dir=FLAGS.data_dir, epochs=FLAGS.supernet_epochs,
      space=FLAGS.space, channels=FLAGS.channels, cells=FLAGS.cells,
      batch_size=FLAGS.batch_size, train_fraction=FLAGS.train_fraction,
      bn_batches=FLAGS.bn_batches, sampling=FLAGS.sampling)

  if nb201:
    from jaxnas.spaces import nb201_space
    space = nb201_space()
    # Distinct cells: draw uniformly until there are enough (deterministic in --seed).
    cells, seen, i = [], set(), 0
    while len(cells) < FLAGS.num_archs:
      arch = np.asarray(space.sample(jax.random.fold_in(jax.random.PRNGKey(FLAGS.seed), i)))
      i += 1
      if tuple(arch) not in seen:
        seen.add(tuple(arch))
        cells.append(arch)
    vectors = cells = np.stack(cells).astype(np.int32)
  else:
    space = one_shot.supernet_model(config, 10).space  # Fashion-MNIST: 10 classes
    vectors = sample_members(space, FLAGS.num_archs, FLAGS.seed)
    cells = jax.vmap(space.from_vector)(jax.numpy.asarray(vectors))

  cache = result_cache.Cache()
  # trained_by covers every training setting of the supernet, space and sampling included.
  supernet_entry = cache.entry(FLAGS.workdir,
                               f"supernet-{_digest(one_shot.trained_by(config))}")
  supernet_dir = supernet_entry.path
  supernet_log = os.path.join(supernet_dir, "supernet_metrics.jsonl")
  log_before = result_cache.log_lines(supernet_log)
  evaluator = one_shot.supernet_evaluator(config, supernet_dir)
  t_supernet = time.time() - t0
  # Unchanged epoch log: the finished supernet was only loaded.
  cache.record("supernet", supernet_entry, result_cache.status_of(
      log_before is not None and result_cache.log_lines(supernet_log) == log_before, log_before))
  print(f"supernet ready in {t_supernet:.0f} s", flush=True)
  t1 = time.time()
  supernet = np.asarray(jax.block_until_ready(evaluator.evaluate(None, cells)))
  t_score = time.time() - t1
  print(f"scored {len(vectors)} members with inherited weights in {t_score:.1f} s", flush=True)

  spec = ProxySpec(dataset="fashion_mnist", data_dir=FLAGS.data_dir,
                   epochs=FLAGS.standalone_epochs, channels=FLAGS.channels, cells=FLAGS.cells,
                   batch_size=FLAGS.batch_size, train_fraction=FLAGS.train_fraction,
                   space=FLAGS.space)
  train_seed = FLAGS.seed if FLAGS.standalone_seed is None else FLAGS.standalone_seed
  standalone_entry = cache.entry(FLAGS.workdir, "standalone-" + _digest(
      {"spec": spec._asdict(), "seed": train_seed, "cells": vectors.tolist()}), ".json")
  t1 = time.time()
  if os.path.exists(standalone_entry.path):
    with open(standalone_entry.path) as f:
      cached = json.load(f)
    standalone = np.asarray(cached["accuracy"], np.float32)
    t_standalone = cached["seconds"]
    cache.record("standalone", standalone_entry, "cached", seconds_when_trained=t_standalone)
    print(f"stand-alone accuracies reused (trained in {t_standalone:.0f} s by an earlier run)",
          flush=True)
  else:
    standalone = np.asarray(train_evaluator(spec).evaluate(jax.random.PRNGKey(train_seed), cells))
    t_standalone = time.time() - t1
    os.makedirs(FLAGS.workdir, exist_ok=True)
    with open(standalone_entry.path, "w") as f:
      json.dump({"accuracy": standalone.tolist(), "seconds": round(t_standalone, 1)}, f)
    cache.record("standalone", standalone_entry, "computed")
    print(f"trained {len(vectors)} members stand-alone in {t_standalone:.0f} s", flush=True)

  ok = np.isfinite(standalone) & np.isfinite(supernet)
  if nb201:
    from jaxnas.estimators.nb201 import load_table
    from jaxnas.estimators.zero_cost import is_connected
    from jaxnas.models import cost
    table = load_table()["val/cifar10"][np.asarray(space.rank(cells))]
    # The cheapest baseline every cheap estimator must beat (White et al. 2022): parameter count.
    ds_image, ds_channels = 28, 1  # Fashion-MNIST
    params = np.asarray(jax.vmap(lambda a: cost(a, FLAGS.channels, FLAGS.cells, 10, ds_channels,
                                                ds_image)[0])(cells))
    flops = None
    connected = np.asarray(is_connected(cells))
    versus = {
        "spearman_vs_nb201_cifar10_val12": {
            "supernet": round(spearman(supernet[ok], table[ok]), 4),
            "standalone": round(spearman(standalone[ok], table[ok]), 4)},
        "spearman_vs_params": {
            "supernet": round(spearman(supernet[ok], params[ok]), 4),
            "standalone": round(spearman(standalone[ok], params[ok]), 4),
            "nb201_cifar10_val12": round(spearman(table[ok], params[ok]), 4)}}
  else:
    # The model's exact cost of each specialised network; a fixed-layout macro space has no
    # disconnected member and no table.
    report = evaluator.report(cells)
    params, flops = np.asarray(report["params"]), np.asarray(report["flops"])
    table = [None] * len(vectors)
    connected = np.ones(len(vectors), bool)
    versus = {name: {"supernet": round(spearman(supernet[ok], x[ok]), 4),
                     "standalone": round(spearman(standalone[ok], x[ok]), 4)}
              for name, x in (("spearman_vs_params", params), ("spearman_vs_flops", flops))}
  k = FLAGS.top_k
  summary = {
      "experiment": "spos_correlation",
      "config": {name: getattr(FLAGS, name) if nb201 or name not in ("channels", "cells")
                 else None for name in (
          "space", "sampling", "num_archs", "seed", "standalone_seed", "channels", "cells",
          "batch_size", "train_fraction", "supernet_epochs", "standalone_epochs", "bn_batches",
          "top_k")},
      "supernet_dir": supernet_dir,
      "all_cells": agreement(supernet[ok], standalone[ok], k),
      "connected_cells": agreement(supernet[ok & connected], standalone[ok & connected], k),
      **versus,
      "mean_accuracy": {"supernet": round(float(np.nanmean(supernet)), 3),
                        "standalone": round(float(np.nanmean(standalone)), 3)},
      "failed_standalone": int(np.sum(~np.isfinite(standalone))),
      # standalone_train: the earlier run's training time when cache["parts"] says "cached".
      "seconds": {"supernet_train": round(t_supernet, 1), "supernet_score": round(t_score, 1),
                  "standalone_train": round(t_standalone, 1),
                  "total": round(time.time() - t0, 1)},
      "backend": jax.default_backend(),
      "cache": {**cache.summary(), "parts": cache.records},
  }
  per_cell = []
  for i, v in enumerate(vectors):
    record = {"arch": space.encode(v if nb201 else space.from_vector(v)),
              "supernet": float(supernet[i]), "standalone": float(standalone[i]),
              "nb201_cifar10_val12": None if table[i] is None else float(table[i]),
              "params": int(params[i]), "connected": bool(connected[i])}
    if flops is not None:
      record["flops"] = int(flops[i])
    per_cell.append(record)
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump({"summary": summary, "cells": per_cell}, f, indent=1)
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
