"""Command-line entry point: ``python -m jaxnas.main --strategy=evolution --budget=100``.

Intentionally short (as the flax examples): flags, log the devices, call
``runner.run``, print a summary. Errors the user can cause are one line on
stderr with exit status 2.
"""

from __future__ import annotations

import logging as pylogging
import os
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_string("evaluator", "nb201", "Performance estimator: nb201 (tabular NAS-Bench-201).")
flags.DEFINE_string("dataset", "cifar10", "nb201: cifar10 | cifar100 | imagenet16-120.")
flags.DEFINE_string("strategy", "evolution", "random | evolution | reinforce | local | predictor.")
flags.DEFINE_integer("budget", 100, "Architecture evaluations per run.")
flags.DEFINE_integer("num_seeds", 10, "Independent runs, vectorized into one program.")
flags.DEFINE_integer("seed", 0, "Run i uses seed + i (so it can be rerun alone).")
flags.DEFINE_string("workdir", None, "Output directory (default: runs/<evaluator>-<dataset>-...).")
flags.DEFINE_integer("checkpoint_every", 10, "Search steps between checkpoints (0: none).")
# Strategy hyperparameters: only those given are passed, and only to strategies that take them.
flags.DEFINE_integer("population_size", None, "evolution: population size (default 10).")
flags.DEFINE_integer("tournament_size", None, "evolution: tournament size (default 3).")
flags.DEFINE_integer("batch_size", None, "Architectures proposed per step (strategy default).")
flags.DEFINE_integer("num_init", None, "local, predictor: initial random samples (default 10).")
flags.DEFINE_float("learning_rate", None, "reinforce / predictor: learning rate.")
flags.DEFINE_integer("ensemble_size", None, "predictor: MLPs in the ensemble (default 5).")
_STRATEGY_FLAGS = ("population_size", "tournament_size", "batch_size", "num_init",
                   "learning_rate", "ensemble_size")


def _fail(message: str) -> None:
  print(f"jaxnas: error: {message}", file=sys.stderr)
  sys.exit(2)


class _QuietLibraries(pylogging.Filter):
  """Keeps orbax's per-save INFO chatter out of the progress log."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or not any(
        part in record.pathname for part in ("orbax", "xla_bridge"))


def _parse(argv):
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0])


def _summary(results: dict) -> str:
  c, s = results["config"], results["summary"]
  lines = [f"{c['strategy']} on {c['evaluator']}/{c['dataset']}: budget {c['budget']}, "
           f"{len(results['runs'])} seeds"
           + (" (already finished; nothing recomputed)" if results.get("already_finished") else "")]
  if "test_accuracy_mean" in s:
    lines.append(f"  test accuracy of chosen cells: {s['test_accuracy_mean']:.2f} ± "
                 f"{s['test_accuracy_std']:.2f} %  (search signal, validation: "
                 f"{s['best_score_mean']:.2f} ± {s['best_score_std']:.2f} %)")
  else:
    lines.append(f"  best score: {s['best_score_mean']:.2f} ± {s['best_score_std']:.2f}")
  best = next(r for r in results["runs"] if r["seed"] == s["best_run_seed"])
  extra = f", test {best['test_accuracy']:.2f} %" if "test_accuracy" in best else ""
  lines.append(f"  best architecture (seed {best['seed']}): {best['best_arch']}  "
               f"val {best['best_score']:.2f} %{extra}")
  if "table_optimum" in s:
    o = s["table_optimum"]
    lines.append(f"  table optimum: val {o['best_val']:.2f} %, its test {o['test_of_best_val']:.2f} %")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # Imported here so that --help and flag errors answer before JAX starts.
  import jax
  from jaxnas import plotting, runner
  from jaxnas.checkpoint import CheckpointError

  strategy_args = tuple(sorted((k, getattr(FLAGS, k)) for k in _STRATEGY_FLAGS
                               if getattr(FLAGS, k) is not None))
  config = runner.SearchConfig(
      evaluator=FLAGS.evaluator, dataset=FLAGS.dataset, strategy=FLAGS.strategy,
      budget=FLAGS.budget, num_seeds=FLAGS.num_seeds, seed=FLAGS.seed,
      checkpoint_every=FLAGS.checkpoint_every, strategy_args=strategy_args)
  workdir = FLAGS.workdir or runner.default_workdir(config)
  try:
    runner.validate(config)
    logging.info("jaxnas on %s: %s", jax.default_backend(), jax.devices())
    results = runner.run(config, workdir)
  except (runner.UserError, CheckpointError) as e:
    _fail(str(e))
  except OSError as e:
    _fail(f"{e.strerror or e}: {e.filename or workdir}")
  plot = os.path.join(workdir, "trajectory.png")
  if not os.path.exists(plot):
    if plotting.plot_trajectories(results, plot) is None:
      print("matplotlib is not installed, so no plot was saved "
            "(pip install 'jaxnas[plot]' to get trajectory.png)")
  print(_summary(results))
  print(f"  workdir: {workdir} (results.json, metrics.jsonl, config.json"
        + (", trajectory.png)" if os.path.exists(plot) else ")"))


def run_cli():
  app.run(main, flags_parser=_parse)


if __name__ == "__main__":
  run_cli()
