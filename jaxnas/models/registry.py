"""The built-in spaces by name: the one place a space's name selects code.

``BUILTINS[name]`` says how a space is searched: ``model(config)`` builds its
``SearchableModel`` for a ``TrainConfig`` (width, cells, classes, execution), and the
entry lists the evaluators that score it, the strategies that search it, its
default network depth and its DARTS selections. ``model_of(config)`` is
``config.model`` when the user gave one (``protocol.searchable``), else the
registered model of ``config.space``. A new built-in space is its own files plus
one entry here.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxnas.models import darts_net, nb201_net, supernet
from jaxnas.models.protocol import SearchableModel, SuperNet, init_variables
from jaxnas.spaces import darts as darts_lib
from jaxnas.spaces.darts import DartsArch, darts_space
from jaxnas.spaces.nb201 import OPS as NB201_OPS
from jaxnas.spaces.nb201 import nb201_space

# Relative training time of one cell edge per op (none, skip, 1x1, 3x3, pool) under the
# CPU "map" plan: CPU time per step of a population of one all-<op> cell, minus the
# all-none cell's, per edge (experiments/NOTES_population.md, where `train.OP_TIME` is derived).
OP_TIME = (0.0, 0.1, 1.0, 1.8, 0.6)


def _init(net, key, images, arch):
  return init_variables(net, key, images, arch, train=False)


def nb201_model(config) -> SearchableModel:
  """The NAS-Bench-201 network (Dong & Yang 2020) with ``config.cells`` cells per stage."""

  def network(static=None):
    return nb201_net.NB201Network(
        channels=config.channels, cells=config.cells, num_classes=config.num_classes,
        op_impl=config.op_impl if config.op_impl != "auto" else "switch", fixed_arch=static,
        bn_momentum=config.bn_momentum, execution=config.execution)

  def cost(arch, image_shape, num_classes):
    return nb201_net.cost(arch, config.channels, config.cells, num_classes, image_shape[-1],
                          image_shape[0])

  def supernet_of(remat=False, execution=None):
    net = supernet.NB201SuperNet(channels=config.channels, cells=config.cells,
                                 num_classes=config.num_classes, remat=remat,
                                 execution=execution or config.execution)
    skip = NB201_OPS.index("skip_connect")
    return SuperNet(nb201_space(), net, (supernet.NUM_EDGES, supernet.NUM_OPS), skip,
                    supernet.derive_nb201, lambda arch: jnp.sum(arch == skip),
                    lambda arch: jax.nn.one_hot(arch, supernet.NUM_OPS, dtype=jnp.float32))

  def table():
    from jaxnas.estimators.nb201 import load_table  # estimators import models: not at the top
    return load_table()

  return SearchableModel(
      name="nb201", space=nb201_space(), network=network,
      static=lambda arch: tuple(int(o) for o in np.asarray(arch).reshape(-1)),
      arrays=lambda static: np.asarray(static, np.int32), call_arch=lambda static: None,
      init=_init, specialise_variables=lambda v, static, images: nb201_net.specialise_variables(
          v, static),
      cost=cost, work=lambda archs: np.asarray(OP_TIME)[np.asarray(archs)].sum(1),
      supernet=supernet_of, table=table)


def darts_model(config) -> SearchableModel:
  """The DARTS-space network (Liu et al. 2019) with ``config.cells`` cells in all."""

  def network(static=None):
    return darts_net.DartsNetwork(
        channels=config.channels, layers=config.cells, num_classes=config.num_classes,
        cell="discrete", fixed_arch=static, bn_momentum=config.bn_momentum,
        execution=config.execution)

  def arrays(static):
    return DartsArch(*(np.asarray(a, np.int32) for a in static))

  def cost(arch, image_shape, num_classes):
    return darts_net.darts_cost(arch, config.channels, config.cells, num_classes,
                                image_shape[-1], image_shape[0])

  def supernet_of(remat=False, execution=None):
    net = darts_net.DartsNetwork(channels=config.channels, layers=config.cells,
                                 num_classes=config.num_classes, cell="mixed", affine=False,
                                 remat=remat, execution=execution or config.execution)
    n_ops, skip = len(darts_lib.OPS), darts_lib.OPS.index("skip_connect")
    edges = darts_net.NUM_EDGES
    return SuperNet(darts_space(), net, {"normal": (edges, n_ops), "reduce": (edges, n_ops)},
                    skip, darts_net.derive_darts, lambda arch: jnp.sum(arch.normal_ops == skip),
                    darts_net.darts_weights, darts_net.compiler_options())

  return SearchableModel(
      name="darts", space=darts_space(), network=network, static=darts_net.fixed_genotype,
      arrays=arrays, call_arch=lambda static: None, init=_init,
      specialise_variables=lambda v, static, images: darts_net.specialise_variables(
          v, arrays(static), config.cells),
      cost=cost, work=None, compiler_options=darts_net.compiler_options, supernet=supernet_of)


class Builtin(NamedTuple):
  """A built-in space: its model and how the CLI may search it."""
  model: Callable[..., SearchableModel]  # TrainConfig -> SearchableModel
  evaluators: tuple[str, ...]  # --evaluator values that score it (besides DARTS' own)
  strategies: tuple[str, ...] | None = None  # those that search it (None: every one)
  cells: int | None = None  # --cells when not given (None: the proxy's default)
  darts_selections: tuple[str, ...] = ("magnitude",)  # how DARTS reads its cell


BUILTINS = {
    "nb201": Builtin(nb201_model, ("nb201", "train", "zero_cost", "supernet"),
                     darts_selections=("magnitude", "perturbation")),
    # 5 cells (normal, reduce, normal, reduce, normal; DARTS itself: 8) keep a CPU search
    # to minutes.
    "darts": Builtin(darts_model, ("train",), cells=5),
}
MODELS = {name: b.model for name, b in BUILTINS.items()}


def builtin(name: str) -> Builtin:
  """The registry entry of a built-in space (ValueError naming the others)."""
  if name not in BUILTINS:
    raise ValueError(f"unknown space {name!r}; choose one of {', '.join(BUILTINS)}")
  return BUILTINS[name]


@functools.lru_cache(maxsize=64)
def _builtin_model(name: str, config) -> SearchableModel:
  return BUILTINS[name].model(config)


def model_of(config) -> SearchableModel:
  """``config.model``, or the registered model of ``config.space`` for ``config``."""
  if config.model is not None:
    return config.model
  builtin(config.space)
  return _builtin_model(config.space, config)
