"""Sample efficiency on NAS-Bench-201: the chosen cell at several budgets, and queries to the optimum.

The same protocol as ``bench_quality.py``: a search sees only the 12-epoch
validation accuracy; the number reported for a budget ``b`` is the 12-epoch
*test* accuracy of the cell with the best validation accuracy among its first
``b`` evaluations (first one on ties, as ``jaxnas.search.results_of``), as mean
and standard error over seeds, next to the oracle (the test accuracy of the
table's best-validation cell). Each search runs once at the largest budget and
is read at every smaller one: the strategies (and Optuna's TPE) do not know the
budget, so the first ``b`` evaluations of a longer run are a run of budget ``b``
(``--check_prefix`` checks it for the jaxnas strategies of a run).

Queries to the optimum: the number of evaluations until the search first
evaluates a cell whose validation accuracy equals the table's best (cifar100's
table has two such cells, tied at 61.32; either counts). Seeds that do not find
it within the largest budget count as not found; the median is over all seeds
(reported as "> budget" when fewer than half find it).

  python experiments/bench_sample_efficiency.py [--seeds=100] [--budgets=25,50,100,200] \\
      [--datasets=cifar10,cifar100,imagenet16-120] \\
      [--strategies=gp_bo,random,evolution,local,predictor] [--peers=tpe] \\
      [--validation_only] [--out=experiments/results/sample_efficiency.json]

A strategy may carry hyperparameters, ``name:key=value:key=value`` (e.g.
``gp_bo:acquisition=ucb:num_init=5``); its label in the output is the whole
spec. ``--validation_only`` prints and stores only validation figures (the
chosen cell's validation accuracy and the queries to the optimum): the mode in
which settings are chosen, so that no test accuracy is seen while tuning
(experiments/NOTES_sample_efficiency.md). jaxnas seed i is ``PRNGKey(i)``, peer
seed i is ``i``. The LAST line printed is a compact JSON summary.
"""

from __future__ import annotations

import argparse
import ast
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

DEFAULT_STRATEGIES = "gp_bo,random,evolution,local,predictor"
# TPE figures at budget 100 recorded by bench_quality.py (experiments/NOTES_quality.md and
# BUILD_NOTES.md, "Search quality on NAS-Bench-201"), quoted when Optuna is not installed.
RECORDED_TPE_BUDGET100 = {"cifar10": (88.72, 0.04), "cifar100": (60.36, 0.09),
                          "imagenet16-120": (36.81, 0.12)}


def parse_spec(spec: str) -> tuple[str, dict]:
  """``name:key=value:...`` -> (name, kwargs); values are Python literals or strings."""
  name, *items = spec.split(":")
  kwargs = {}
  for item in items:
    key, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"strategy option {item!r} in {spec!r} is not key=value")
    try:
      kwargs[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      kwargs[key] = value
  return name, kwargs


def run_strategy(spec: str, dataset: str, seeds: int, budget: int,
                 seeds_per_call: int = 0) -> dict:
  """One jaxnas strategy (with its options), vmapped over seeds: evaluated ranks in order."""
  import jax
  import jax.numpy as jnp
  from jaxnas.estimators import nb201_evaluator
  from jaxnas.search import make_search
  from jaxnas.strategies import STRATEGIES

  name, kwargs = parse_spec(spec)
  ev = nb201_evaluator(dataset)
  search = make_search(STRATEGIES[name](ev.space, **kwargs), ev, budget)
  space = ev.space

  @jax.jit
  def run(keys):
    state = jax.vmap(search.init)(keys)
    state, _ = jax.vmap(lambda s: search.run_chunk(s, 0, search.num_steps))(state)
    return space.rank(state.archive.vectors[:, :budget]), state.num_duplicates

  t0 = time.perf_counter()
  step = seeds_per_call or seeds
  ranks, dups = [], []
  for first in range(0, seeds, step):
    keys = jax.vmap(jax.random.PRNGKey)(jnp.arange(first, min(first + step, seeds)))
    r, d = jax.block_until_ready(run(keys))
    ranks.append(np.asarray(r))
    dups.append(np.asarray(d))
  return {"ranks": np.concatenate(ranks), "num_duplicates": np.concatenate(dups),
          "time_s": time.perf_counter() - t0}


def run_tpe(dataset: str, seeds: int, budget: int) -> dict:
  """Optuna TPE (experiments/peers.py) for seeds 0..seeds-1: evaluated ranks in order."""
  import optuna
  optuna.logging.set_verbosity(optuna.logging.WARNING)
  val, _ = peers_lib.load_tables(dataset)
  t0 = time.perf_counter()
  ranks = []
  for seed in range(seeds):
    history = []

    def objective(trial):
      arch = tuple(peers_lib.OPS.index(trial.suggest_categorical(f"edge{e}", peers_lib.OPS))
                   for e in range(peers_lib.NUM_EDGES))
      history.append(peers_lib.rank(arch))
      return float(val[history[-1]])

    study = optuna.create_study(direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=budget)
    ranks.append(history)
  # The same search as peers.tpe (the same seeded sampler, so the same trajectory).
  ref = peers_lib.tpe(dataset, 0, min(budget, 25))
  if not np.array_equal(ref.trajectory, np.maximum.accumulate(val[ranks[0][:len(ref.trajectory)]])):
    raise AssertionError("TPE here and experiments/peers.py disagree")
  return {"ranks": np.asarray(ranks, np.int64), "time_s": time.perf_counter() - t0}


def summarize(ranks: np.ndarray, dataset: str, budgets: list[int], validation_only: bool) -> dict:
  """Per budget, the chosen cell's accuracies (mean, se); queries to the optimum."""
  from jaxnas.estimators.nb201 import load_table
  t = load_table()
  val, test = t[f"val/{dataset}"], t[f"test/{dataset}"]
  seeds, budget = ranks.shape
  fit = val[ranks]  # [seeds, budget]
  out: dict = {"seeds": seeds, "budgets": {}}
  for b in budgets:
    chosen = ranks[np.arange(seeds), np.argmax(fit[:, :b], axis=1)]  # first max, as results_of
    row = {"val_mean": float(val[chosen].mean()),
           "val_se": float(val[chosen].std(ddof=1) / math.sqrt(seeds))}
    if not validation_only:
      acc = test[chosen].astype(np.float64)
      row.update(test_mean=float(acc.mean()), test_se=float(acc.std(ddof=1) / math.sqrt(seeds)),
                 test_std=float(acc.std(ddof=1)))
    out["budgets"][str(b)] = row
  hit = fit >= val.max()
  found = hit.any(axis=1)
  queries = np.where(found, np.argmax(hit, axis=1) + 1, np.inf)
  median = float(np.median(queries))
  out.update(queries_median=median if math.isfinite(median) else None,
             found_share=float(found.mean()),
             queries=[int(q) if math.isfinite(q) else None for q in queries],
             found_share_at={str(b): float((queries <= b).mean()) for b in budgets})
  return out


def check_prefix(spec: str, dataset: str, seeds: int, short: int, long: int) -> bool:
  """Whether the first ``short`` evaluations of a ``long`` run equal a ``short`` run."""
  a = run_strategy(spec, dataset, seeds, short)["ranks"]
  b = run_strategy(spec, dataset, seeds, long)["ranks"][:, :short]
  return bool(np.array_equal(a, b))


def merge(paths: list[str], out_path: str) -> None:
  """Merges runs of the same protocol over different datasets into one results file."""
  runs = [json.load(open(path)) for path in paths]
  out = runs[0]
  for run in runs[1:]:
    if {k: v for k, v in run["protocol"].items() if k != "datasets"} != {
        k: v for k, v in out["protocol"].items() if k != "datasets"}:
      raise ValueError(f"cannot merge runs of different protocols: {paths}")
    out["protocol"]["datasets"] += run["protocol"]["datasets"]
    out["oracle"].update(run["oracle"])
    out["command"] = [out["command"]] if isinstance(out["command"], str) else out["command"]
    out["command"].append(run["command"])
    for label, per in run["results"].items():
      out["results"].setdefault(label, {}).update(per)
    out["prefix_check"].update(run.get("prefix_check", {}))
  with open(out_path, "w") as f:
    json.dump(out, f, indent=1)
  print(f"merged {len(paths)} runs into {out_path}")


def step_cost(spec: str, seeds: int, budget: int = 100, repeats: int = 2) -> dict:
  """Seconds per search step of ``spec``: the whole step (ask, table lookup, tell) at
  ``seeds`` seeds, jitted and vmapped, with an archive of capacity ``budget``; and
  ask+tell alone at one seed with a population of 8, on NAS-Bench-201 and DARTS."""
  import jax
  import jax.numpy as jnp
  import jaxnas
  from jaxnas.estimators import nb201_evaluator
  from jaxnas.search import make_search
  from jaxnas.strategies import STRATEGIES
  from jaxnas.strategies.base import archive_add, archive_init

  name, kwargs = parse_spec(spec)
  ev = nb201_evaluator("cifar10")
  search = make_search(STRATEGIES[name](ev.space, **kwargs), ev, budget)
  steps = 2
  run = jax.jit(jax.vmap(search.run_chunk, in_axes=(0, None, None)), static_argnums=2)
  state = jax.vmap(search.init)(jax.vmap(jax.random.PRNGKey)(jnp.arange(seeds)))
  # The first steps: gp_bo's steps have fixed shapes and fit the GP from the first one,
  # so every step costs the same at a given archive capacity.
  jax.block_until_ready(run(state, jnp.int32(0), steps))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(run(state, jnp.int32(0), steps))
    times.append((time.perf_counter() - t) / steps)
  out = {"seeds": seeds, "budget": budget, "step_s": sorted(times)[len(times) // 2]}
  for space in (ev.space, jaxnas.darts_space()):
    strategy = STRATEGIES[name](space, **{**kwargs, "batch_size": 8})
    filled = 40
    vectors = jax.vmap(space.sample_vector)(jax.random.split(jax.random.PRNGKey(1), filled))
    fitness = jax.random.uniform(jax.random.PRNGKey(2), (filled,)) * 100
    archive = archive_add(archive_init(budget, space.num_decisions), vectors,
                          jax.vmap(space.key_of)(vectors), fitness, 0, filled)
    s0 = strategy.init(jax.random.PRNGKey(0))
    ask, tell = jax.jit(strategy.ask), jax.jit(strategy.tell)
    archs, s1 = jax.block_until_ready(ask(jax.random.PRNGKey(3), s0, archive))
    f8 = jnp.linspace(50.0, 60.0, 8)
    jax.block_until_ready(tell(jax.random.PRNGKey(4), archs, f8, s1, archive))
    times = []
    for r in range(5):
      t = time.perf_counter()
      archs, s1 = ask(jax.random.PRNGKey(10 + r), s0, archive)
      jax.block_until_ready((archs, tell(jax.random.PRNGKey(4), archs, f8, s1, archive)))
      times.append(time.perf_counter() - t)
    out[f"ask_tell_population8_{space.name}_s"] = sorted(times)[2]
  print(f"  {spec}: {out}", flush=True)
  return out


def fmt_queries(s: dict, budget: int) -> str:
  m = s["queries_median"]
  return (f"{m:.0f}" if m is not None else f">{budget}") + f" ({100 * s['found_share']:.0f}%)"


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seeds", type=int, default=100)
  p.add_argument("--budgets", default="25,50,100,200")
  p.add_argument("--datasets", default="cifar10,cifar100,imagenet16-120")
  p.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                 help="comma-separated jaxnas strategies, each name[:key=value...]")
  p.add_argument("--peers", default="tpe", help="tpe, or empty for none")
  p.add_argument("--validation_only", action="store_true",
                 help="report validation figures only (for choosing settings)")
  p.add_argument("--seeds_per_call", type=int, default=0,
                 help="seeds vmapped per compiled call (0: all at once)")
  p.add_argument("--check_prefix", type=int, default=0,
                 help="also check, over this many seeds, that budget-25 runs are prefixes of "
                      "budget-50 runs")
  p.add_argument("--merge", default="",
                 help="comma-separated JSON files of earlier runs (e.g. one per dataset, run in "
                      "parallel) to merge into --out instead of running anything")
  p.add_argument("--step_cost", default="",
                 help="instead of searching, time one search step of these strategies (comma-"
                      "separated) at --cost_seeds seeds, and ask+tell at one seed with a "
                      "population of 8 on both spaces")
  p.add_argument("--cost_seeds", type=int, default=2000)
  p.add_argument("--out", default=os.path.join(HERE, "results", "sample_efficiency.json"))
  a = p.parse_args()
  if a.merge:
    merge(a.merge.split(","), a.out)
    return
  if a.step_cost:
    out = {s: step_cost(s, a.cost_seeds) for s in a.step_cost.split(",")}
    print(json.dumps(out))
    return

  from jaxnas.estimators.nb201 import DATASETS, oracle
  from jaxnas.strategies import STRATEGIES

  budgets = sorted(int(b) for b in a.budgets.split(","))
  top = budgets[-1]
  datasets = [d for d in a.datasets.split(",") if d]
  for d in datasets:
    if d not in DATASETS:
      p.error(f"unknown dataset {d!r}; choose from {', '.join(DATASETS)}")
  methods = []  # (label, kind, spec)
  for spec in filter(None, a.strategies.split(",")):
    if parse_spec(spec)[0] not in STRATEGIES:
      p.error(f"unknown strategy in {spec!r}; jaxnas has {', '.join(STRATEGIES)}")
    methods.append((spec, "jaxnas", spec))
  tpe_missing = False
  for peer in filter(None, a.peers.split(",")):
    if peer != "tpe":
      p.error(f"unknown peer {peer!r}; only tpe is run here")
    if peers_lib.tpe_available():
      methods.append(("tpe", "peer", "tpe"))
    else:
      tpe_missing = True
      print("optuna is not installed: TPE is not run; its recorded budget-100 figures are quoted")

  results: dict = {}
  for label, kind, spec in methods:
    for d in datasets:
      r = run_strategy(spec, d, a.seeds, top, a.seeds_per_call) if kind == "jaxnas" else run_tpe(
          d, a.seeds, top)
      s = summarize(r["ranks"], d, budgets, a.validation_only)
      s["time_s"] = r["time_s"]
      if "num_duplicates" in r:
        s["num_duplicates_max"] = int(r["num_duplicates"].max())
      results.setdefault(label, {})[d] = s
      key = "val" if a.validation_only else "test"
      cells = "  ".join(f"{b}: {s['budgets'][str(b)][key + '_mean']:.2f}"
                        f"+-{s['budgets'][str(b)][key + '_se']:.2f}" for b in budgets)
      print(f"  {label:34s} {d:15s} {key} {cells}  queries {fmt_queries(s, top)}"
            f"  {s['time_s']:.1f} s", flush=True)

  oracles = {d: oracle(d) for d in datasets}
  prefix = {}
  if a.check_prefix:
    for label, kind, spec in methods:
      if kind == "jaxnas":
        prefix[label] = check_prefix(spec, datasets[0], a.check_prefix, 25, 50)
        print(f"  prefix check {label}: {prefix[label]}")

  key = "val" if a.validation_only else "test"
  print()
  print(f"NAS-Bench-201 12-epoch {key} accuracy (%) of the cell chosen by validation, "
        f"{a.seeds} seeds, mean +- se; queries to the best-validation cell: median (share "
        f"found within {top})")
  for d in datasets:
    ref = oracles[d]["best_val"] if a.validation_only else oracles[d]["test_of_best_val"]
    print(f"{d}: oracle {ref:.2f}")
    print(f"  {'method':34s}" + "".join(f"{'b=' + str(b):>16s}" for b in budgets)
          + f"{'queries':>14s}")
    for label, per in results.items():
      s = per[d]
      row = "".join(f"{s['budgets'][str(b)][key + '_mean']:>9.2f} +-{s['budgets'][str(b)][key + '_se']:4.2f}"
                    for b in budgets)
      print(f"  {label:34s}{row}{fmt_queries(s, top):>14s}")
    if tpe_missing and not a.validation_only:
      m, se = RECORDED_TPE_BUDGET100[d]
      print(f"  {'tpe (recorded, budget 100 only)':34s} {m:.2f} +-{se:.2f}")

  out = {"protocol": {"seeds": a.seeds, "budgets": budgets, "datasets": datasets,
                      "fitness": "12-epoch validation accuracy",
                      "report": ("validation accuracy only (tuning mode)" if a.validation_only
                                 else "12-epoch test accuracy of the best-validation cell among "
                                      "the first b evaluations"),
                      "queries": "evaluations until a cell with the table's best validation "
                                 "accuracy is evaluated"},
         "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
         "oracle": oracles, "results": results, "prefix_check": prefix}
  if tpe_missing:
    out["tpe_recorded_budget100"] = {
        "source": "experiments/NOTES_quality.md (bench_quality.py, Optuna TPE default sampler)",
        "mean_se": RECORDED_TPE_BUDGET100}
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(out, f, indent=1)
  print(f"wrote {a.out}")
  summary = {"seeds": a.seeds, key: {lbl: {d: {b: round(s["budgets"][str(b)][key + "_mean"], 3)
                                               for b in budgets} for d, s in per.items()}
                                     for lbl, per in results.items()},
             "queries_median": {lbl: {d: s["queries_median"] for d, s in per.items()}
                                for lbl, per in results.items()},
             "found_share": {lbl: {d: s["found_share"] for d, s in per.items()}
                             for lbl, per in results.items()}}
  print(json.dumps(summary, separators=(",", ":")))


if __name__ == "__main__":
  main()
