"""Host driver of a search: many seeds, chunks of steps, checkpoints, logs, results.

``run(config)`` is what ``python -m jaxnas.main`` calls, and is usable from
research code. The compiled work is ``jit(vmap(run_chunk))`` over seeds; the
host only moves between chunks to append metrics to ``metrics.jsonl``, log
progress and save the state pytree. Every chunk has the same length, so a run
that is killed and restarted executes exactly the same programs on exactly the
same states as one that was not, and writes a bit-identical ``results.json``.

Workdir layout:
  config.json      flags, package versions, backend (everything to reproduce)
  checkpoints/     orbax steps of the search state
  metrics.jsonl    one line per search step (aggregated over seeds)
  results.json     the final results (identical across resumes)
  timing.json      wall and device seconds the search used (resumes included)
  trajectory.png   best-so-far vs evaluations (if matplotlib is installed)
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import math
import os
import platform
import shlex
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxnas import darts_runner, distributed, estimators, host_loop, multifidelity, pareto
from jaxnas.checkpoint import Checkpointer, CheckpointError, CheckpointsDiffer
from jaxnas.datasets import DATASETS as _DATASETS
from jaxnas.datasets import load_dataset
from jaxnas.estimators import one_shot, zero_cost
from jaxnas import results as results_lib
from jaxnas.host_loop import write_json_atomic
from jaxnas.estimators.training import ProxySpec, train_evaluator, validate_spec
from jaxnas.strategies.darts import DATA_AXIS
from jaxnas.strategies.prefilter import prefiltered
from jaxnas.search import make_search, results_of
from jaxnas.strategies import STRATEGIES
from jaxnas.models.protocol import check_head
from jaxnas.models.registry import BUILTINS, builtin, load_model
from jaxnas.models.train import TrainConfig

EVALUATORS = ("nb201", "train", "zero_cost", "supernet")
# Evaluators that train or score networks on an image dataset (not the tabular benchmark).
IMAGE_EVALUATORS = ("train", "zero_cost", "supernet")
TRAIN_DATASETS = tuple(_DATASETS)
HYPERBAND_ARGS = ("eta", "rungs", "hyperband_brackets")
# Strategies with their own host loop (not init/ask/tell): Hyperband and DARTS.
HOST_STRATEGIES = ("hyperband", "darts")
SPACES = tuple(BUILTINS)
DEFAULT_SPACE = "nb201"
# Evaluators that score through the model protocol: a user's model (--model), and every
# model's latency (their reports come from ``protocol.cost_report``).
MODEL_EVALUATORS = ("train", "zero_cost", "supernet")
# Settings a user's model fixes in its own module (so --model refuses them).
MODEL_FIXED_ARGS = ("channels", "cells", "width_impl")
# Strategies that train DARTS-space populations (--space=darts --evaluator=train): all.
DARTS_SPACE_STRATEGIES = tuple(STRATEGIES) + ("hyperband",)
# Default checkpoint interval by evaluator: every generation when each one trains networks.
DEFAULT_CHECKPOINT_EVERY = {"nb201": 10, "train": 1, "zero_cost": 10, "supernet": 1}
# --evaluator_args the zero-cost evaluator takes (its factory's keyword arguments).
ZERO_COST_ARGS = ("proxy", "data_dir", "batch_size", "channels", "cells")
# Networks the prefilter's proxy scores at a time, over all seeds (``_prefilter_score``).
PREFILTER_MEMBERS = 32
# Strategy factory parameters the runner fills itself (never from flags): the space, and
# a multi-objective strategy's ``costs`` (from --objectives).
LIBRARY_ONLY_ARGS = ("space", "costs")
# Config fields whose command-line flag has another name, for messages: strategy
# arguments, and the training settings of the proxy, the supernet and the retrain.
STRATEGY_FLAG_NAMES = {"batch_size": "--population"}
TRAINING_FLAG_NAMES = {"learning_rate": "--train_learning_rate"}


def factory_parameters(strategy: str) -> frozenset[str]:
  """The parameters of a compiled strategy's factory (``STRATEGIES``): those flags may
  set, plus the ``LIBRARY_ONLY_ARGS`` it takes, which ``build`` fills."""
  return frozenset(inspect.signature(STRATEGIES[strategy]).parameters)


def cli_flag(field: str) -> str:
  """The ``python -m jaxnas.main`` flag that sets training setting ``field``."""
  return TRAINING_FLAG_NAMES.get(field, f"--{field}")


class UserError(ValueError):
  """A problem the user caused and can fix; reported as one line, no traceback."""


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """Everything that defines a search's results (the workdir is where, not what)."""
  evaluator: str = "nb201"
  dataset: str = "cifar10"
  strategy: str = "evolution"
  budget: int = 100
  num_seeds: int = 10
  seed: int = 0
  checkpoint_every: int = 10
  strategy_args: tuple = ()  # sorted (name, value) pairs passed to the strategy factory
  evaluator_args: tuple = ()  # sorted (name, value) pairs: ProxySpec / SupernetConfig fields
  max_hours: float = 0.0  # wall-time limit of the whole search, resumes included (0: none)
  objectives: tuple = ("accuracy",)  # more than one: a Pareto front is saved (pareto.json)
  prefilter: str = ""  # a zero-cost proxy: keep the best 1/prefilter_factor of the proposals
  prefilter_factor: int = 4
  space: str = "nb201"  # a built-in space (``registry.BUILTINS``)
  # A user's model, "package.module:ATTR" (``registry.load_model``): the searched space is
  # the model's, so ``space`` stays at its default. "": the built-in model of ``space``.
  model: str = ""

  def to_json(self) -> dict:
    d = dataclasses.asdict(self)
    d["strategy_args"] = dict(self.strategy_args)
    d["evaluator_args"] = dict(self.evaluator_args)
    d["objectives"] = list(self.objectives)
    if self.model:  # the space is the model's: recording the unused default would mislead
      del d["space"]
    else:  # records of built-in searches stay as they were before --model existed
      del d["model"]
    return d


def default_workdir(c: SearchConfig) -> str:
  args = "".join(f"-{k}{v}" for k, v in c.strategy_args + c.evaluator_args
                 if k not in ("data_dir", "plan", "width_impl"))
  space = (f"-{c.model.replace(':', '.')}" if c.model else
           f"-{c.space}" if c.space != DEFAULT_SPACE else "")
  return os.path.join("runs", f"{c.evaluator}-{c.dataset}-{c.strategy}{space}{args}"
                              f"-b{c.budget}-n{c.num_seeds}-s{c.seed}")


def search_model(c: SearchConfig):
  """The user's ``SearchableModel`` of ``c`` (``c.model`` imported), or None for a built-in
  space; UserError with one line where ``c.model`` names no model."""
  if not c.model:
    return None
  try:
    return load_model(c.model)
  except ValueError as e:
    raise UserError(str(e)) from None


def _checked_model(c: SearchConfig):
  """``search_model(c)``, checked against the dataset it is searched on (loaded here)."""
  model = search_model(c)
  if model is not None:
    try:
      ds = load_dataset(c.dataset, dict(c.evaluator_args).get("data_dir"))
      check_head(model, ds.train_images.shape[1:], ds.num_classes, c.dataset)
    except ValueError as e:  # DatasetError included
      raise UserError(f"--model={c.model}: {e}") from None
  return model


def validate(c: SearchConfig) -> None:
  """Checks a config at the edge; raises UserError with one clear line."""
  if c.evaluator not in EVALUATORS:
    raise UserError(f"unknown evaluator {c.evaluator!r}; choose one of {', '.join(EVALUATORS)}")
  if c.model:
    if c.space != DEFAULT_SPACE:
      raise UserError("--model and --space exclude each other: the searched space is the "
                      "model's")
    if c.evaluator not in MODEL_EVALUATORS:
      raise UserError(f"--evaluator={c.evaluator} looks NAS-Bench-201 cells up in its table; "
                      f"a --model is scored by --evaluator={'|'.join(MODEL_EVALUATORS)}")
    for k, _ in c.evaluator_args:
      if k in MODEL_FIXED_ARGS:
        raise UserError(f"{cli_flag(k)} does not apply to --model (its module fixes the "
                        "network)")
    search_model(c)
  else:
    if c.space not in SPACES:
      raise UserError(f"unknown space {c.space!r}; choose one of {', '.join(SPACES)}")
    scorers = builtin(c.space).evaluators  # DARTS trains its own supernet, whatever these are
    if c.strategy != "darts" and c.evaluator not in scorers:
      raise UserError(f"--space={c.space} is searched by --strategy=darts, or scored by "
                      f"--evaluator={'|'.join(scorers)}; not by --evaluator={c.evaluator}")
  if c.evaluator == "nb201" and c.dataset not in estimators.NB201_DATASETS:
    raise UserError(f"unknown dataset {c.dataset!r} for nb201; choose one of "
                    f"{', '.join(estimators.NB201_DATASETS)}")
  if c.evaluator in IMAGE_EVALUATORS and c.dataset not in TRAIN_DATASETS:
    raise UserError(f"unknown dataset {c.dataset!r} for {c.evaluator}; choose one of "
                    f"{', '.join(TRAIN_DATASETS)}")
  accepting = {"train": ProxySpec._fields, "supernet": one_shot.SupernetConfig._fields,
               "zero_cost": ZERO_COST_ARGS,
               # a prefiltered table search scores its proxy on Fashion-MNIST images
               "nb201": ("data_dir",) if c.prefilter else ()}
  for k, v in c.evaluator_args:
    flag = cli_flag(k)
    if k not in accepting.get(c.evaluator, ()) or k in ("dataset", "space"):
      takers = [e for e, fields in accepting.items() if k in fields]
      raise UserError(f"{flag} does not apply to --evaluator={c.evaluator}" +
                      (f" (only to --evaluator={'|'.join(takers)})" if takers else ""))
    if k == "augment" and c.strategy == "darts":
      raise UserError("--augment does not apply to --strategy=darts (its bilevel steps use "
                      "the images as they are)")
    if k == "proxy" and v not in zero_cost.PROXIES:
      raise UserError(f"unknown proxy {v!r}; choose one of {', '.join(zero_cost.PROXIES)}")
  if c.prefilter and c.prefilter not in zero_cost.PROXIES:
    raise UserError(f"unknown --prefilter proxy {c.prefilter!r}; choose one of "
                    f"{', '.join(zero_cost.PROXIES)}")
  if c.prefilter and c.strategy in HOST_STRATEGIES:
    raise UserError(f"--prefilter applies to init/ask/tell strategies, not {c.strategy}")
  if c.prefilter_factor < 1:
    raise UserError(f"--prefilter_factor must be >= 1, got {c.prefilter_factor}")
  bad = [o for o in c.objectives if o not in pareto.OBJECTIVES]
  if bad or not c.objectives or c.objectives[0] != "accuracy" or len(set(c.objectives)) < len(
      c.objectives):
    raise UserError(f"--objectives must be accuracy followed by any of "
                    f"{', '.join(o for o in pareto.OBJECTIVES if o != 'accuracy')} "
                    f"(e.g. accuracy,params), got {','.join(c.objectives)}")
  if "latency" in c.objectives:
    _validate_latency(c)
  if len(c.objectives) > 1 and c.strategy in HOST_STRATEGIES:
    raise UserError(f"--objectives with more than accuracy is not supported by {c.strategy}")
  if not (math.isfinite(c.max_hours) and c.max_hours >= 0):
    raise UserError(f"--max_hours must be >= 0 and finite, got {c.max_hours}")
  if c.strategy not in STRATEGIES and c.strategy not in HOST_STRATEGIES:
    raise UserError(f"unknown strategy {c.strategy!r}; choose one of "
                    f"{', '.join(tuple(STRATEGIES) + HOST_STRATEGIES)}")
  if c.strategy in HOST_STRATEGIES and c.evaluator != "train":
    raise UserError(f"--strategy={c.strategy} trains networks, so it needs --evaluator=train")
  for name in ("budget", "num_seeds", "checkpoint_every"):
    value = getattr(c, name)
    if value < (0 if name == "checkpoint_every" else 1):
      raise UserError(f"--{name} must be >= {0 if name == 'checkpoint_every' else 1}, got {value}")
  accepted = (HYPERBAND_ARGS if c.strategy == "hyperband" else
              tuple(darts_runner.DARTS_ARGS) if c.strategy == "darts" else
              factory_parameters(c.strategy))
  for k, v in c.strategy_args:
    flag = STRATEGY_FLAG_NAMES.get(k, f"--{k}")
    if k not in accepted or k in LIBRARY_ONLY_ARGS:
      raise UserError(f"{flag} does not apply to --strategy={c.strategy}")
    if k == "darts_warmup_epochs":
      epochs = math.ceil(dict(c.evaluator_args).get("epochs", ProxySpec().epochs))
      if not 0 <= v < epochs:
        raise UserError(f"--darts_warmup_epochs must be in [0, {epochs}) (--epochs), got {v}")
    elif k == "darts_selection":
      if c.model and v != "magnitude":
        raise UserError(f"--darts_selection={v} is implemented for built-in spaces only; use "
                        "--darts_selection=magnitude with --model")
      if not c.model and v not in builtin(c.space).darts_selections:
        takers = [n for n in SPACES if v in builtin(n).darts_selections]
        raise UserError(f"--darts_selection={v} is implemented for the {' and '.join(takers)} "
                        f"space only; use --darts_selection=magnitude with --space={c.space}")
    elif k == "darts_tune_steps":
      if v < 0:
        raise UserError(f"--darts_tune_steps must be >= 0, got {v}")
    elif isinstance(v, (int, float)) and not isinstance(v, bool) and not (
        math.isfinite(v) and v > 0):
      raise UserError(f"{flag} must be > 0 and finite, got {v}")
  _validate_proxy(c)


def _validate_latency(c: SearchConfig) -> None:
  """``--objectives=...,latency`` needs a model with a latency model and an evaluator that
  reports it."""
  model = search_model(c) if c.model else builtin(c.space).model(TrainConfig(space=c.space))
  searched = f"--model={c.model}" if c.model else f"--space={c.space}"
  if model.latency is None:
    raise UserError(f"--objectives={','.join(c.objectives)}: {searched} has no latency model "
                    "(a built-in one: --space=mbconv; a user's: jaxnas.searchable(..., "
                    "latency=...))")
  if c.evaluator not in MODEL_EVALUATORS:
    raise UserError(f"--objectives={','.join(c.objectives)}: latency is reported by "
                    f"--evaluator={'|'.join(MODEL_EVALUATORS)}, not --evaluator={c.evaluator}")


def _validate_proxy(c: SearchConfig) -> None:
  """The training proxy's settings and Hyperband's first rung, checked before anything is
  written or loaded."""
  args = dict(c.evaluator_args)
  try:
    if c.evaluator == "train":
      validate_spec(ProxySpec(dataset=c.dataset, space=c.space, **args), cli_flag)
    elif c.evaluator == "supernet":
      one_shot.validate_config(one_shot.SupernetConfig(dataset=c.dataset, **args), cli_flag)
  except ValueError as e:
    raise UserError(str(e)) from None
  if c.strategy == "hyperband":
    options = dict(c.strategy_args)
    eta, rungs = int(options.get("eta", 3)), int(options.get("rungs", 3))
    if eta < 2:
      raise UserError(f"--eta must be >= 2 (each rung keeps 1/eta of the cells), got {eta}")
    epochs = args.get("epochs", ProxySpec().epochs)
    first = multifidelity.brackets(epochs, eta, rungs, options.get("hyperband_brackets"))[0][0]
    if c.budget < first[0]:
      raise UserError(f"--budget={c.budget} is smaller than Hyperband's first rung ({first[0]} "
                      f"cells at {first[1]:.3g} epochs with --eta={eta} --rungs={rungs})")


def make_evaluator(c: SearchConfig, workdir: str | None = None):
  """The evaluator of ``c``; the supernet is trained (or resumed) under ``workdir/supernet``,
  data-parallel over ``supernet_mesh()``."""
  if c.evaluator == "nb201":
    return estimators.nb201_evaluator(c.dataset)
  model = _checked_model(c)
  try:
    if c.evaluator == "train":
      return train_evaluator(_proxy_spec(c), model=model)
    if c.evaluator == "zero_cost":
      return zero_cost.zero_cost_evaluator(dataset=c.dataset, **dict(c.evaluator_args),
                                           model=model, space=c.space)
    if c.evaluator == "supernet":
      return one_shot.supernet_evaluator(_supernet_config(c), workdir, model=model,
                                         mesh=supernet_mesh())
  except ValueError as e:  # DatasetError included: missing or malformed data
    raise UserError(str(e)) from None
  raise UserError(f"unknown evaluator {c.evaluator!r}")


def _supernet_config(c: SearchConfig) -> one_shot.SupernetConfig:
  return one_shot.SupernetConfig(dataset=c.dataset, space=c.space, **dict(c.evaluator_args))


def supernet_mesh():
  """The devices the SPOS supernet trains data-parallel over and scores members on, as
  DARTS' (``darts_runner.build``): the local ones, or those of all processes when the
  search spans several; None (one device) where that is one."""
  devices = jax.devices() if jax.process_count() > 1 else jax.local_devices()
  return distributed.mesh(DATA_AXIS, devices) if len(devices) > 1 else None


def _proxy_spec(c: SearchConfig) -> ProxySpec:
  """The training proxy of ``c`` (a built-in space's network depth by default)."""
  args = dict(c.evaluator_args)
  if not c.model and builtin(c.space).cells:
    args.setdefault("cells", builtin(c.space).cells)
  return ProxySpec(dataset=c.dataset, space=c.space, **args)


def _prefilter_score(c: SearchConfig):
  """``archs -> float32[N]``: the zero-cost proxy ``c.prefilter`` (a fixed function of the cell).

  Images come from the search's own dataset when it has one; the tabular
  benchmark ships no images, so NB201 searches score on Fashion-MNIST (from
  its default location).
  """
  args = dict(c.evaluator_args)
  dataset = c.dataset if c.evaluator in IMAGE_EVALUATORS else "fashion_mnist"
  kw = {"data_dir": args["data_dir"]} if "data_dir" in args else {}
  # Every seed scores prefilter_factor x population cells per step, all seeds at once (the
  # search is vmapped over seeds): scored all together, the README's 10-seed predictor
  # search asked XLA:CPU for 33 GB. In chunks, ~PREFILTER_MEMBERS networks are live at a
  # time (still growing with the number of seeds beyond that).
  kw["chunk"] = max(1, PREFILTER_MEMBERS // c.num_seeds)
  try:
    proxy = zero_cost.zero_cost_evaluator(proxy=c.prefilter, dataset=dataset, **kw,
                                          model=search_model(c), space=c.space)
  except ValueError as e:
    raise UserError(f"--prefilter: {e}") from None
  key = jax.random.PRNGKey(0)  # the default evaluator ignores it: scores are fixed per cell
  return lambda archs: proxy.evaluate(key, archs)


def build(c: SearchConfig, workdir: str | None = None):
  """The Search of a config (raises UserError for inconsistent hyperparameters).

  ``workdir`` is where a supernet evaluator keeps its checkpoints (None: in memory only).
  """
  validate(c)
  evaluator = make_evaluator(c, workdir)
  try:
    kwargs = dict(c.strategy_args)
    if "costs" in factory_parameters(c.strategy) and len(
        c.objectives) > 1:  # a multi-objective strategy: the costs drive its selection
      kwargs["costs"] = pareto.cost_objectives(evaluator, c.objectives[1:])
    strategy = STRATEGIES[c.strategy](evaluator.space, **kwargs)
    if c.prefilter:
      strategy = prefiltered(strategy, _prefilter_score(c), c.prefilter_factor)
    return make_search(strategy, evaluator, c.budget)
  except ValueError as e:
    raise UserError(str(e)) from None


def trains_networks(config: SearchConfig) -> bool:
  """Whether a search trains or scores networks (and so depends on the conv implementation)."""
  return (config.evaluator != "nb201" or bool(config.prefilter) or
          config.strategy in ("darts", "hyperband"))


def environment(compute: dict | None = None) -> dict:
  """config.json's record of where a run began: versions, platform, devices, the command and
  ``compute`` (``host_loop.compute_environment``), which a resume compares with its own."""
  versions = {}
  for pkg in ("jaxnas", "jax", "jaxlib", "flax", "optax", "chex", "orbax-checkpoint", "numpy",
              "absl-py"):
    try:
      versions[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      versions[pkg] = None
  return {"python": sys.version.split()[0], "platform": platform.platform(),
          "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
          "processes": jax.process_count(), "versions": versions,
          "command": " ".join(sys.argv), "compute": compute}


def _aggregate(metrics: dict, live: np.ndarray) -> list[dict]:
  """Per-step lines (mean/std/min/max over seeds) from stacked chunk metrics [seeds, steps]."""
  lines = []
  for t in np.nonzero(live)[0]:
    line = {"step": int(metrics["step"][0, t]), "evaluations": int(metrics["evaluations"][0, t])}
    for k, v in metrics.items():
      if k in ("step", "evaluations", "live"):
        continue
      col = np.asarray(v[:, t], np.float64)
      line[k] = round(float(col.mean()), 6)
      if k == "best":
        line.update(best_std=round(float(col.std()), 6), best_min=round(float(col.min()), 6),
                    best_max=round(float(col.max()), 6))
    lines.append(line)
  return lines


def make_advance(search, chunk: int, root_key: jax.Array, sharding=None):
  """``advance(state, step) -> (state, metrics[seeds, chunk])``: the next ``chunk`` steps of all seeds.

  With a jittable evaluator this is one compiled ``vmap(scan)`` (its state and metrics
  laid out by ``sharding``, ``seed_sharding``, where given). Otherwise
  ``ask`` and ``tell`` are compiled and vmapped over seeds, and the evaluator
  (its own compiled program, e.g. population training) is called between them
  once per step on the candidates of all seeds together, with the key
  ``fold_in(PRNGKey(seed), step)``.
  """
  if search.evaluator.jittable:
    chunk_fn = jax.vmap(lambda s, t: search.run_chunk(s, t, chunk), in_axes=(0, None))
    if sharding is not None:
      run_chunk = jax.jit(chunk_fn, out_shardings=(sharding, sharding))
      # A host scalar: every process passes the same step (a device scalar would be local).
      return lambda state, step: run_chunk(state, np.int32(step))
    run_chunk = jax.jit(chunk_fn)
    return lambda state, step: run_chunk(state, jnp.int32(step))

  ask = jax.jit(jax.vmap(search.ask))
  tell = jax.jit(jax.vmap(search.tell, in_axes=(0, 0, 0, None)))

  def advance(state, step):
    per_step = []
    for t in range(step, step + chunk):
      live = t < search.num_steps
      if live:
        archs, state = ask(state)
        leaves = jax.tree.leaves(archs)
        seeds, batch = leaves[0].shape[:2]
        flat = jax.tree.map(lambda x: x.reshape((seeds * batch,) + x.shape[2:]), archs)
        fitness = search.evaluator.evaluate(jax.random.fold_in(root_key, t), flat)
        fitness = jnp.asarray(fitness, jnp.float32).reshape(seeds, batch)
        state, metrics = tell(state, archs, fitness, jnp.int32(t))
      else:  # same shapes as a live step, flagged dead, so logs are uniform
        metrics = jax.tree.map(jnp.zeros_like, per_step[-1])
      metrics = dict(metrics)
      metrics["live"] = jnp.full(state.step.shape, live)
      per_step.append(metrics)
    return state, jax.tree.map(lambda *xs: jnp.stack(xs, axis=1), *per_step)

  return advance


def seed_sharding(num_seeds: int):
  """Where a jittable search's seeds live when it spans several processes: a
  ``NamedSharding`` over the devices of all processes, seeds split between them when
  their number divides over the devices, else replicated (every device runs every seed,
  with a warning); None in one process (all seeds on the default device, as always).

  Seeds never communicate, so a seed computes the same program on the same inputs
  wherever it lies: results are the same as in one process (tests/test_distributed.py).
  """
  if jax.process_count() == 1:
    return None
  from jax.sharding import NamedSharding, PartitionSpec
  mesh = distributed.mesh("seeds")
  if num_seeds % jax.device_count():
    if host_loop.primary():
      print(f"jaxnas: warning: --num_seeds={num_seeds} does not divide over the "
            f"{jax.device_count()} devices of the {jax.process_count()} processes, so every "
            "device runs every seed; give a multiple of it to split them", file=sys.stderr,
            flush=True)
    return NamedSharding(mesh, PartitionSpec())
  return NamedSharding(mesh, PartitionSpec("seeds"))


def drive_search(search, num_seeds: int, seed: int, workdir: str | None, chunk: int,
                 max_hours: float = 0.0, checkpoint: bool = True):
  """Runs ``num_seeds`` seeds (``seed + i``) of ``search`` to the end in chunks of ``chunk``
  steps; returns ``(state, elapsed_s, stopped)``.

  With a ``workdir``, each chunk appends its per-step lines to metrics.jsonl and (with
  ``checkpoint``) saves the state, and a rerun resumes from the newest verified checkpoint
  (UserError where none is readable). ``stopped`` says whether ``max_hours`` ended it early.
  Across several processes a jittable search's seeds are sharded over all their devices
  (``seed_sharding``; the returned state is then gathered to host arrays), while a
  training search runs ask and tell in every process alike and its evaluator shards the
  population.
  """
  n, num_steps = num_seeds, search.num_steps
  sharding = seed_sharding(n) if search.evaluator.jittable else None
  keys = jax.vmap(jax.random.PRNGKey)(seed + jnp.arange(n))
  if sharding is None:
    state = jax.jit(jax.vmap(search.init))(keys)
  else:
    keys = distributed.put(keys, sharding)
    state = jax.jit(jax.vmap(search.init), out_shardings=sharding)(keys)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints")) if workdir else None
  metrics_path = os.path.join(workdir, "metrics.jsonl") if workdir else None
  step, elapsed = 0, 0.0
  if ckpt is not None:
    try:
      step, state, elapsed = host_loop.resume(ckpt, state, metrics_path)
    except CheckpointsDiffer as e:
      raise UserError(str(e)) from None
    except CheckpointError as e:
      raise UserError(f"{e}; the unreadable steps were moved aside, rerun to start afresh"
                      ) from None
  # Time spent building the evaluator (the SPOS supernet's training) counts
  # against --max_hours; a resumed search's checkpoint already includes it.
  if step == 0:
    elapsed = float(search.evaluator.setup_s)
  advance = make_advance(search, chunk, jax.random.PRNGKey(seed), sharding)

  def run_chunk(step):
    new_state, metrics = advance(state, step)
    return int(distributed.host(new_state.step)[0]), (new_state, distributed.host(metrics))

  def commit(step, out, seconds, elapsed):
    nonlocal state
    state, metrics = out
    lines = _aggregate(metrics, np.asarray(metrics["live"][0]))
    if metrics_path:
      host_loop.append_jsonl(metrics_path, lines)
    last = lines[-1]
    logging.info("step %d/%d  evaluations %d/%d  best %.3f ± %.3f  diversity %.2f  (%.2fs)",
                 step, num_steps, last["evaluations"], search.budget, last["best"],
                 last["best_std"], last["diversity"], seconds)
    if ckpt is not None and checkpoint and step < num_steps:
      ckpt.save(step, state, {"elapsed_s": elapsed})

  step, elapsed, stopped = host_loop.drive(step, elapsed, run_chunk, commit,
                                           done=lambda step: step >= num_steps,
                                           max_hours=max_hours)
  if ckpt is not None:
    ckpt.close()
  if sharding is not None:
    state = distributed.host(state)
  return state, elapsed, stopped


def run_search(search, num_seeds: int = 1, seed: int = 0, workdir: str | None = None,
               checkpoint_every: int = 1) -> dict:
  """Runs a ``Search`` of any evaluator (a user's model included) from a library: seeds
  ``seed .. seed + num_seeds - 1``, checkpointed every ``checkpoint_every`` steps into
  ``workdir`` (None: in memory) and resumed from it. Returns ``search_results`` (per run
  the best architecture's string, score, report and trajectory) with the final ``state``."""
  chunk = min(checkpoint_every or search.num_steps, search.num_steps)
  if workdir:
    os.makedirs(workdir, exist_ok=True)
  state, _, _ = drive_search(search, num_seeds, seed, workdir, chunk,
                             checkpoint=bool(checkpoint_every))
  return {**search_results(search, state, seed), "state": state}


def run(config: SearchConfig, workdir: str | None = None) -> dict:
  """Runs (or resumes, or reports) the search of ``config`` in ``workdir``; returns results.

  The workdir is only read before the search is built (a workdir of another
  search is refused, a finished one reported, before any data is loaded or a
  supernet trained) and written after.
  """
  validate(config)
  workdir = workdir or default_workdir(config)
  config_path = os.path.join(workdir, "config.json")
  results_path = os.path.join(workdir, "results.json")
  began_in = None  # the compute environment a resumed run began in
  if os.path.exists(config_path):
    record = host_loop.read_json(config_path, "use another --workdir", UserError)
    if isinstance(record, dict) and "arch" in record and "config" not in record:
      raise UserError(f"workdir {workdir} holds a retrain, not a search; use another --workdir")
    previous = record.get("config") if isinstance(record, dict) else None
    if not isinstance(previous, dict):
      raise UserError(f"{config_path} is not a jaxnas search's config; use another --workdir")
    if previous != config.to_json():
      raise UserError(f"workdir {workdir} holds a search with other settings "
                      f"({host_loop.describe_diff(previous, config.to_json())}); "
                      "use another --workdir")
    began_in = (record.get("environment") or {}).get("compute")
  if os.path.exists(results_path):
    results = host_loop.read_json(results_path, "move it away to rerun the search", UserError)
    if not (isinstance(results, dict) and results.get("config") == config.to_json()
            and isinstance(results.get("runs"), list)):
      raise UserError(f"{results_path} is not the results of this search; use another "
                      "--workdir")
    if not os.path.exists(config_path):
      write_json_atomic(config_path, {"config": config.to_json(), "environment": environment()})
    logging.info("workdir %s holds a finished search; nothing to do", workdir)
    results["already_finished"] = True
    return results
  if config.strategy == "hyperband":
    space, make_at = _hyperband_evaluators(config)
  elif config.strategy == "darts":
    try:
      darts, darts_data = darts_runner.build(config)
    except ValueError as e:  # DatasetError included
      raise UserError(str(e)) from None
  else:
    search = build(config, workdir)
  logging.info("jaxnas on %s: %s", jax.default_backend(), jax.devices())
  # The convs the networks run (data parallelism changes the default): results.json names them.
  execution = (darts.config.execution if config.strategy == "darts" else
               None if config.strategy == "hyperband" else search.evaluator.execution)
  compute = host_loop.compute_environment(trains_networks(config), execution)
  os.makedirs(workdir, exist_ok=True)
  if not os.path.exists(config_path):
    write_json_atomic(config_path, {"config": config.to_json(),
                                    "environment": environment(compute)})
  recorded = {"environment": compute}
  changes = host_loop.resumed_changes(began_in, compute)
  if changes:
    recorded["resumed_changes"] = changes
  if config.strategy == "hyperband":
    args = dict(config.strategy_args)
    args["max_epochs"] = dict(config.evaluator_args).get("epochs", ProxySpec().epochs)
    return _run_host_strategy(config, workdir, recorded,
                              lambda: multifidelity.run(config, workdir, make_at, space, args))
  if config.strategy == "darts":
    return _run_host_strategy(config, workdir, recorded,
                              lambda: darts_runner.run(config, workdir, darts, darts_data))

  t_start = time.time()
  chunk = min(config.checkpoint_every or search.num_steps, search.num_steps)
  state, elapsed, stopped = drive_search(search, config.num_seeds, config.seed, workdir, chunk,
                                         config.max_hours, checkpoint=bool(config.checkpoint_every))
  results = collect_results(search, config, state)
  results.update(recorded)
  if len(config.objectives) > 1:
    front = collect_front(search, config, state)
    results["pareto_front"] = {"objectives": front["objectives"],
                               "size_per_run": [len(r) for r in front["per_run"]],
                               "pooled_size": len(front["pooled"]), "file": "pareto.json"}
    write_json_atomic(os.path.join(workdir, "pareto.json"), front)
  # Limits and whether they cut the search are results; the measured times are
  # not (they differ between an interrupted and an uninterrupted run, which must
  # write identical results.json), so they go to timing.json.
  results["budget"].update(max_hours=config.max_hours,
                           max_device_seconds=config.max_hours * 3600.0 * jax.device_count(),
                           stopped_early=stopped)
  write_json_atomic(os.path.join(workdir, "timing.json"),
                    host_loop.timing(elapsed, setup_s=round(search.evaluator.setup_s, 3)))
  write_json_atomic(results_path, results)
  logging.info("search finished in %.2fs", time.time() - t_start)
  results = dict(results)
  results["already_finished"] = False
  return results


def _hyperband_evaluators(config: SearchConfig):
  """The space and ``epochs -> Evaluator`` of a Hyperband search (data checked once, now)."""
  spec = _proxy_spec(config)
  model = _checked_model(config)
  try:
    first = train_evaluator(spec, model=model)
  except ValueError as e:
    raise UserError(str(e)) from None
  cache = {spec.epochs: first}

  def at(epochs):
    if epochs not in cache:
      cache[epochs] = train_evaluator(spec._replace(epochs=epochs), model=model)
    return cache[epochs]

  return first.space, at


def _run_host_strategy(config: SearchConfig, workdir: str, recorded: dict, run) -> dict:
  """Runs a host-loop strategy (``run()``: its results.json object, ``results.document``)
  and writes it with ``recorded`` (the environment) and the command to retrain its best
  cell."""
  try:
    results = run()
  except ValueError as e:
    raise UserError(str(e)) from None
  results = {**results, **recorded}
  results["summary"]["retrain_command"] = retrain_command(config, results["summary"]["best_arch"])
  write_json_atomic(os.path.join(workdir, "results.json"), results)
  return {**results, "already_finished": False}


def collect_front(search, config: SearchConfig, state) -> dict:
  """Pareto fronts (per run and pooled over runs) of all evaluated architectures."""
  objectives = tuple(config.objectives)
  out = jax.device_get(jax.jit(jax.vmap(lambda a: pareto.archive_front(
      search.evaluator.space, search.evaluator, a, objectives)))(state.archive))
  vectors = np.asarray(jax.device_get(state.archive.vectors))
  space = search.evaluator.space

  def point(i, j):
    arch = space.from_vector(vectors[i, j])
    values = {o: (int(v) if o in ("params", "flops") else round(float(v), 6))
              for o, v in zip(objectives, out["values"][i, j])}
    return {"arch": space.encode(arch), "seed": config.seed + i, **values}

  def sort_key(p):  # cheapest first, then most accurate
    return tuple(p[o] for o in objectives[1:]) + (-p["accuracy"], p["arch"])

  per_run = [sorted((point(i, j) for j in np.nonzero(out["mask"][i])[0]), key=sort_key)
             for i in range(config.num_seeds)]
  everything = [point(i, j) for i in range(config.num_seeds)
                for j in np.nonzero(out["valid"][i])[0]]
  # A point dominated within its run is dominated overall, so the pooled front
  # is the front of the union of the per-run fronts (small, whatever the budget).
  candidates = [p for front in per_run for p in front]
  signs = np.asarray([pareto.OBJECTIVES[o] for o in objectives])
  values = np.asarray([[p[o] for o in objectives] for p in candidates], np.float64) * signs
  seen, pooled = set(), []
  for k, p in enumerate(candidates):
    dominated = np.any(np.all(values >= values[k], 1) & np.any(values > values[k], 1))
    if not dominated and p["arch"] not in seen:
      seen.add(p["arch"])
      pooled.append(p)
  return {"objectives": list(objectives), "per_run": per_run,
          "pooled": sorted(pooled, key=sort_key), "evaluated": everything}


def retrain_command(config: SearchConfig, arch: str) -> str:
  """The CLI line that retrains ``arch`` from scratch on the search's data and network size."""
  args = dict(config.evaluator_args)
  if not config.model and builtin(config.space).cells:
    args.setdefault("cells", builtin(config.space).cells)
  parts = ["python -m jaxnas.main --mode=retrain"]
  if config.model:
    parts.append(f"--model={shlex.quote(config.model)}")
  parts += [f"--arch={shlex.quote(arch)}", f"--dataset={config.dataset}"]
  for k in ("data_dir", "channels", "cells"):
    if k in args:
      parts.append(f"--{k}={args[k]}")
  return " ".join(parts)


def search_results(search, state, seed: int = 0) -> dict:
  """``{"summary", "runs"}`` of a finished batched state (seeds ``seed + i``): per run the
  best architecture's string, its score and report, the trajectory and the counts of
  failed and duplicate evaluations; the summary's means and the best run."""
  r = jax.device_get(jax.jit(jax.vmap(lambda s: results_of(search, s)))(state))
  space = search.evaluator.space
  runs = []
  count = np.asarray(jax.device_get(state.archive.count))
  for i in range(count.shape[0]):
    arch = jax.tree.map(lambda x: x[i], r["best_arch"])
    run_i = {"seed": seed + i,
             "best_arch": space.encode(arch),
             "best_score": round(float(r["best_score"][i]), 6),
             "trajectory": [round(float(x), 6) for x in r["trajectory"][i][:int(count[i])]],
             "failed_evaluations": int(r["num_failed"][i]),
             "duplicate_evaluations": int(r["num_duplicates"][i])}
    for k, v in r["report"].items():
      run_i[k] = round(float(v[i]), 6)
    runs.append(run_i)
  summary = results_lib.summary_of(runs, {"best_score": r["best_score"], **r["report"]},
                                   tuple(r["report"]))
  return {"summary": summary, "runs": runs}


def collect_results(search, config: SearchConfig, state) -> dict:
  """The results.json object of a finished batched state: ``search_results`` with the
  config, what the evaluator adds (the table's optimum, the retrain command), the
  trajectory's axes and the budget."""
  out = search_results(search, state, config.seed)
  summary = out["summary"]
  if config.evaluator == "nb201":
    summary["table_optimum"] = estimators.nb201.oracle(config.dataset)
  if config.evaluator in ("train", "supernet"):
    summary["retrain_command"] = retrain_command(config, summary["best_arch"])
  return results_lib.document(config, summary, out["runs"], trajectory_axes(config),
                             {"evaluations": config.budget, "steps": search.num_steps,
                              "batch_size": search.strategy.batch_size})


def trajectory_axes(config: SearchConfig) -> dict:
  """What a run's ``trajectory`` plots: the best score so far, in the evaluator's terms,
  against the architectures evaluated."""
  args = dict(config.evaluator_args)
  y = {"nb201": "best NAS-Bench-201 12-epoch validation accuracy so far (%)",
       "train": "best validation accuracy so far, proxy training (%)",
       "supernet": "best validation accuracy so far, supernet weights (%)",
       "zero_cost": f"best {args.get('proxy', 'naswot')} score so far (zero-cost proxy)"}
  return {"x": "architectures evaluated", "y": y.get(config.evaluator, "best score so far")}
