"""Real-training evaluator: a population trained for a proxy budget, scored on held-out data.

``train_evaluator`` wraps ``jaxnas.models.train_population`` in the
``Evaluator`` protocol so every strategy and the CLI drive it exactly like the
tabular benchmark. It is not jittable (training a population is its own
compiled program), so the runner calls it between compiled ``ask`` and
``tell`` with all seeds' candidates as one population.

Data handling is fixed by ``split_seed`` and never by the search seed: the
training set is split once into a search-train and a search-validation part
(``val_fraction``), and the proxy uses the first ``train_fraction`` of each
(a fixed permutation), so every candidate of every seed and every resumed run
sees the same data. Minibatch order and augmentation follow the evaluation
key, which the search loop derives from the step, so a resumed run re-trains
identically. The test set is never used by a search.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import numpy as np

from jaxnas import distributed
from jaxnas.datasets import default_augment, load_dataset, train_val_split
from jaxnas.estimators.base import Evaluator
from jaxnas.models import (PLANS, WIDTH_IMPLS, TrainConfig, make_data, resolve_plan,
                           train_population_metrics)
from jaxnas.models.protocol import SearchableModel, check_head, cost_report
from jaxnas.models.registry import model_of
from jaxnas.models.sharded import AXIS as POPULATION_AXIS, train_population_sharded


class ProxySpec(NamedTuple):
  """How candidates are trained during a search (the CLI's proxy flags)."""
  dataset: str = "fashion_mnist"
  data_dir: str | None = None
  epochs: float = 1.0
  channels: int = 16
  cells: int = 1
  batch_size: int = 128
  train_fraction: float = 0.1
  val_fraction: float = 0.1
  learning_rate: float = 0.1
  weight_decay: float = 5e-4
  augment: bool | None = None  # None: crop + flip for CIFAR, nothing for (Fashion-)MNIST
  split_seed: int = 0
  plan: str = "auto"
  width_impl: str = "mask"  # ``TrainConfig.width_impl``
  space: str = "nb201"  # a built-in model (``registry.MODELS``); "darts": ``cells`` in all


def _finite(v) -> bool:
  return isinstance(v, (int, float)) and math.isfinite(v)


# What each training setting must satisfy, shared by the search proxy (``validate_spec``),
# the supernet's config and the retrain (``retrain``).
REQUIREMENTS = {
    "epochs": (lambda v: _finite(v) and v > 0, "must be > 0 and finite"),
    "channels": (lambda v: v >= 1, "must be >= 1"),
    "cells": (lambda v: v >= 1, "must be >= 1"),
    "batch_size": (lambda v: v >= 1, "must be >= 1"),
    "train_fraction": (lambda v: _finite(v) and 0 < v <= 1, "must be in (0, 1]"),
    "val_fraction": (lambda v: _finite(v) and 0 < v < 1, "must be in (0, 1)"),
    "learning_rate": (lambda v: _finite(v) and v > 0, "must be > 0 and finite"),
    "weight_decay": (lambda v: _finite(v) and v >= 0, "must be >= 0 and finite"),
}

def check_fields(config, fields, flag=str) -> None:
  """ValueError with one clear line for the first of ``fields`` of ``config`` that breaks
  its ``REQUIREMENTS``, naming it as ``flag(field)`` (the CLI passes ``runner.cli_flag``)."""
  for field in fields:
    ok, requirement = REQUIREMENTS[field]
    value = getattr(config, field)
    if not ok(value):
      raise ValueError(f"{flag(field)} {requirement}, got {value!r}")


def validate_spec(spec, flag=str) -> None:
  """Checks the proxy fields of ``spec`` (a ``ProxySpec`` or any config with those fields,
  e.g. ``one_shot.SupernetConfig``) at the edge: ValueError with one clear line, naming a
  field as ``flag(field)``."""
  check_fields(spec, REQUIREMENTS, flag)
  if isinstance(spec, ProxySpec) and spec.plan not in ("auto",) + PLANS:
    raise ValueError(f"{flag('plan')} must be one of auto, {', '.join(PLANS)}, "
                     f"got {spec.plan!r}")
  if isinstance(spec, ProxySpec) and spec.width_impl not in WIDTH_IMPLS:
    raise ValueError(f"{flag('width_impl')} must be one of {', '.join(WIDTH_IMPLS)}, "
                     f"got {spec.width_impl!r}")


def search_split(spec: ProxySpec):
  """``(dataset, TrainData)``: the proxy's fixed train/validation data, on device."""
  validate_spec(spec)
  ds = load_dataset(spec.dataset, spec.data_dir)
  tx, ty, vx, vy = train_val_split(ds.train_images, ds.train_labels, spec.val_fraction,
                                   spec.split_seed)
  if spec.batch_size > len(ty):
    raise ValueError(f"--batch_size={spec.batch_size} is more than the {len(ty)} "
                     f"search-training images of {spec.dataset}; lower --batch_size")
  n_train = max(spec.batch_size, int(round(len(ty) * spec.train_fraction)))
  n_val = max(1, int(round(len(vy) * spec.train_fraction)))
  # train_val_split returns sorted indices; subsample with a fixed permutation
  # so a small fraction still covers every class.
  rng = np.random.default_rng(spec.split_seed + 1)
  ti = np.sort(rng.permutation(len(ty))[:n_train])
  vi = np.sort(rng.permutation(len(vy))[:n_val])
  data = make_data(tx[ti], ty[ti], vx[vi], vy[vi], ds.mean, ds.std)
  return ds, data


def proxy_train_config(spec: ProxySpec, num_classes: int, num_train: int) -> TrainConfig:
  """``TrainConfig`` of the proxy: ``epochs`` passes over the proxy training subset."""
  steps = max(1, math.ceil(spec.epochs * num_train / spec.batch_size))
  augment = default_augment(spec.dataset, spec.augment)
  return TrainConfig(steps=steps, batch_size=spec.batch_size, learning_rate=spec.learning_rate,
                     weight_decay=spec.weight_decay, channels=spec.channels, cells=spec.cells,
                     num_classes=num_classes, augment=augment, plan=spec.plan,
                     width_impl=spec.width_impl, space=spec.space)


def train_evaluator(spec: ProxySpec = ProxySpec(), model: SearchableModel | None = None
                    ) -> Evaluator:
  """Scores architectures by short real training (validation accuracy, %).

  The networks are ``model``'s (a user's ``protocol.searchable``), or the built-in
  model of ``spec.space`` (NAS-Bench-201; ``"darts"``: the DARTS-space network with
  ``spec.cells`` cells in all). ``evaluate(key, archs)`` trains the whole batch
  ``archs`` (the space's architecture pytree with a leading population axis) as one
  population and returns validation accuracy in percent, NaN for a candidate whose
  training diverged (the search records it as failed). ``report`` gives the
  specialised network's parameter count and FLOPs (``SearchableModel.cost``), and its
  latency in ms where the model has a latency model (``SearchableModel.latency``), so
  results.json carries the cost of every chosen architecture.
  """
  ds, data = search_split(spec)
  config = proxy_train_config(spec, ds.num_classes, int(data.train_labels.shape[0]))
  config = config._replace(model=model)
  model = model_of(config)
  image_shape = tuple(int(d) for d in ds.train_images.shape[1:])
  check_head(model, image_shape, ds.num_classes, spec.dataset)

  # Sharded over all devices (of all processes) when there is more than one;
  # the per-member results are the same as on one device (tests/test_sharding.py).
  sharded = jax.device_count() > 1 and resolve_plan(config).plan in ("map", "vmap")
  mesh = distributed.mesh(POPULATION_AXIS) if sharded else None

  def evaluate(key, archs):
    if sharded:
      metrics = train_population_sharded(archs, key, data, config, mesh=mesh)
    else:
      metrics = train_population_metrics(archs, key, data, config)
    return 100.0 * metrics["val_accuracy"]

  def report(archs):
    return cost_report(model, archs, image_shape, ds.num_classes)

  return Evaluator(name=f"train/{spec.dataset}/{model.name}", space=model.space,
                   evaluate=evaluate, report=report, jittable=False)
