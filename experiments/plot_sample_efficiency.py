"""Queries-to-optimum curves from experiments/results/sample_efficiency.json.

For each dataset, the share of seeds (of 100) that have evaluated the cell with the
table's best validation accuracy after n evaluations, per strategy
(``bench_sample_efficiency.py`` records each seed's number of queries; a seed that never
found it within the budget counts as not found).

  python experiments/plot_sample_efficiency.py [--json=...] [--out=...png]
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--json", default=os.path.join(HERE, "results", "sample_efficiency.json"))
  p.add_argument("--out", default=os.path.join(HERE, "results", "sample_efficiency_queries.png"))
  args = p.parse_args()
  with open(args.json) as f:
    results = json.load(f)["results"]
  datasets = list(next(iter(results.values())))
  fig, axes = plt.subplots(1, len(datasets), figsize=(4.2 * len(datasets), 3.6), sharey=True)
  for ax, dataset in zip(np.atleast_1d(axes), datasets):
    for name, per_dataset in results.items():
      r = per_dataset.get(dataset)
      if not r:
        continue
      budget = max(int(b) for b in r["budgets"])
      q = np.asarray([x if x is not None and x > 0 else np.inf for x in r["queries"]], float)
      n = np.arange(1, budget + 1)
      share = (q[None, :] <= n[:, None]).mean(1)
      ax.plot(n, 100 * share, label=name, lw=2 if name == "gp_bo" else 1)
    ax.axvline(100, color="grey", lw=0.5, ls=":")
    ax.set_title(dataset)
    ax.set_xlabel("evaluations")
  np.atleast_1d(axes)[0].set_ylabel("seeds that found the best-validation cell (%)")
  np.atleast_1d(axes)[-1].legend(loc="upper left", fontsize=8)
  fig.tight_layout()
  fig.savefig(args.out, dpi=110)
  print(args.out)


if __name__ == "__main__":
  main()
