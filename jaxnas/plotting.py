"""Plots of finished searches (matplotlib is an optional extra: ``pip install jaxnas[plot]``)."""

from __future__ import annotations

import os

import numpy as np


def have_matplotlib() -> bool:
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    return False
  return True


def _pyplot():
  """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is missing."""
  if not have_matplotlib():
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig, path: str) -> str:
  import matplotlib.pyplot as plt
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  return path


# Axes of a trajectory whose results.json does not name them (``trajectory_axes``).
DEFAULT_AXES = {"x": "architectures evaluated", "y": "best validation accuracy so far (%)"}


def plot_trajectories(results: dict, path: str) -> str | None:
  """Each run's trajectory (results.json ``runs[i].trajectory``): mean, ±1 std band and
  min-max over seeds, on the axes ``results["trajectory_axes"]`` names (by default the
  best-so-far validation score against architectures evaluated).

  Returns the path written, or None when matplotlib is not installed.
  """
  plt = _pyplot()
  if plt is None:
    return None

  traj = np.asarray([r["trajectory"] for r in results["runs"]], np.float64)
  x = np.arange(1, traj.shape[1] + 1)
  mean, std = traj.mean(0), traj.std(0)
  c = results["config"]
  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  ax.fill_between(x, traj.min(0), traj.max(0), alpha=0.15, color="C0", label="min-max")
  ax.fill_between(x, mean - std, mean + std, alpha=0.3, color="C0", label="±1 std")
  ax.plot(x, mean, color="C0", label=f"mean of {traj.shape[0]} seeds")
  opt = results.get("summary", {}).get("table_optimum")
  if opt:
    ax.axhline(opt["best_val"], color="k", ls="--", lw=1, label="table optimum")
  from matplotlib.ticker import MaxNLocator
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # evaluations, epochs: counts
  axes = {**DEFAULT_AXES, **results.get("trajectory_axes", {})}
  ax.set_xlabel(axes["x"])
  ax.set_ylabel(axes["y"])
  summary = results.get("summary", {})
  if "supernet_val_acc_mean" in summary:  # a gradient-based search: its cells' own number too
    ax.axhline(summary["best_score_mean"], color="C3", ls=":", lw=1.5,
               label="derived cells, supernet weights (mean)")
  ax.set_title(f"{c['strategy']} on {c['evaluator']}/{c['dataset']}")
  if traj.shape[1] > 10:  # a long best-so-far curve: start the axis after its first climb
    lo = np.percentile(traj[:, 9], 5)
    ax.set_ylim(lo, (opt["best_val"] if opt else traj.max()) + 0.5)
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize=8)
  return _save(fig, path)


def plot_pareto(front: dict, path: str) -> str | None:
  """Every evaluated cell (grey) and the Pareto front (pooled over runs) in (cost, accuracy)."""
  plt = _pyplot()
  if plt is None:
    return None

  objectives = front["objectives"]
  fig, axes = plt.subplots(1, len(objectives) - 1, figsize=(5.5 * (len(objectives) - 1), 4),
                           dpi=120, squeeze=False)
  for ax, cost_name in zip(axes[0], objectives[1:]):
    pts = front["evaluated"]
    ax.scatter([p[cost_name] for p in pts], [p["accuracy"] for p in pts], s=6, c="0.7",
               label=f"evaluated ({len(pts)})")
    pf = sorted(front["pooled"], key=lambda p: (p[cost_name], -p["accuracy"]))
    ax.step([p[cost_name] for p in pf], [p["accuracy"] for p in pf], where="post", color="C3")
    ax.scatter([p[cost_name] for p in pf], [p["accuracy"] for p in pf], s=18, c="C3",
               label=f"Pareto front ({len(pf)}, pooled over runs)")
    ax.set_xscale("log")
    ax.set_xlabel(cost_name)
    ax.set_ylabel("validation accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
  return _save(fig, path)
