"""Retrain one architecture from scratch with the full schedule, test it, export it.

``python -m jaxnas.main --mode=retrain --arch='|nor_conv_3x3~0|+|...|'`` is the
last step of a search (results.json of a training search names this command
for its best cell). The network is the *specialised* one (only the chosen ops
exist), trained on the whole training set with the NAS-Bench-201 recipe and a
cosine schedule over ``epochs``, then scored once on the test set, which no
search ever sees.

Training runs in chunks of ``checkpoint_every`` steps (default one epoch)
through ``host_loop``: a checkpoint of the whole training state and a
metrics.jsonl line after each, so a killed retrain rerun with the same command
resumes and ends with the same results.

Workdir layout:
  config.json   the retrain's settings
  checkpoints/  the training state between chunks (orbax; unfinished retrains)
  metrics.jsonl one line per chunk: step, epoch, mean loss, seconds
  arch.json     the architecture (string and op list) and the network's size
  export/       the trained specialised network (``jaxnas.export``: network.json and
                orbax variables; ``export.load(workdir + "/export")`` runs it)
  results.json  test accuracy, parameter count, FLOPs, the full config

``retrain(config, workdir, model=...)`` retrains an architecture of a user's
searchable model (``models.protocol.searchable``) the same way, as does
``RetrainConfig(model="package.module:ATTR")`` (``--model``), whose export records that
spec so that ``export.load`` can rebuild the network from it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxnas import export, host_loop
from jaxnas.datasets import DATASETS, DatasetError, default_augment, load_dataset
from jaxnas.estimators.training import check_fields
from jaxnas.runner import MODEL_FIXED_ARGS, cli_flag
from jaxnas.checkpoint import Checkpointer, CheckpointError
from jaxnas.models import TrainConfig, make_data
from jaxnas.models.protocol import SearchableModel, check_head
from jaxnas.models.registry import load_model, model_of
from jaxnas.models.train import compiler_options, make_network, make_train_parts
from jaxnas.spaces import SPACES


class RetrainError(ValueError):
  """Bad retrain input (architecture string, data, flags): one clear line."""


@dataclasses.dataclass(frozen=True)
class RetrainConfig:
  arch: str
  dataset: str = "fashion_mnist"
  data_dir: str | None = None
  epochs: float = 10.0
  channels: int = 16
  cells: int = 1
  batch_size: int = 128
  learning_rate: float = 0.1
  weight_decay: float = 5e-4
  seed: int = 0
  augment: bool | None = None  # random crop + flip; None: on for CIFAR, off for (Fashion-)MNIST
  # Training steps between checkpoints (0: one epoch). Where a run is cut does not change
  # its results, so a workdir is resumed under any value.
  checkpoint_every: int = 0
  # A user's model, "package.module:ATTR" (``registry.load_model``; --model): ``arch`` is
  # of its space. "": the built-in network of the space ``arch`` is written in.
  model: str = ""


def _identity(config: dict) -> dict:
  """What a retrain's results depend on: its config without ``checkpoint_every``, fields
  missing from older records at their defaults."""
  defaults = {f.name: f.default for f in dataclasses.fields(RetrainConfig)
              if f.default is not dataclasses.MISSING}
  return {k: v for k, v in {**defaults, **config}.items() if k != "checkpoint_every"}


def default_workdir(c: RetrainConfig) -> str:
  tag = hashlib.sha1((f"{c.model}|{c.arch}" if c.model else c.arch).encode()).hexdigest()[:10]
  return os.path.join("runs", f"retrain-{c.dataset}-{tag}-C{c.channels}-N{c.cells}"
                              f"-e{c.epochs:g}-s{c.seed}")


def space_of(arch: str):
  """The built-in space (``spaces.SPACES``) whose string form ``arch`` is; RetrainError
  naming each space's objection when none decodes it."""
  errors = []
  for name, make in SPACES.items():
    space = make()
    try:
      space.decode(arch)
      return space
    except ValueError as e:
      errors.append(f"{name}: {e}")
  raise RetrainError(f"--arch is not an architecture of any built-in space ({'; '.join(errors)})")


def model_of_retrain(c: RetrainConfig,
                     model: SearchableModel | None = None) -> SearchableModel | None:
  """``model``, else ``c.model`` imported (RetrainError where it names no model), else None
  (the built-in network of ``c.arch``'s space)."""
  if model is not None or not c.model:
    return model
  try:
    return load_model(c.model)
  except ValueError as e:
    raise RetrainError(str(e)) from None


def check(c: RetrainConfig, model: SearchableModel | None = None):
  """``(space, arch)`` of a retrain config (of ``model``'s space when given, else of
  ``c.model``'s), or ``RetrainError`` saying what is wrong."""
  model = model_of_retrain(c, model)
  space = space_of(c.arch) if model is None else model.space
  try:
    arch = space.decode(c.arch)
  except ValueError as e:
    raise RetrainError(str(e)) from None
  try:
    check_fields(c, ("epochs", "channels", "cells", "batch_size", "learning_rate",
                     "weight_decay"), cli_flag)
  except ValueError as e:
    raise RetrainError(str(e)) from None
  if c.checkpoint_every < 0:
    raise RetrainError(f"--checkpoint_every must be >= 0, got {c.checkpoint_every}")
  return space, arch


def _read_record(path: str) -> dict:
  record = host_loop.read_json(path, "use another --workdir", RetrainError)
  if not isinstance(record, dict):
    raise RetrainError(f"{path} is not a jaxnas record; use another --workdir")
  return record


def _check_same(workdir: str, previous, c: RetrainConfig) -> None:
  """Refuses a workdir that holds a search or another retrain, saying what differs."""
  if not isinstance(previous, dict) or "arch" not in previous:
    raise RetrainError(f"workdir {workdir} holds a search or other files, not a retrain; use "
                       "another --workdir")
  there, now = _identity(previous), _identity(dataclasses.asdict(c))
  if there != now:
    raise RetrainError(f"workdir {workdir} holds another retrain "
                       f"({host_loop.describe_diff(there, now)}); use another --workdir")


def retrain(c: RetrainConfig, workdir: str | None = None,
            model: SearchableModel | None = None) -> dict:
  """Trains ``c.arch`` (of ``model``, default ``c.model``'s or the built-in network of its
  space) on the full training set, tests it, exports it; returns results."""
  space, arch = check(c, model)
  model = model_of_retrain(c, model)
  workdir = os.path.abspath(workdir or default_workdir(c))
  results_path = os.path.join(workdir, "results.json")
  if os.path.exists(results_path):
    previous = _read_record(results_path)
    _check_same(workdir, previous.get("config"), c)
    previous["already_finished"] = True
    return previous
  config_path = os.path.join(workdir, "config.json")
  if os.path.exists(config_path):  # an unfinished retrain: resumed if it is this one
    _check_same(workdir, _read_record(config_path), c)
  try:
    ds = load_dataset(c.dataset, c.data_dir)
  except DatasetError as e:
    raise RetrainError(str(e)) from None
  if c.batch_size > len(ds.train_labels):
    raise RetrainError(f"--batch_size={c.batch_size} is more than the {len(ds.train_labels)} "
                       f"training images of {c.dataset}")
  if model is not None:
    try:
      check_head(model, ds.train_images.shape[1:], ds.num_classes, c.dataset)
    except ValueError as e:
      raise RetrainError(str(e)) from None
  os.makedirs(workdir, exist_ok=True)
  host_loop.write_json_atomic(config_path, dataclasses.asdict(c))

  n_train = len(ds.train_labels)
  augment = default_augment(c.dataset, c.augment)
  config = TrainConfig(steps=max(1, math.ceil(c.epochs * n_train / c.batch_size)),
                       batch_size=c.batch_size, learning_rate=c.learning_rate,
                       weight_decay=c.weight_decay, channels=c.channels, cells=c.cells,
                       num_classes=ds.num_classes, augment=augment,
                       plan="sequential_static", op_impl="switch", space=space.name,
                       model=model)
  model = model_of(config)
  # The test set takes the validation slot: it is scored once, never selected on.
  data = make_data(ds.train_images, ds.train_labels, ds.test_images, ds.test_labels, ds.mean,
                   ds.std)
  fixed = model.static(arch)
  out, seconds = _train(c, config, fixed, arch, data, workdir, len(ds.train_labels))
  if bool(out["failed"]):
    raise RetrainError(f"training of {c.arch} diverged (non-finite loss); try a lower "
                       "--train_learning_rate")
  image_shape = tuple(int(d) for d in ds.train_images.shape[1:])
  params, flops = jax.jit(model.cost, static_argnums=(1, 2))(arch, image_shape, ds.num_classes)
  costs = {"params": int(params), "flops": int(flops)}
  if model.latency is not None:  # ms of batch-1 inference from the model's latency model
    costs["latency"] = round(float(model.latency(arch, image_shape)), 6)
  image, in_channels = image_shape[0], image_shape[-1]
  test_accuracy = round(100.0 * float(out["val_accuracy"]), 4)
  arch_json = {"arch": space.encode(arch), "network": model.name, "channels": c.channels,
               "cells": c.cells, "num_classes": ds.num_classes, "in_channels": int(in_channels),
               "image_size": int(image), **costs}
  if config.model is not None:  # a user's model: its module fixes the network's size
    del arch_json["channels"], arch_json["cells"]
  if c.model:
    arch_json["model"] = c.model
  host_loop.write_json_atomic(os.path.join(workdir, "arch.json"), arch_json)
  export.save(os.path.join(workdir, "export"), make_network(config, fixed),
              model.call_arch(fixed), out["variables"], image_shape=image_shape, mean=ds.mean,
              std=ds.std, metadata={"arch": arch_json["arch"], "dataset": c.dataset,
                                    "test_accuracy": test_accuracy},
              model=c.model or None)
  results = {"config": dataclasses.asdict(c), "arch": arch_json["arch"],
             "test_accuracy": test_accuracy,
             **costs, "steps": config.steps,
             "final_loss": float(out["final_loss"]), "train_seconds": round(seconds, 2),
             "workdir": workdir}
  # Last: its presence means the retrain finished.
  host_loop.write_json_atomic(results_path, results)
  results["already_finished"] = False
  return results


def _train(c: RetrainConfig, config: TrainConfig, fixed, arch, data, workdir: str,
           n_train: int) -> tuple[dict, float]:
  """Trains in chunks of ``c.checkpoint_every`` steps (default one epoch) through the host
  loop: a checkpoint and a metrics.jsonl line per chunk, resumed after a kill. Returns the
  evaluation (test set in the validation slot) and the training seconds (resumes included)."""
  parts = make_train_parts(config, fixed_arch=fixed)
  jit = functools.partial(jax.jit, compiler_options=compiler_options(model_of(config)))
  init, run = jit(parts.init), jit(parts.run, static_argnums=5)
  init_key, data_key = jax.random.split(jax.random.PRNGKey(c.seed))
  steps = config.steps
  chunk = min(steps, c.checkpoint_every or math.ceil(n_train / c.batch_size))
  carry = init(arch, init_key, data)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  log_path = os.path.join(workdir, "metrics.jsonl")
  try:
    step, carry, elapsed = host_loop.resume(ckpt, carry, log_path)
  except CheckpointError as e:
    raise RetrainError(f"{e}; the unreadable steps were moved aside, rerun to start "
                       "afresh") from None
  logging.info("retraining %s on %s: %d steps of batch %d (%g epochs)%s", c.arch, c.dataset,
               steps, c.batch_size, c.epochs, f", from step {step}" if step else "")

  def advance(step):
    n = min(chunk, steps - step)  # at most two programs: the chunk and the remainder
    new, losses = run(carry, arch, data_key, data, jnp.int32(step), n)
    return step + n, (new, np.asarray(jax.device_get(losses)))

  last_loss = None  # the final checkpoint is a chunk before the end, so a chunk always runs

  def commit(step, out, seconds, elapsed):
    nonlocal carry, last_loss
    carry, losses = out
    last_loss = float(losses[-1])
    line = {"step": step, "epoch": round(step * c.batch_size / n_train, 3),
            "loss": round(float(np.mean(losses)), 6), "seconds": round(seconds, 2)}
    host_loop.append_jsonl(log_path, [line])
    logging.info("retrain step %d/%d (epoch %.2f)  mean loss %.4f  (%.1fs)", step, steps,
                 line["epoch"], line["loss"], seconds)
    if step < steps:
      ckpt.save(step, carry, {"elapsed_s": elapsed})

  _, elapsed, _ = host_loop.drive(step, elapsed, advance, commit, done=lambda s: s >= steps)
  ckpt.close()
  evaluate = jax.jit(parts.evaluate, compiler_options=compiler_options(model_of(config)))
  out = jax.block_until_ready(evaluate(carry, arch, data))
  out["final_loss"] = last_loss
  return out, elapsed


def network_of(arch_json: dict):
  """The specialised flax module described by a retrain's ``arch.json`` (a built-in
  network, or a ``--model``'s, imported again)."""
  if arch_json.get("model"):
    model = load_model(arch_json["model"])
    return model.network(model.static(model.space.decode(arch_json["arch"])))
  space = space_of(arch_json["arch"])
  config = TrainConfig(channels=arch_json["channels"], cells=arch_json["cells"],
                       num_classes=arch_json["num_classes"], op_impl="switch", space=space.name)
  model = model_of(config)
  return model.network(model.static(space.decode(arch_json["arch"])))


def load_variables(workdir: str) -> dict:
  """Trained ``{"params", "batch_stats"}`` of a finished retrain workdir."""
  return export.load(os.path.join(os.path.abspath(workdir), "export")).variables


def run_from_flags(flags) -> dict:
  return retrain(config_from_flags(flags), flags.workdir)


def config_from_flags(flags) -> RetrainConfig:
  """The ``RetrainConfig`` of parsed CLI flags (the architecture not yet checked: ``check``)."""
  if flags.arch is None:
    raise RetrainError("--mode=retrain needs --arch='|op~0|+|op~0|op~1|+|op~0|op~1|op~2|' "
                       "(NAS-Bench-201), --arch=\"Genotype(normal=[...], ...)\" (DARTS) or "
                       "--arch='choice=value,...' (a --model's space)")
  if flags.model:
    for name in MODEL_FIXED_ARGS:
      if getattr(flags, name) is not None:
        raise RetrainError(f"--{name} does not apply to --model (its module fixes the network)")
  dataset = flags.dataset or "fashion_mnist"
  if dataset not in DATASETS:
    raise RetrainError(f"unknown dataset {dataset!r} for retrain; choose one of "
                       f"{', '.join(DATASETS)}")
  kw = {k: getattr(flags, f) for k, f in (("data_dir", "data_dir"), ("epochs", "epochs"),
                                          ("checkpoint_every", "checkpoint_every"),
                                          ("augment", "augment"),
                                          ("channels", "channels"), ("cells", "cells"),
                                          ("batch_size", "batch_size"),
                                          ("learning_rate", "train_learning_rate"))
        if getattr(flags, f) is not None}
  return RetrainConfig(arch=flags.arch, dataset=dataset, seed=flags.seed,
                       model=flags.model or "", **kw)


def summary(r: dict) -> str:
  done = " (already finished; nothing recomputed)" if r.get("already_finished") else ""
  model = r["config"].get("model")
  return (f"retrained {r['arch']}{f' of --model={model}' if model else ''} on "
          f"{r['config']['dataset']}{done}\n"
          f"  test accuracy {r['test_accuracy']:.2f} %, {r['params']:,} params, "
          f"{r['flops'] / 1e6:.1f} MFLOPs, "
          f"{'%.3f ms latency, ' % r['latency'] if 'latency' in r else ''}{r['steps']} steps\n"
          f"  workdir: {r['workdir']} (results.json, arch.json, export/)")
