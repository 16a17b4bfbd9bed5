"""Host driver of gradient-based searches (``--strategy=darts``): seeds, epochs, checkpoints.

The compiled work is ``jit(vmap(run_epoch))`` over seeds (jaxnas/strategies/
darts.py; with several devices a ``lax.map`` over seeds, each data-parallel over
all of them: ``darts.over_seeds``); between epochs the host appends one line per epoch to
``metrics.jsonl`` (losses, accuracies, every seed's derived cell and its
softmax(alpha)), and saves the whole ``DartsState`` of all seeds (weights, BN
statistics, alphas, both optimizer states, keys, step: minibatches are keyed
by the step, so the step is the data position) with the verified orbax
``Checkpointer``. A killed search rerun with the same command resumes from the
newest good epoch and ends with a bit-identical results.json.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxnas import distributed, host_loop, memory
from jaxnas import results as results_lib
from jaxnas.checkpoint import Checkpointer, CheckpointError
from jaxnas.estimators.training import ProxySpec, search_split
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxnas.models.registry import builtin, load_model, model_of
from jaxnas.models.train import TrainConfig
from jaxnas.strategies.darts import DATA_AXIS, DartsConfig, make_darts, over_seeds

# --strategy_args a DARTS search takes (flag name -> DartsConfig field).
DARTS_ARGS = {"darts_variant": "variant", "darts_order": "order", "remat": "remat",
              "alpha_learning_rate": "alpha_lr", "darts_warmup_epochs": "warmup_epochs",
              "darts_selection": "selection", "darts_selection_batches": "selection_batches",
              "darts_tune_steps": "tune_steps"}
# Cells of the DARTS-space supernet unless --cells says otherwise (``registry.BUILTINS``).
DARTS_SPACE_CELLS = builtin("darts").cells


def build(config) -> tuple:
  """``(darts, data, dataset)`` of a SearchConfig with ``strategy="darts"``."""
  args = dict(config.evaluator_args)
  model = load_model(config.model) if config.model else None
  # DARTS splits the training set in halves: weights on one, alphas on the other.
  if model is None and builtin(config.space).cells:
    args.setdefault("cells", builtin(config.space).cells)
  spec = ProxySpec(dataset=config.dataset, val_fraction=0.5, **args)
  ds, data = search_split(spec)
  n_train = int(data.train_labels.shape[0])
  kw = {DARTS_ARGS[k]: v for k, v in config.strategy_args}
  dc = DartsConfig(space=config.space, model=model, epochs=max(1, math.ceil(spec.epochs)),
                   steps_per_epoch=max(1, math.ceil(n_train / spec.batch_size)),
                   batch_size=spec.batch_size, channels=spec.channels, cells=spec.cells,
                   num_classes=ds.num_classes, w_lr=spec.learning_rate if "learning_rate" in args
                   else DartsConfig().w_lr, **kw)
  # With several devices the bilevel steps are data-parallel over them: the local ones, or
  # those of all processes when the search spans several.
  devices = jax.devices() if jax.process_count() > 1 else jax.local_devices()
  mesh = distributed.mesh(DATA_AXIS, devices) if len(devices) > 1 else None
  return make_darts(dc, mesh), distributed.replicate(data, mesh)


# Programs that run once (the supernet's init) are compiled for compile speed, not run speed,
# on CPU: a 3-cell DARTS-space init compiles in 16 s instead of 38 s (its hundreds of small
# RNG loops dominate) and then runs in milliseconds either way.
ONCE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def compile_once(f, *args, options: dict | None = None):
  """``jit(f)`` compiled for ``args``, without XLA's expensive passes on CPU; ``options``:
  more XLA options (the supernet's ``compiler_options``; on CPU ``ONCE`` overrides them)."""
  return compile_lowered_once(_lowered(f, *args), options)


def _lowered(f, *args):
  """``f`` (jitted or not) lowered for ``args``."""
  return (f if hasattr(f, "lower") else jax.jit(f)).lower(*args)


def compile_lowered_once(lowered, options: dict | None = None):
  """``compile_once`` of an already lowered program."""
  options = {**(options or {}), **(ONCE if jax.default_backend() == "cpu" else {})}
  return lowered.compile(compiler_options=options or None)


@contextlib.contextmanager
def initialising(init, *args, options: dict | None = None):
  """Yields ``(shapes, result)``: ``init(*args)``'s output as ``jax.ShapeDtypeStruct``s at
  once, and ``result()``, which waits for the output itself. ``init`` is traced here; its
  compilation (``compile_once``) and run go on a thread, so what needs only the state's
  shapes (the search's step programs) is traced and compiled meanwhile: the DARTS-space
  supernet's init is ~4 s of XLA on CPU beside the step's ~13 s of tracing."""
  lowered = _lowered(init, *args)
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    made = pool.submit(lambda: compile_lowered_once(lowered, options)(*args))
    yield lowered.out_info, made.result


def run(config, workdir: str, darts, data) -> dict:
  n = config.num_seeds
  # Host keys: across processes every process passes the same (a device array is local).
  keys = np.asarray(jax.vmap(jax.random.PRNGKey)(config.seed + jnp.arange(n)))
  init = jax.vmap(darts.init, in_axes=(0, None))
  # With a mesh the state lives replicated on every device.
  init = jax.jit(init, out_shardings=None if darts.mesh is None else
                 NamedSharding(darts.mesh, P()))
  options = darts.supernet.compiler_options
  with initialising(init, keys, data, options=options) as (shapes, initialised):
    if darts.mesh is None:
      # Seeds that do not fit the device together run in chunks that do (same results).
      run_epoch, chunk = memory.fit_seeds(
          darts.run_epoch, shapes, data, what="DARTS search", options=options,
          knobs="--num_seeds, --channels, --cells or --batch_size")
      seeds = lambda f: jax.jit(memory.over_seed_chunks(f, n, chunk), compiler_options=options)
    else:
      chunk = n
      seeds = lambda f: jax.jit(over_seeds(f, darts.mesh), compiler_options=options)
      run_epoch = seeds(darts.run_epoch)
    state = initialised()
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  try:
    epoch, state, elapsed = host_loop.resume(ckpt, state, metrics_path)
  except CheckpointError as e:
    raise ValueError(f"{e}; the unreadable steps were moved aside, rerun to start afresh") from None
  space = darts.supernet.space
  history = _read_history(metrics_path)
  epochs = darts.config.epochs

  def advance(epoch):
    new_state, m = run_epoch(state, data)
    return epoch + 1, (new_state, distributed.host(m))

  def commit(epoch, out, seconds, elapsed):
    nonlocal state
    state, m = out
    line = {"step": epoch, "epoch": epoch,
            **{k: round(float(np.mean(m[k])), 6) for k in ("train_loss", "train_acc",
                                                              "val_loss", "val_acc")},
            "skip_count": round(float(np.mean(m["skip_count"])), 4),
            "archs": [space.encode(a) for a in _unstack(m["arch"], n)],
            "alphas": _round(_softmax(state.alpha), 5),
            "val_acc_per_seed": [round(float(v), 6) for v in m["val_acc"]]}
    history.append(line)
    host_loop.append_jsonl(metrics_path, [line])
    logging.info("epoch %d/%d  train loss %.3f  supernet val acc %.3f  skips %.2f  cell %s "
                 "(%.1fs)", epoch, epochs, line["train_loss"], line["val_acc"],
                 line["skip_count"], line["archs"][0], seconds)
    if epoch < epochs:
      ckpt.save(epoch, state, {"elapsed_s": elapsed})

  _, elapsed, stopped = host_loop.drive(epoch, elapsed, advance, commit,
                                        done=lambda epoch: epoch >= epochs,
                                        max_hours=config.max_hours)
  ckpt.close()
  # Part of the search's result, run after its last epoch (whatever stopped it); not
  # checkpointed: a rerun resumes from the last saved epoch and redoes them, identically.
  t0 = time.time()
  selected = None
  if darts.config.selection == "perturbation":
    selected = distributed.host(seeds(darts.select)(state, data))
    logging.info("perturbation selection: %s (%.1fs)",
                 [space.encode(a) for a in _unstack(selected[0], n)], time.time() - t0)
    cells = selected[0]
  else:
    cells = jax.vmap(darts.supernet.derive)(state.alpha)
  cell_acc = seeds(lambda sc, d: darts.cell_accuracy(sc[0], d, sc[1]))((state, cells), data)
  cell_acc = np.asarray(distributed.host(cell_acc), np.float64)
  logging.info("derived cells' validation accuracy with the supernet's weights: %s",
               np.round(100 * cell_acc, 2).tolist())
  timing = host_loop.timing(elapsed)
  timing["selection_and_evaluation_s"] = round(time.time() - t0, 3)
  timing["seeds_per_program"] = chunk
  host_loop.write_json_atomic(os.path.join(workdir, "timing.json"), timing)
  return _results(config, darts, state, history, stopped, cell_acc, selected)


def _softmax(alpha):
  return distributed.host(jax.tree.map(jax.nn.softmax, alpha))


def _round(tree, digits):
  return jax.tree.map(lambda a: np.round(a, digits).tolist(), tree)


def _unstack(tree, n):
  """Per-seed slices of a pytree with a leading seed axis."""
  return [jax.tree.map(lambda a: np.asarray(a)[i], tree) for i in range(n)]


# What the numbers of a DARTS results.json are (its "scores" entry says so to readers).
SCORES = {
    "best_score": "validation accuracy (%) of the run's derived cell (best_arch) computed by "
                  "the trained supernet with that cell's one-hot op weights (inherited "
                  "weights, BN on batch statistics), over the whole search-validation split",
    "supernet_val_acc": "validation accuracy (%) of the supernet itself under the search's "
                        "mixed op weights, averaged over the last epoch's minibatches",
    "trajectory": "supernet_val_acc after each search epoch",
}
TRAJECTORY_AXES = {"x": "search epochs",
                   "y": "supernet validation accuracy, mixed ops (%)"}


def _results(config, darts, state, history, stopped, cell_acc, selected=None) -> dict:
  supernet = darts.supernet
  space = supernet.space
  n = config.num_seeds
  magnitude = _unstack(distributed.host(jax.vmap(supernet.derive)(state.alpha)), n)
  finals = magnitude if selected is None else _unstack(selected[0], n)
  alphas = _unstack(_softmax(state.alpha), n)
  table_of = (darts.config.model or model_of(TrainConfig(space=config.space))).table
  table = table_of() if table_of else None
  runs = []
  for i in range(n):
    arch = jax.tree.map(lambda a: a.astype(np.int32), finals[i])
    supernet_acc = history[-1]["val_acc_per_seed"][i] * 100.0 if history else 0.0
    run = {"seed": config.seed + i, "best_arch": space.encode(arch),
           "best_score": round(float(cell_acc[i]) * 100.0, 6),
           "supernet_val_acc": round(supernet_acc, 6),
           "trajectory": [round(h["val_acc_per_seed"][i] * 100.0, 6) for h in history],
           "skip_count": int(supernet.skip_count(arch)),
           "alphas": _round(alphas[i], 6)}
    if selected is not None:
      info = _unstack(selected[1], n)[i]
      run["selection"] = {
          "method": "perturbation",
          "magnitude_arch": space.encode(magnitude[i].astype(np.int32)),
          "order": [int(e) for e in info["order"]],
          "removal_acc": np.round(np.asarray(info["removal_acc"], np.float64), 6).tolist(),
          "base_acc": np.round(np.asarray(info["base_acc"], np.float64), 6).tolist()}
    if table is not None:
      # The derived cell is a NAS-Bench-201 cell: its 12-epoch CIFAR-10 test
      # accuracy from the table is a free, search-independent reference.
      rank = int(space.rank(space.to_vector(jnp.asarray(arch))))
      run["nb201_cifar10_test12"] = round(float(table["test/cifar10"][rank]), 4)
    runs.append(run)
  summary = results_lib.summary_of(runs, stats=("supernet_val_acc",))
  summary["skip_count_mean"] = float(np.mean([r["skip_count"] for r in runs]))
  summary["distinct_cells"] = len({r["best_arch"] for r in runs})
  if table is not None:
    summary["nb201_cifar10_test12_mean"] = float(np.mean([r["nb201_cifar10_test12"]
                                                          for r in runs]))
  return results_lib.document(
      config, summary, runs, TRAJECTORY_AXES,
      {"epochs": darts.config.epochs, "steps": darts.config.epochs *
       darts.config.steps_per_epoch, "max_hours": config.max_hours, "stopped_early": stopped},
      scores=SCORES,
      darts={**darts.config._asdict(), "execution": darts.config.execution._asdict(),
             "model": config.model or None})


def _read_history(path):
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
