"""results.json: one builder for every kind of search (init/ask/tell, DARTS, Hyperband).

Each kind computes its per-seed ``runs`` (seed, best architecture string, best score,
trajectory and its own fields); ``summary_of`` and ``document`` give every results.json
the same skeleton: ``config``, ``summary`` (means and spreads over seeds, the best run),
``runs``, ``trajectory_axes`` (what a run's trajectory plots), ``budget``, and the
search kind's own sections.
"""

from __future__ import annotations

import numpy as np


def summary_of(runs: list[dict], values: dict | None = None, stats=()) -> dict:
  """Mean and std over seeds of ``best_score`` and of each field in ``stats``, then the
  best run's seed and architecture (the first best on ties).

  ``values`` maps a field to its per-run values where those are more exact than the
  rounded ones in ``runs`` (the init/ask/tell searches pass their float32 results).
  """
  values = values or {}
  column = lambda k: np.asarray(values.get(k, [r[k] for r in runs]))
  out = {}
  for k in ("best_score",) + tuple(stats):
    v = column(k)
    out[f"{k}_mean"], out[f"{k}_std"] = float(np.mean(v)), float(np.std(v))
  best = int(np.argmax(column("best_score")))
  out["best_run_seed"] = runs[best]["seed"]
  out["best_arch"] = runs[best]["best_arch"]
  return out


def document(config, summary: dict, runs: list[dict], trajectory_axes: dict, budget: dict,
             **sections) -> dict:
  """The results.json object: ``config`` (a config with ``to_json``), ``summary``,
  ``runs``, ``trajectory_axes``, the search kind's ``sections`` and ``budget``."""
  return {"config": config.to_json(), "summary": summary, "runs": runs,
          "trajectory_axes": trajectory_axes, **sections, "budget": budget}
