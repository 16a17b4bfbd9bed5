"""Multi-objective reporting: the saved Pareto fronts are exactly the non-dominated cells."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxnas import runner

from conftest import FASHION_MNIST_SUBSET, run_child

# The module alone on one core: 56.9 -> 36.7 s (conftest._library_compile_setting).
FAST_LIBRARY_COMPILE = True


def _brute_force_front(points, objectives):
  signs = np.asarray([1.0 if o == "accuracy" else -1.0 for o in objectives])
  v = np.asarray([[p[o] for o in objectives] for p in points]) * signs
  keep = [not np.any(np.all(v >= v[k], 1) & np.any(v > v[k], 1)) for k in range(len(v))]
  return {p["arch"] for p, k in zip(points, keep) if k}


@pytest.mark.parametrize("objectives", [("accuracy", "params"), ("accuracy", "params", "flops")])
def test_pareto_fronts_are_the_non_dominated_evaluated_cells(tmp_path, objectives):
  config = runner.SearchConfig(strategy="evolution", budget=60, num_seeds=3,
                               objectives=objectives)
  results = runner.run(config, str(tmp_path / "w"))
  with open(tmp_path / "w" / "pareto.json") as f:
    front = json.load(f)
  assert front["objectives"] == list(objectives)
  evaluated = front["evaluated"]
  assert len(evaluated) == 3 * 60
  for i, run_front in enumerate(front["per_run"]):
    mine = [p for p in evaluated if p["seed"] == i]
    assert {p["arch"] for p in run_front} == _brute_force_front(mine, objectives)
  assert {p["arch"] for p in front["pooled"]} == _brute_force_front(evaluated, objectives)
  assert results["pareto_front"]["pooled_size"] == len(front["pooled"])
  # The accuracy of a front point is the search signal; the best cell is on every front.
  for run, run_front in zip(results["runs"], front["per_run"]):
    assert max(p["accuracy"] for p in run_front) == pytest.approx(run["best_score"])


@pytest.mark.parametrize("objectives", [("params",), ("accuracy", "latency"),
                                        ("accuracy", "params", "params")])
def test_bad_objectives_are_refused(objectives):
  with pytest.raises(runner.UserError, match="--objectives"):
    runner.validate(runner.SearchConfig(objectives=objectives))


ZERO_COST_CHILD = """
import sys
from jaxnas import runner
root, data_dir = sys.argv[1:3]
# The params "proxy" is exact and cheap: evolution maximising it heads for the all-3x3 cell.
runner.run(runner.SearchConfig(evaluator="zero_cost", dataset="fashion_mnist",
                               strategy="evolution", budget=100, num_seeds=2,
                               evaluator_args=(("channels", 4), ("data_dir", data_dir),
                                               ("proxy", "params"))),
           root + "/zc")
runner.run(runner.SearchConfig(strategy="random", budget=30, num_seeds=4), root + "/plain")
# A table search's prefilter scores Fashion-MNIST images from --data_dir.
runner.run(runner.SearchConfig(strategy="random", budget=30, num_seeds=4, prefilter="params",
                               prefilter_factor=8, evaluator_args=(("data_dir", data_dir),)),
           root + "/filtered")
"""


def test_zero_cost_evaluator_and_prefilter_from_the_runner(tmp_path):
  # In a child process: the zero-cost program compiles for a minute at XLA's defaults.
  run_child(ZERO_COST_CHILD, tmp_path, FASHION_MNIST_SUBSET)
  results = {}
  for name in ("zc", "plain", "filtered"):
    with open(tmp_path / name / "results.json") as f:
      results[name] = json.load(f)
  for r in results["zc"]["runs"]:
    assert r["best_arch"].count("nor_conv_3x3") >= 5, r["best_arch"]
  # A params prefilter makes random search on the table evaluate bigger cells.
  mean_params = lambda res: np.mean([r["params"] for r in res["runs"]])
  assert mean_params(results["filtered"]) > mean_params(results["plain"])
  for r in results["filtered"]["runs"]:
    assert r["duplicate_evaluations"] == 0 and len(r["trajectory"]) == 30


def test_unknown_proxy_and_prefilter_are_refused():
  with pytest.raises(runner.UserError, match="unknown proxy"):
    runner.validate(runner.SearchConfig(evaluator="zero_cost", dataset="fashion_mnist",
                                        evaluator_args=(("proxy", "nope"),)))
  with pytest.raises(runner.UserError, match="--prefilter"):
    runner.validate(runner.SearchConfig(prefilter="nope"))
