"""Multi-objective search quality on NAS-Bench-201: the hypervolume of each run's front.

  python experiments/bench_pareto.py --seeds=100 --budget=100 --objectives=accuracy,params

Runs each strategy through ``runner.run`` (the CLI's path, ``--evaluator=nb201``,
12-epoch validation accuracy) with ``--objectives``, reads every run's Pareto front
from its results, and scores it by hypervolume: accuracy and each cost are scaled
to [0, 1] over the whole table (costs flipped, so larger is better everywhere),
and the reference point is the worst corner (0, ..., 0). The table's own front
(all 15,625 cells) gives the best hypervolume possible, so each run is reported
by its gap to it: 100 * (1 - hypervolume / table's hypervolume), in percent, lower is
better. Prints one JSON line per dataset and strategy.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--seeds", type=int, default=100)
  p.add_argument("--budget", type=int, default=100)
  p.add_argument("--objectives", default="accuracy,params")
  p.add_argument("--strategies", default="random,evolution,nsga2")
  p.add_argument("--datasets", default="cifar10,cifar100,imagenet16-120")
  args = p.parse_args()
  from jaxnas import estimators, runner
  from jaxnas.pareto import TableFront

  objectives = tuple(args.objectives.split(","))
  if len(objectives) != 2:
    sys.exit("bench_pareto.py: --objectives must name two objectives (2-D hypervolume)")
  cost = objectives[1]
  for dataset in args.datasets.split(","):
    evaluator = estimators.nb201_evaluator(dataset)
    table = TableFront(evaluator, cost)
    for strategy in args.strategies.split(","):
      config = runner.SearchConfig(evaluator="nb201", dataset=dataset, strategy=strategy,
                                   budget=args.budget, num_seeds=args.seeds,
                                   objectives=objectives)
      with tempfile.TemporaryDirectory() as workdir:
        runner.run(config, workdir)
        with open(os.path.join(workdir, "pareto.json")) as f:
          fronts = json.load(f)["per_run"]
      gap = table.gaps(fronts)
      print(json.dumps({"dataset": dataset, "strategy": strategy, "objectives": list(objectives),
                        "budget": args.budget, "seeds": args.seeds,
                        "hypervolume_gap_pct_mean": round(float(gap.mean()), 3),
                        "hypervolume_gap_pct_sem": round(float(gap.std(ddof=1) / np.sqrt(len(gap))), 3),
                        "front_size_mean": round(float(np.mean([len(f) for f in fronts])), 2),
                        "table_front_size": table.size}), flush=True)


if __name__ == "__main__":
  main()
