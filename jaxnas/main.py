"""Command-line entry point: ``python -m jaxnas.main --strategy=evolution --budget=100``.

Intentionally short (as the flax examples): flags, log the devices, call
``runner.run``, print a summary. Errors the user can cause are one line on
stderr with exit status 2.
"""

from __future__ import annotations

import json
import logging as pylogging
import os
import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "search", ["search", "retrain"],
                  "search: run a NAS search; retrain: train --arch from scratch and test it.")
flags.DEFINE_string("evaluator", "nb201",
                    "nb201 (tabular NAS-Bench-201) | train (real training of each population) | "
                    "zero_cost (a training-free proxy, --proxy) | supernet (one-shot: weights "
                    "inherited from a SPOS supernet trained first, --epochs of it).")
flags.DEFINE_string("proxy", None, "zero_cost: naswot (default) | synflow | grad_norm | snip | "
                    "jacov | params | flops.")
flags.DEFINE_string("prefilter", None, "Any init/ask/tell strategy: propose --prefilter_factor "
                    "times more cells and evaluate only the best by this zero-cost proxy.")
flags.DEFINE_integer("prefilter_factor", 4, "With --prefilter: proposals per evaluated cell.")
flags.DEFINE_string("dataset", None, "nb201: cifar10 | cifar100 | imagenet16-120 (default "
                    "cifar10); train: fashion_mnist | mnist | cifar10 | cifar100 (default "
                    "fashion_mnist).")
flags.DEFINE_string("strategy", "evolution", "random | evolution | reinforce | local | predictor "
                    "| gp_bo (Gaussian-process BO, fewest evaluations) | nsga2 (multi-objective, with --objectives) | hyperband (multi-fidelity over epochs) | darts (gradient-based: DARTS, GDAS, DARTS-); "
                    "the last two train networks (--evaluator=train).")
flags.DEFINE_integer("budget", 100, "Architecture evaluations per run.")
flags.DEFINE_integer("num_seeds", 10, "Independent runs, vectorized into one program.")
flags.DEFINE_integer("seed", 0, "Run i uses seed + i (so it can be rerun alone).")
flags.DEFINE_string("workdir", None, "Output directory (default: runs/<evaluator>-<dataset>-...).")
flags.DEFINE_integer("checkpoint_every", None, "Search steps between checkpoints (0: none; "
                     "default 10 for nb201, 1 (every generation) for train and supernet); "
                     "retrain: training steps between checkpoints (default one epoch).")
flags.DEFINE_float("max_hours", 0.0, "Wall-time limit of the search in hours, resumes included "
                   "(0: none). Checked between generations; results.json records it.")
flags.DEFINE_list("objectives", ["accuracy"], "accuracy, optionally with params and/or flops "
                  "(e.g. accuracy,params): saves the Pareto front of all evaluated cells as "
                  "pareto.json and pareto.png. Strategies still search on accuracy.")
flags.DEFINE_integer("population", None, "Architectures evaluated together per search step and "
                     "seed (the strategy's batch; default: the strategy's own).")
# Strategy hyperparameters: only those given are passed, and only to strategies that take them.
flags.DEFINE_integer("population_size", None, "evolution: aging population size; nsga2: "
                     "population, bred one generation per step (default 10 for both).")
flags.DEFINE_integer("tournament_size", None, "evolution: tournament size (default 3).")
flags.DEFINE_integer("num_init", None, "local, predictor: initial random samples (default 10).")
flags.DEFINE_float("learning_rate", None, "reinforce / predictor: learning rate.")
flags.DEFINE_integer("ensemble_size", None, "predictor: MLPs in the ensemble (default 5).")
flags.DEFINE_integer("eta", None, "hyperband: keep 1/eta of the cells per rung (default 3).")
flags.DEFINE_integer("rungs", None, "hyperband: fidelities per bracket, epochs/eta^(rungs-1) .. "
                     "epochs (default 3).")
flags.DEFINE_integer("hyperband_brackets", None, "hyperband: use only the first K brackets "
                     "(1: successive halving; default all).")
flags.DEFINE_enum("darts_variant", None, ["darts", "gdas", "darts-"], "darts: DARTS (softmax), "
                  "GDAS (Gumbel, hard forward) or DARTS- (auxiliary skip; default darts).")
flags.DEFINE_integer("darts_order", None, "darts: 1 (first order, default) or 2 (unrolled, exact "
                     "Hessian-vector product).")
flags.DEFINE_bool("remat", None, "darts: recompute mixed edges in the backward pass (late_remat) to save memory.")
flags.DEFINE_float("alpha_learning_rate", None, "darts: Adam learning rate of alpha (3e-4).")
flags.DEFINE_integer("darts_warmup_epochs", None, "darts: first epochs train only the weights, "
                     "alpha frozen (PC-DARTS warm-up; default 0).")
flags.DEFINE_enum("darts_selection", None, ["magnitude", "perturbation"], "darts: how the "
                  "cell is read from the search: argmax of alpha (magnitude, default) or DARTS-PT "
                  "(perturbation: each edge's op whose removal costs the supernet most validation "
                  "accuracy; NB201 space).")
flags.DEFINE_integer("darts_selection_batches", None, "darts, perturbation selection: "
                     "validation minibatches scoring each removal (default 8).")
flags.DEFINE_integer("darts_tune_steps", None, "darts, perturbation selection: weight steps "
                     "between edge decisions (default: one search epoch).")
_STRATEGY_FLAGS = {"darts_variant": "darts_variant", "darts_order": "darts_order",
                   "darts_warmup_epochs": "darts_warmup_epochs",
                   "darts_selection": "darts_selection",
                   "darts_selection_batches": "darts_selection_batches",
                   "darts_tune_steps": "darts_tune_steps",
                   "remat": "remat", "alpha_learning_rate": "alpha_learning_rate",
                   "eta": "eta", "rungs": "rungs", "hyperband_brackets": "hyperband_brackets",
                   "population": "batch_size", "population_size": "population_size",
                   "tournament_size": "tournament_size", "num_init": "num_init",
                   "learning_rate": "learning_rate", "ensemble_size": "ensemble_size"}
# How --evaluator=train trains each candidate (the proxy), and --mode=retrain its final run.
flags.DEFINE_string("data_dir", None, "Dataset folder (default for fashion_mnist: "
                    "/usr/share/datasets/fashion-mnist; CIFAR needs it).")
flags.DEFINE_bool("augment", None, "train, supernet, retrain: random crop (padding 4) + "
                  "horizontal flip of training images (default: on for CIFAR, off for "
                  "(Fashion-)MNIST).")
flags.DEFINE_float("epochs", None, "train: passes over the proxy training subset per candidate "
                   "(default 1); supernet: SPOS training epochs over it (default 5); retrain: "
                   "epochs over the full training set (default 10).")
flags.DEFINE_integer("channels", None, "Channels C of the first stage (default 16).")
flags.DEFINE_integer("cells", None, "Cells per stage N (default 1).")
flags.DEFINE_integer("batch_size", None, "Training minibatch size (default 128).")
flags.DEFINE_float("train_fraction", None, "train, supernet: fraction of the search "
                   "train/validation split used by the proxy (default 0.1).")
flags.DEFINE_integer("bn_batches", None, "supernet: training batches whose average BatchNorm "
                     "statistics each scored cell gets (default 4; 0: the supernet's stale "
                     "running statistics).")
flags.DEFINE_string("sampling", None, "supernet: which members each training step trains: "
                    "uniform (one random member, SPOS; default) or sandwich (the largest, the "
                    "smallest and a random one, BigNAS).")
flags.DEFINE_float("train_learning_rate", None, "SGD learning rate of network training "
                   "(default 0.1).")
flags.DEFINE_string("plan", None, "train: population execution plan auto | map | vmap | "
                    "sequential | sequential_static (default auto: by backend); supernet: auto "
                    "| map | vmap.")
flags.DEFINE_string("width_impl", None, "train, --space=mbconv: how width choices run where "
                    "members train one at a time (CPU's map plan): mask (the widest network, "
                    "inactive channels zero; default) | switch (each member its own widths, "
                    "several times the compile time). Not with --model (its module decides).")
flags.DEFINE_integer("cpu_devices", 0, "CPU only: expose this many single-threaded CPU devices "
                     "(e.g. one per core) so population training runs a slice per core; 0 keeps "
                     "JAX's default (one multi-threaded device).")
flags.DEFINE_bool("distributed", False, "Run as one of several processes (jax.distributed): "
                  "every process runs the same command; the processes are detected (Cloud TPU "
                  "pod, SLURM, Open MPI) or given by --coordinator_address, --num_processes "
                  "and --process_id. Seeds of table and zero-cost searches, training "
                  "populations, Hyperband's rungs, DARTS batches and the SPOS supernet's "
                  "batches and scored cells are sharded over the devices of all processes; "
                  "process 0 writes the workdir.")
flags.DEFINE_string("coordinator_address", None, "With several processes: host:port of process "
                    "0, where the others find it (implies --distributed).")
flags.DEFINE_integer("num_processes", None, "With several processes: how many (implies "
                     "--distributed).")
flags.DEFINE_integer("process_id", None, "With several processes: this one's index, 0 .. "
                     "num_processes - 1 (implies --distributed; the only flag that differs "
                     "between the processes' commands).")
flags.DEFINE_float("peer_timeout", 60.0, "With several processes: seconds a process waits for "
                   "a silent peer (killed, crashed) before it stops with an error.")
flags.DEFINE_string("compilation_cache", None, "Directory of JAX's persistent compilation cache, "
                    "so a resumed or repeated run loads its compiled programs instead of "
                    "compiling them again (default: $JAX_COMPILATION_CACHE_DIR, else "
                    "~/.cache/jaxnas/xla; '' turns it off).")
flags.DEFINE_enum("space", "nb201", ["nb201", "darts", "mbconv"], "Search space: nb201 "
                  "(NAS-Bench-201 cells), darts (DARTS normal + reduction cells; "
                  "--strategy=darts, or random/evolution/local/reinforce/predictor/hyperband "
                  "with --evaluator=train; --cells counts all cells of the network, default 5) "
                  "or mbconv (MobileNetV2-style stages of inverted-residual blocks: depth, "
                  "width, kernel and expansion; --evaluator=train|zero_cost|supernet).")
flags.DEFINE_string("model", None, "Your own searchable model instead of a built-in space: "
                    "package.module:ATTR, ATTR a jaxnas.searchable(module, space) or a "
                    "zero-argument function returning one (the working directory is "
                    "importable). Searched with --evaluator=train|zero_cost|supernet, any "
                    "strategy but darts; --mode=retrain retrains its --arch. Not with --space.")
flags.DEFINE_string("arch", None, "retrain: the architecture string, e.g. "
                    "'|nor_conv_3x3~0|+|nor_conv_3x3~0|skip_connect~1|+|...|', or of a "
                    "--model's space ('width=8,depth=1,...').")
_PROXY_FLAGS = {"proxy": "proxy", "data_dir": "data_dir", "epochs": "epochs", "channels": "channels",
                "cells": "cells", "batch_size": "batch_size", "train_fraction": "train_fraction",
                "train_learning_rate": "learning_rate", "plan": "plan",
                "width_impl": "width_impl", "bn_batches": "bn_batches", "sampling": "sampling",
                "augment": "augment"}


# Flags a retrain reads; any other flag of this CLI given with --mode=retrain is refused.
_RETRAIN_FLAGS = {"mode", "arch", "space", "model", "dataset", "data_dir", "seed", "workdir", "epochs",
                  "checkpoint_every", "augment", "channels", "cells", "batch_size",
                  "train_learning_rate", "cpu_devices", "distributed", "compilation_cache",
                  "coordinator_address", "num_processes", "process_id", "peer_timeout"}
# Flags that launch the processes of a run, not what it computes (so they may differ
# between the processes' commands; everything else must be the same).
_LAUNCH_FLAGS = ("process_id", "coordinator_address", "num_processes", "distributed",
                 "compilation_cache")
_SEARCH_ONLY_FLAGS = tuple(sorted(f.name for f in FLAGS.get_key_flags_for_module(
    sys.modules[__name__]) if f.name not in _RETRAIN_FLAGS))


def _fail(message: str) -> None:
  distributed = sys.modules.get("jaxnas.distributed")  # imported by multi-process runs only
  if distributed is not None and distributed.active():
    distributed.fail(message, 2)  # tells the other processes, which stop too
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
  model = f" (--model={c['model']})" if c.get("model") else ""
  lines = [f"{c['strategy']} on {c['evaluator']}/{c['dataset']}{model}: budget {c['budget']}, "
           f"{len(results['runs'])} seeds"
           + (" (already finished; nothing recomputed)" if results.get("already_finished") else "")]
  if "test_accuracy_mean" in s:
    lines.append(f"  test accuracy of chosen cells: {s['test_accuracy_mean']:.2f} ± "
                 f"{s['test_accuracy_std']:.2f} %  (search signal, validation: "
                 f"{s['best_score_mean']:.2f} ± {s['best_score_std']:.2f} %)")
  elif c["evaluator"] == "zero_cost":
    proxy = c.get("evaluator_args", {}).get("proxy", "naswot")
    lines.append(f"  {proxy} score of chosen cells: {s['best_score_mean']:.3f} ± "
                 f"{s['best_score_std']:.3f} (a training-free proxy, not an accuracy)")
  elif "supernet_val_acc_mean" in s:  # a gradient-based search: two different numbers
    lines.append(f"  supernet validation accuracy (mixed ops, last epoch): "
                 f"{s['supernet_val_acc_mean']:.2f} ± {s['supernet_val_acc_std']:.2f} %")
    lines.append(f"  derived cells' validation accuracy (supernet weights, one-hot ops): "
                 f"{s['best_score_mean']:.2f} ± {s['best_score_std']:.2f} %")
  elif c["evaluator"] == "supernet":
    lines.append(f"  supernet (inherited-weight) validation accuracy of chosen cells: "
                 f"{s['best_score_mean']:.2f} ± {s['best_score_std']:.2f} %")
  else:
    lines.append(f"  proxy validation accuracy of chosen cells: {s['best_score_mean']:.2f} ± "
                 f"{s['best_score_std']:.2f} %")
  if "skip_count_mean" in s:
    line = (f"  derived cells: {s['distinct_cells']} distinct over seeds, "
            f"{s['skip_count_mean']:.2f} skip connections on average")
    if "nb201_cifar10_test12_mean" in s:
      line += (f"; their NAS-Bench-201 CIFAR-10 12-epoch test accuracy: "
               f"{s['nb201_cifar10_test12_mean']:.2f} %")
    lines.append(line)
  best = next(r for r in results["runs"] if r["seed"] == s["best_run_seed"])
  label, unit = ("score", "") if c["evaluator"] == "zero_cost" else ("val", " %")
  if "supernet_val_acc_mean" in s:
    label = "val (supernet weights)"
  extra = f", test {best['test_accuracy']:.2f} %" if "test_accuracy" in best else ""
  if "params" in best:
    extra += f", {best['params']:,.0f} params, {best['flops'] / 1e6:.1f} MFLOPs"
  if "pareto_front" in results:
    pf = results["pareto_front"]
    lines.append(f"  Pareto front ({', '.join(pf['objectives'])}): {pf['pooled_size']} cells "
                 f"pooled over runs, {sum(pf['size_per_run']) / len(pf['size_per_run']):.1f} per run (pareto.json)")
  lines.append(f"  best architecture (seed {best['seed']}): {best['best_arch']}  "
               f"{label} {best['best_score']:.2f}{unit}{extra}")
  if "table_optimum" in s:
    o = s["table_optimum"]
    lines.append(f"  table optimum: val {o['best_val']:.2f} %, its test {o['test_of_best_val']:.2f} %")
  if "retrain_command" in s:
    lines.append(f"  retrain it: {s['retrain_command']}")
  stopped = results.get("budget", {}).get("stopped_early")
  if stopped:
    lines.append(f"  stopped early at step {stopped['at_step']}: --max_hours={stopped['max_hours']}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # Imported here so that --help and flag errors answer before JAX starts.
  from jaxnas import plotting, runner
  from jaxnas.checkpoint import CheckpointError

  if FLAGS.cpu_devices < 0:
    _fail(f"--cpu_devices must be >= 0, got {FLAGS.cpu_devices}")
  if FLAGS.cpu_devices:
    # Before the backend starts: members are independent, and one
    # single-threaded device per core beats XLA's intra-op threads for these
    # small convs (experiments/NOTES_population.md).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_multi_thread_eigen=false").strip()
    import jax
    jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
  _start_processes()
  if FLAGS.mode == "retrain":
    _compilation_cache(FLAGS.compilation_cache)
    return _retrain()
  if FLAGS.arch is not None:
    _fail("--arch applies only to --mode=retrain")
  _check_model_flags()
  config = search_config()
  workdir = FLAGS.workdir or runner.default_workdir(config)
  try:
    runner.validate(config)
    # After the checks (bad input writes nothing), before anything compiles.
    _compilation_cache(FLAGS.compilation_cache)
    results = runner.run(config, workdir)
  except (runner.UserError, CheckpointError) as e:
    _fail(str(e))
  except OSError as e:
    _fail(f"{e.strerror or e}: {e.filename or workdir}")
  except Exception as e:  # noqa: BLE001 - only the device running out of memory is answered
    _fail_if_out_of_memory(e, "--num_seeds, --population, --batch_size or --channels "
                                 "(those that apply)")
    raise
  import jax
  if jax.process_index() != 0:  # process 0 writes the plots and reports
    return
  plot = os.path.join(workdir, "trajectory.png")
  if not os.path.exists(plot):
    if plotting.plot_trajectories(results, plot) is None:
      print("matplotlib is not installed, so no plot was saved "
            "(pip install 'jaxnas[plot]' to get trajectory.png)")
  files = ["results.json", "metrics.jsonl", "config.json"]
  if "pareto_front" in results:
    files.append("pareto.json")
    pareto_png = os.path.join(workdir, "pareto.png")
    if not os.path.exists(pareto_png):
      with open(os.path.join(workdir, "pareto.json")) as f:
        plotting.plot_pareto(json.load(f), pareto_png)
    if os.path.exists(pareto_png):
      files.append("pareto.png")
  print(_summary(results))
  if os.path.exists(plot):
    files.append("trajectory.png")
  print(f"  workdir: {workdir} ({', '.join(files)})")


def _start_processes() -> None:
  """Joins the other processes of a multi-process run (``--distributed`` or the explicit
  launch flags) and checks that they were all started with this command line."""
  explicit = [f"--{name}" for name in ("coordinator_address", "num_processes", "process_id")
              if FLAGS[name].value is not None]
  if explicit and FLAGS["distributed"].present and not FLAGS.distributed:
    _fail(f"{', '.join(explicit)} {'start' if len(explicit) > 1 else 'starts'} a "
          "multi-process run; drop --nodistributed")
  if not (FLAGS.distributed or explicit):
    if FLAGS["peer_timeout"].present:
      _fail("--peer_timeout applies to multi-process runs (--distributed)")
    return
  if FLAGS.num_processes is not None and FLAGS.num_processes < 1:
    _fail(f"--num_processes must be >= 1, got {FLAGS.num_processes}")
  if FLAGS.process_id is not None and not (
      0 <= FLAGS.process_id < (FLAGS.num_processes or FLAGS.process_id + 1)):
    _fail(f"--process_id must be in [0, --num_processes), got {FLAGS.process_id}")
  address = FLAGS.coordinator_address
  if address is not None and not (address.rpartition(":")[0] and
                                  address.rpartition(":")[2].isdigit()):
    _fail(f"--coordinator_address must be host:port, got {address!r}")
  if not (FLAGS.peer_timeout > 0 and FLAGS.peer_timeout < float("inf")):
    _fail(f"--peer_timeout must be > 0 and finite, got {FLAGS.peer_timeout}")
  if FLAGS.mode == "retrain":
    _fail("--mode=retrain runs in one process; drop --distributed and the launch flags")
  from jaxnas import distributed
  try:
    distributed.initialize(address, FLAGS.num_processes, FLAGS.process_id, FLAGS.peer_timeout)
    distributed.check_same_command(
        {f.name: f.value for f in FLAGS.get_key_flags_for_module(sys.modules[__name__])
         if f.name not in _LAUNCH_FLAGS})
  except distributed.DistributedError as e:
    _fail(str(e))
  import jax
  if jax.process_index() != 0:  # one progress log: process 0's
    logging.set_verbosity(logging.WARNING)


def search_config():
  """The ``runner.SearchConfig`` the parsed flags ask for (not yet validated)."""
  from jaxnas import runner
  evaluator = FLAGS.evaluator
  if (FLAGS.strategy in ("darts", "hyperband") or FLAGS.model) and not FLAGS["evaluator"].present:
    evaluator = "train"  # they only make sense with real training (no table has a --model)
  dataset = FLAGS.dataset or ("cifar10" if evaluator == "nb201" else "fashion_mnist")
  strategy_args = tuple(sorted((name, getattr(FLAGS, flag)) for flag, name in
                               _STRATEGY_FLAGS.items() if getattr(FLAGS, flag) is not None))
  evaluator_args = tuple(sorted((name, getattr(FLAGS, flag)) for flag, name in
                                _PROXY_FLAGS.items() if getattr(FLAGS, flag) is not None))
  checkpoint_every = FLAGS.checkpoint_every
  if checkpoint_every is None:
    checkpoint_every = runner.DEFAULT_CHECKPOINT_EVERY.get(evaluator, 10)
  return runner.SearchConfig(
      evaluator=evaluator, dataset=dataset, strategy=FLAGS.strategy,
      budget=FLAGS.budget, num_seeds=FLAGS.num_seeds, seed=FLAGS.seed,
      checkpoint_every=checkpoint_every, strategy_args=strategy_args,
      evaluator_args=evaluator_args, max_hours=FLAGS.max_hours,
      objectives=tuple(FLAGS.objectives), prefilter=FLAGS.prefilter or "",
      prefilter_factor=FLAGS.prefilter_factor, space=FLAGS.space, model=FLAGS.model or "")


def _check_model_flags() -> None:
  """--model names the searched space, so --space may not also be given."""
  if FLAGS.model is not None and FLAGS["space"].present:
    _fail("--model and --space exclude each other: the searched space is the model's")
  if FLAGS.model == "":
    _fail("--model is empty; give package.module:ATTR")


def default_compilation_cache() -> str:
  """``$JAX_COMPILATION_CACHE_DIR``, else ``$XDG_CACHE_HOME/jaxnas/xla`` (``~/.cache/...``)."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "jaxnas", "xla")


def _compilation_cache(path: str | None) -> None:
  """Turns on JAX's persistent compilation cache before anything compiles.

  Compiling is most of a restart's latency here (tens of seconds for a population
  trainer on CPU, minutes for a DARTS-space supernet), and a resumed search runs
  exactly the programs it ran before. Entries are keyed by the program, the
  compile options and the JAX/XLA version, and a loaded executable is the one
  that was compiled, so results stay bit-identical (tests/test_cli.py). Only
  programs that took at least a second to compile are stored (JAX's default).
  An unusable directory costs the cache, never the run: a one-line warning.
  """
  import jax
  path = default_compilation_cache() if path is None else path
  if not path:
    jax.config.update("jax_compilation_cache_dir", None)  # also when the env var set it
    return
  path = os.path.expanduser(path)
  try:
    os.makedirs(path, exist_ok=True)
    if not os.access(path, os.W_OK):
      raise PermissionError(f"not writable: {path}")
  except OSError as e:
    print(f"jaxnas: warning: compilation cache off ({e})", file=sys.stderr)
    jax.config.update("jax_compilation_cache_dir", None)
    return
  jax.config.update("jax_compilation_cache_dir", path)


def _retrain():
  from jaxnas import retrain
  from jaxnas.spaces import SPACES
  for name in _SEARCH_ONLY_FLAGS:
    if FLAGS[name].present:
      _fail(f"--{name} does not apply to --mode=retrain")
  _check_model_flags()
  if FLAGS["space"].present and FLAGS.arch is not None:
    try:
      SPACES[FLAGS.space]().decode(FLAGS.arch)
    except ValueError as e:
      _fail(f"--space={FLAGS.space} does not take --arch={FLAGS.arch!r}: {e}")
  try:
    result = retrain.run_from_flags(FLAGS)
  except (retrain.RetrainError, OSError) as e:
    _fail(str(e))
  except Exception as e:  # noqa: BLE001 - only the device running out of memory is answered
    _fail_if_out_of_memory(e, "--batch_size or --channels")
    raise
  print(retrain.summary(result))


def _fail_if_out_of_memory(e: Exception, knobs: str) -> None:
  """One line instead of XLA's report when the device ran out of memory (what was saved,
  checkpoints included, stays)."""
  import jax
  text = str(e)
  if isinstance(e, jax.errors.JaxRuntimeError) and ("RESOURCE_EXHAUSTED" in text or
                                                    "Out of memory" in text):
    _fail(f"out of memory on {jax.default_backend()} ({text.splitlines()[0][:160]}); "
          f"lower {knobs}")


def run_cli():
  app.run(main, flags_parser=_parse)


if __name__ == "__main__":
  run_cli()
