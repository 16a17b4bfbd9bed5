"""The built-in spaces by name: the one place a space's name selects code.

``BUILTINS[name]`` says how a space is searched: ``model(config)`` builds its
``SearchableModel`` for a ``TrainConfig`` (width, cells, classes, execution), and the
entry lists the evaluators that score it, the strategies that search it, its
default network depth and its DARTS selections. ``model_of(config)`` is
``config.model`` when the user gave one (``protocol.searchable``), else the
registered model of ``config.space``. A new built-in space is its own files plus
one entry here. ``load_model("package.module:ATTR")`` is a user's model named on the
command line (``--model``).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxnas.models import darts_net, latency, mbconv_net, nb201_net, supernet
from jaxnas.models.protocol import SearchableModel, SuperNet, init_variables, searchable
from jaxnas.spaces import darts as darts_lib
from jaxnas.spaces.darts import DartsArch, darts_space
from jaxnas.spaces.mbconv import mbconv_space
from jaxnas.spaces.nb201 import OPS as NB201_OPS
from jaxnas.spaces.nb201 import nb201_space

# Relative training time of one cell edge per op (none, skip, 1x1, 3x3, pool) under the
# CPU "map" plan: CPU time per step of a population of one all-<op> cell, minus the
# all-none cell's, per edge (experiments/NOTES_population.md, where `train.OP_TIME` is derived).
OP_TIME = (0.0, 0.1, 1.0, 1.8, 0.6)


def _init(net, key, images, arch):
  return init_variables(net, key, images, arch, train=False)


def nb201_connected(arch) -> jax.Array:
  """Whether an NB201 cell has a path of non-``none`` edges from node 0 to node 3 (jittable,
  any leading axes): a cell without one computes a constant.

  Edges are in ``spaces.nb201.EDGES`` order: 1<-0, 2<-0, 2<-1, 3<-0, 3<-1, 3<-2.
  """
  on = jnp.asarray(arch) != nb201_net.NONE
  r1 = on[..., 0]
  r2 = on[..., 1] | (r1 & on[..., 2])
  return on[..., 3] | (r1 & on[..., 4]) | (r2 & on[..., 5])


def nb201_relu_probe(net, variables, images, arch, record, **kwargs):
  """``net.apply(variables, images, arch, **kwargs)`` of the arch-as-data NB201 network,
  ``record``ing the input of every ReLU (the protocol's ``relu_probe``).

  Where NAS-Bench-201 applies a ReLU: before every conv op of a cell edge (weighted by
  whether the edge chose a conv: the arch-as-data net also runs the others), before both
  convs of a residual reduction block, and after the last BN; the stem (conv + BN) has
  none. This mirrors Mellor et al.'s forward hooks on every ``nn.ReLU`` of the
  specialised network.
  """
  def interceptor(next_fun, args, kwargs_, context):
    m = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs_)
    if isinstance(m, nb201_net.Edge):
      op = args[1]
      record(args[0], ((op == nb201_net.CONV1) | (op == nb201_net.CONV3)).astype(jnp.float32))
    elif isinstance(m, nb201_net.ReLUConvBN) and isinstance(m.parent, nb201_net.ResidualReduction):
      record(args[0])
    out = next_fun(*args, **kwargs_)
    if isinstance(m, nb201_net.BatchNorm) and m.name == "last_bn":
      record(out)
    return out

  with nn.intercept_methods(interceptor):
    return net.apply(variables, images, arch, **kwargs)


def nb201_model(config) -> SearchableModel:
  """The NAS-Bench-201 network (Dong & Yang 2020) with ``config.cells`` cells per stage."""

  def network(static=None):
    return nb201_net.NB201Network(
        channels=config.channels, cells=config.cells, num_classes=config.num_classes,
        op_impl=config.op_impl if config.op_impl != "auto" else "switch", fixed_arch=static,
        bn_momentum=config.bn_momentum, execution=config.execution,
        scan_cells=config.scan_cells)

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
      supernet=supernet_of, table=table, relu_probe=nb201_relu_probe,
      connected=nb201_connected)


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


def mbconv_model(config) -> SearchableModel:
  """The MBConv macro network (``spaces.mbconv``; MobileNetV2 / ProxylessNAS / OFA), a
  ``searchable`` model of the public choice blocks with its exact analytic cost.

  Its depthwise kernel choice runs as ``lax.switch`` (``op_impl`` "switch": each member
  computes only its kernel where members run one at a time) or as the masked 7x7
  (otherwise: one conv for every member under ``vmap``). Its widths are masks (every member
  computes the widest convs) unless ``width_impl`` is "switch" with ``op_impl`` "switch"
  (each member its own widths, ``jnn.specialised_switch``). A member's training time is
  balanced by its multiply-accumulates as it runs (at full width where widths are masks).
  Its ``latency`` is the lookup table shipped in the package, measured on a CPU
  (``latency.builtin_mbconv_latency``; a proxy on other backends, which its first use
  logs).
  """
  space = mbconv_space()
  net = mbconv_net.MBConvNetwork(
      num_classes=config.num_classes, bn_momentum=config.bn_momentum,
      kernel_impl="switch" if config.op_impl in ("auto", "switch") else "mask",
      width_impl=getattr(config, "width_impl", "mask"), execution=config.execution)

  def cost(arch, image_shape, num_classes):
    return mbconv_net.cost(arch, num_classes, image_shape[-1], image_shape[0])

  widest = np.asarray([c - 1 for c in space.cardinalities], np.int32)
  elastic = np.asarray([label.endswith((".width", ".expand")) for label in space.labels])

  def work(archs):
    vectors = np.asarray(jax.vmap(space.to_vector)(archs))
    vectors = vectors if net.own_widths else np.where(elastic, widest, vectors)
    return np.asarray(jax.vmap(lambda v: cost(space.from_vector(v), (28, 28, 1), 10)[1])(
        vectors), np.float64)

  return searchable(net, space, name="mbconv", cost=cost, work=work,
                    latency=latency.builtin_mbconv_latency())._replace(init=_init)


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
    "mbconv": Builtin(mbconv_model, ("train", "zero_cost", "supernet")),
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


@functools.lru_cache(maxsize=16)
def load_model(spec: str) -> SearchableModel:
  """The user's model that ``spec`` (``"package.module:ATTR"``) names: ``ATTR`` is a
  ``SearchableModel`` (``protocol.searchable``) or a zero-argument callable returning one.

  The module is imported as ``python -m`` would, with the working directory importable.
  Loaded once per process (a factory is called once), so every consumer of a search sees
  the same model. ValueError with one line for a malformed spec, a module that does not
  import, a missing attribute or something that is not a model; an exception raised by
  the user's own code while it runs is theirs, and propagates.
  """
  module_name, _, attr = spec.partition(":")
  if not module_name or not attr or not all(
      part.isidentifier() for part in module_name.split(".") + attr.split(".")):
    raise ValueError(f"--model={spec!r} is not package.module:ATTR (e.g. my_models:MODEL)")
  if os.getcwd() not in sys.path and "" not in sys.path:
    sys.path.insert(0, os.getcwd())
  try:
    obj = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"--model={spec}: cannot import {module_name} ({e})") from None
  for part in attr.split("."):
    if not hasattr(obj, part):
      raise ValueError(f"--model={spec}: {module_name} has no attribute {attr}")
    obj = getattr(obj, part)
  if inspect.isroutine(obj) or isinstance(obj, functools.partial):
    try:
      inspect.signature(obj).bind()
    except TypeError:
      raise ValueError(f"--model={spec}: {attr} takes arguments; name a SearchableModel or "
                       "a zero-argument function returning one") from None
    obj = obj()
  if not isinstance(obj, SearchableModel):
    kind = f"the class {obj.__name__}" if isinstance(obj, type) else f"a {type(obj).__name__}"
    raise ValueError(f"--model={spec}: {attr} is {kind}, not a SearchableModel (make one "
                     "with jaxnas.searchable(module, space))")
  return obj
