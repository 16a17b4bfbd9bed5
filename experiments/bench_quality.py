"""Search quality on NAS-Bench-201: jaxnas strategies against plain-Python and Optuna peers.

Protocol (the foundation issue's): ``--budget`` evaluations, ``--seeds`` seeds,
on each dataset; a search sees only the 12-epoch validation accuracy; the
number reported is the 12-epoch *test* accuracy of the architecture it chose by
validation accuracy, as mean +- std (and standard error) over seeds, next to
the table optimum (test accuracy of the best-validation cell) and the gap.

  python experiments/bench_quality.py [--budget=100] [--seeds=100] \
      [--datasets=cifar10,cifar100,imagenet16-120] \
      [--strategies=random,evolution,reinforce,local,predictor] \
      [--peers=python_re,python_re_nodup,python_re_node,tpe,python_random] \
      [--tpe_seeds=N] [--out=experiments/results/quality.json]

jaxnas strategies run with their default hyperparameters (evolution:
population 10, tournament 3), all seeds in one ``jit(vmap(scan))``; seed i is
``PRNGKey(i)`` for jaxnas and ``i`` for the peers. Wall time is end to end per
(method, dataset): for jaxnas compile + run (``compiled_s`` is a second,
already-compiled run). Welch t-tests compare jaxnas evolution with the
plain-Python RE variants. The LAST line printed is a compact JSON summary.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

import peers as peers_lib  # noqa: E402

DEFAULT_PEERS = "python_re,python_re_nodup,python_re_node,tpe,python_random"
# (jaxnas strategy, peer) pairs tested for "jaxnas matches the reference".
COMPARISONS = (("evolution", "python_re"), ("evolution", "python_re_nodup"),
               ("random", "python_random"))


def run_strategy(name: str, dataset: str, seeds: int, budget: int) -> dict:
  """One jaxnas strategy vmapped over seeds; per-seed arrays and wall times."""
  import jax
  import jax.numpy as jnp
  from jaxnas.estimators import nb201_evaluator
  from jaxnas.search import make_search, results_of
  from jaxnas.strategies import STRATEGIES

  t0 = time.perf_counter()
  ev = nb201_evaluator(dataset)
  search = make_search(STRATEGIES[name](ev.space), ev, budget)

  @jax.jit
  def run(keys):
    state = jax.vmap(search.init)(keys)
    state, _ = jax.vmap(lambda s: search.run_chunk(s, 0, search.num_steps))(state)
    return jax.vmap(lambda s: results_of(search, s))(state)

  keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(seeds))
  r = jax.block_until_ready(run(keys))
  total = time.perf_counter() - t0
  t1 = time.perf_counter()
  jax.block_until_ready(run(keys))
  compiled = time.perf_counter() - t1
  return {
      "test_accuracy": np.asarray(r["report"]["test_accuracy"], np.float32),
      "val_accuracy": np.asarray(r["best_score"], np.float32),
      "trajectory": np.asarray(r["trajectory"], np.float32),
      "num_duplicates": np.asarray(r["num_duplicates"], np.int32),
      "archs": [tuple(int(x) for x in v) for v in np.asarray(r["best_vector"])],
      "time_s": total, "compiled_s": compiled,
  }


def run_peer(name: str, dataset: str, seeds: int, budget: int) -> dict:
  t0 = time.perf_counter()
  out = peers_lib.run_peer(name, dataset, seeds, budget)
  out["time_s"] = time.perf_counter() - t0
  return out


def welch(a: np.ndarray, b: np.ndarray) -> dict:
  """Welch's t-test of mean(a) vs mean(b): difference, its standard error, t, df, p-values."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
  diff, se = a.mean() - b.mean(), math.sqrt(va + vb)
  t = diff / se if se > 0 else 0.0
  df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if se > 0 else math.inf
  try:
    from scipy import stats
    p_two, p_less = 2 * stats.t.sf(abs(t), df), stats.t.cdf(t, df)
  except ImportError:  # normal approximation, fine for df ~ 200
    p_less = 0.5 * math.erfc(-t / math.sqrt(2))
    p_two = math.erfc(abs(t) / math.sqrt(2))
  # p_less: one-sided p for "a is worse than b"; large p = no evidence a is worse.
  return {"diff": diff, "se": se, "ci95": [diff - 1.96 * se, diff + 1.96 * se], "t": t,
          "df": df, "p_two_sided": float(p_two), "p_a_worse": float(p_less)}


def check_equivalence(dataset: str, seeds: int, budget: int) -> dict:
  """jaxnas evolution vs plain-Python RE that re-draws repeats: same distribution?

  Welch t-tests on the chosen test and validation accuracy and on the
  best-so-far validation after 10, 20, 50 evaluations, plus a two-sample
  Kolmogorov-Smirnov test of the chosen test accuracy when scipy is installed.
  """
  j = run_strategy("evolution", dataset, seeds, budget)
  p = run_peer("python_re_nodup", dataset, seeds, budget)
  out = {"seeds": seeds,
         "test": welch(j["test_accuracy"], p["test_accuracy"]),
         "val": welch(j["val_accuracy"], p["val_accuracy"])}
  for t in (10, 20, 50):
    if t <= budget:
      out[f"best_val_after_{t}"] = welch(j["trajectory"][:, t - 1], p["trajectory"][:, t - 1])
  try:
    from scipy import stats
    out["ks_test_p"] = float(stats.ks_2samp(j["test_accuracy"], p["test_accuracy"]).pvalue)
  except ImportError:
    pass
  line = "  ".join(f"{k} {w['diff']:+.4f}+-{w['se']:.4f} (p {w['p_two_sided']:.2f})"
                   for k, w in out.items() if isinstance(w, dict))
  print(f"equivalence {dataset} ({seeds} seeds, jaxnas - python_re_nodup): {line}"
        + (f"  KS p {out['ks_test_p']:.2f}" if "ks_test_p" in out else ""), flush=True)
  return out


def summarize(r: dict) -> dict:
  acc = r["test_accuracy"].astype(np.float64)
  n = len(acc)
  out = {"mean": acc.mean(), "std": acc.std(ddof=1) if n > 1 else 0.0,
         "se": acc.std(ddof=1) / math.sqrt(n) if n > 1 else 0.0, "median": float(np.median(acc)),
         "min": acc.min(), "max": acc.max(), "seeds": n,
         "val_mean": float(r["val_accuracy"].mean()), "time_s": r["time_s"],
         "mean_trajectory": r["trajectory"].mean(0).tolist(),
         "test_accuracy": acc.tolist()}
  if "compiled_s" in r:
    out["compiled_s"] = r["compiled_s"]
  if "num_duplicates" in r:
    out["num_duplicates_max"] = int(r["num_duplicates"].max())
  if "num_unique" in r:
    out["num_unique_mean"] = float(r["num_unique"].mean())
  return {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in out.items()}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--budget", type=int, default=100)
  p.add_argument("--seeds", type=int, default=100)
  p.add_argument("--datasets", default="cifar10,cifar100,imagenet16-120")
  p.add_argument("--strategies", default="random,evolution,reinforce,local,predictor")
  p.add_argument("--peers", default=DEFAULT_PEERS)
  p.add_argument("--tpe_seeds", type=int, default=None, help="seeds for TPE (default --seeds)")
  p.add_argument("--check_equivalence", type=int, default=0,
                 help="also compare jaxnas evolution with python_re_nodup over this many seeds")
  p.add_argument("--out", default=os.path.join(HERE, "results", "quality.json"))
  a = p.parse_args()

  from jaxnas.estimators.nb201 import DATASETS, oracle
  from jaxnas.strategies import STRATEGIES

  datasets = [d for d in a.datasets.split(",") if d]
  for d in datasets:
    if d not in DATASETS:
      p.error(f"unknown dataset {d!r}; choose from {', '.join(DATASETS)}")
  methods = []  # (label, kind, name)
  for s in filter(None, a.strategies.split(",")):
    if s in STRATEGIES:
      methods.append((f"jaxnas:{s}", "jaxnas", s))
    else:
      print(f"skipping strategy {s!r}: not in jaxnas STRATEGIES ({', '.join(STRATEGIES)})")
  for s in filter(None, a.peers.split(",")):
    if s not in peers_lib.PEERS:
      print(f"skipping peer {s!r}: unknown (peers: {', '.join(peers_lib.PEERS)})")
    elif not peers_lib.PEERS[s][2]():
      print(f"skipping peer {s!r}: optuna is not installed")
    else:
      methods.append((s, "peer", s))

  results: dict = {}
  raw: dict = {}
  for label, kind, name in methods:
    for d in datasets:
      seeds = a.tpe_seeds if name == "tpe" and a.tpe_seeds else a.seeds
      r = (run_strategy if kind == "jaxnas" else run_peer)(name, d, seeds, a.budget)
      raw[(label, d)] = r
      results.setdefault(label, {})[d] = summarize(r)
      s = results[label][d]
      compiled = f" (compiled run {s['compiled_s']:.3f} s)" if "compiled_s" in s else ""
      print(f"  {label:22s} {d:15s} {s['mean']:6.2f} +- {s['std']:4.2f} (se {s['se']:4.2f})"
            f"  {s['time_s']:7.2f} s{compiled}", flush=True)

  oracles = {d: oracle(d) for d in datasets}
  comparisons = {}
  for strat, peer in COMPARISONS:
    for d in datasets:
      if (f"jaxnas:{strat}", d) in raw and (peer, d) in raw:
        comparisons.setdefault(f"jaxnas:{strat} vs {peer}", {})[d] = welch(
            raw[(f"jaxnas:{strat}", d)]["test_accuracy"], raw[(peer, d)]["test_accuracy"])

  equivalence = {d: check_equivalence(d, a.check_equivalence, a.budget) for d in datasets
                 if a.check_equivalence}

  # The table.
  width = 27
  print()
  print(f"NAS-Bench-201, 12-epoch test accuracy (%) of the arch chosen by 12-epoch validation; "
        f"budget {a.budget}, mean +- std (se) over seeds; time = wall s")
  print(f"{'method':22s}" + "".join(f"{d:>{width}s}{'time':>8s}" for d in datasets))
  for label, per in results.items():
    row = f"{label:22s}"
    for d in datasets:
      s = per[d]
      cell = f"{s['mean']:.2f} +- {s['std']:.2f} ({s['se']:.2f})"
      row += f"{cell:>{width}s}{s['time_s']:8.2f}"
    print(row)
  print(f"{'oracle (test@best val)':22s}"
        + "".join(f"{oracles[d]['test_of_best_val']:>{width}.2f}{'':8s}" for d in datasets))
  for label, per in results.items():
    row = f"{'gap ' + label:22s}"
    for d in datasets:
      row += f"{oracles[d]['test_of_best_val'] - per[d]['mean']:>{width}.2f}{'':8s}"
    print(row)
  print()
  for name, per in comparisons.items():
    for d, w in per.items():
      print(f"{name:40s} {d:15s} diff {w['diff']:+.3f} +- {w['se']:.3f} "
            f"95% CI [{w['ci95'][0]:+.3f}, {w['ci95'][1]:+.3f}]  t {w['t']:+.2f}  "
            f"p(two-sided) {w['p_two_sided']:.3f}  p(jaxnas worse) {w['p_a_worse']:.3f}")

  out = {"protocol": {"budget": a.budget, "seeds": a.seeds, "tpe_seeds": a.tpe_seeds or a.seeds,
                      "datasets": datasets, "fitness": "12-epoch validation accuracy",
                      "report": "12-epoch test accuracy of the best-validation architecture"},
         "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
         "oracle": oracles, "results": results, "comparisons": comparisons,
         "equivalence_evolution_vs_python_re_nodup": equivalence,
         "descriptions": {k: v[0] for k, v in peers_lib.PEERS.items()}}
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {a.out}")
  summary = {"budget": a.budget, "seeds": a.seeds,
             "mean_test": {lbl: {d: round(s["mean"], 3) for d, s in per.items()}
                           for lbl, per in results.items()},
             "oracle": {d: round(o["test_of_best_val"], 3) for d, o in oracles.items()},
             "time_s": {lbl: round(sum(s["time_s"] for s in per.values()), 2)
                        for lbl, per in results.items()},
             "evolution_vs_python_re_p_worse": {
                 d: round(w["p_a_worse"], 4)
                 for d, w in comparisons.get("jaxnas:evolution vs python_re", {}).items()}}
  print(json.dumps(summary, separators=(",", ":")))


if __name__ == "__main__":
  main()
