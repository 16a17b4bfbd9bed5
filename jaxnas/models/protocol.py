"""The searchable-model protocol: what population training, export and the cost
objectives need of a network family, whatever its space.

A ``SearchableModel`` is a NamedTuple of pure functions (optax style): the
arch-as-data network that one compiled program runs for every member of a
population, the specialised network of one architecture, how the two's
variables relate, and what a member costs. ``jaxnas.models.registry`` builds
the NAS-Bench-201 and DARTS-space models; ``searchable(module, space)`` builds
one from a user's flax module written with the ``jaxnas.nn`` choice blocks and
a space from ``jaxnas.spaces.declare``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Hashable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxnas.models.remat import fan_in_uniform
from jaxnas.nn.elastic import ElasticConv, ElasticDense
from jaxnas.nn.extract import extract, specialised_shapes
from jaxnas.spaces.base import Space
from jaxnas.spaces.declared import to_python


class SuperNet(NamedTuple):
  """A model's DARTS supernet: every op choice a mixture weighted by architecture
  parameters ``alpha`` (Liu et al. 2019), and how ``alpha`` maps to an architecture."""
  space: Space
  net: object                # flax module: __call__(images, op weights (alpha's pytree), train)
  alpha_shapes: object       # pytree of shapes of alpha
  skip: int | None           # index of skip_connect among the ops (None: no skip op;
                             # DARTS- needs one)
  derive: Callable           # alpha -> architecture pytree (jittable)
  skip_count: Callable       # architecture -> number of skip connections (normal cell)
  weights_of: Callable       # architecture -> one-hot op weights (alpha's pytree): its cell
  compiler_options: dict | None = None  # XLA options of its programs


class SearchableModel(NamedTuple):
  """A network family searched over ``space``.

  Fields:
    name: what results call it.
    space: the architectures.
    network(static) -> flax module: ``static=None`` the arch-as-data network, called
      ``apply(variables, images, arch, train=...)`` with ``arch`` one member's int32
      arrays; otherwise the specialised network of that architecture, called with
      ``call_arch(static)`` as its ``arch``.
    static(arch) -> hashable: one member's architecture (host arrays) as the key of
      its specialised network; ``arrays(static)`` is the inverse.
    call_arch(static): the ``arch`` argument of the specialised network.
    init(net, key, images, arch) -> variables of the arch-as-data network (``params``
      and ``batch_stats``).
    specialise_variables(variables, static, images) -> the specialised network's
      variables cut out of the arch-as-data ones (same function, same start).
    cost(arch, image_shape, num_classes) -> (params, flops): int32 scalars for one
      member, jittable and vmappable.
    work(archs) -> float[P]: relative training time per member (host), for balancing
      a population over devices; None: all equal.
    compiler_options() -> dict | None: XLA options of its population programs.
    supernet(remat, execution) -> SuperNet: its DARTS supernet, where it has op choices
      whose mixture gradient-based search trains (None: not searchable by DARTS/GDAS).
    table() -> dict | None: a tabular benchmark of its architectures (NAS-Bench-201's),
      that reports look derived architectures up in; None: none.
    relu_probe(net, variables, images, arch, record, **kwargs) -> ``net.apply(variables,
      images, arch, **kwargs)``'s result, calling ``record(x, weight=None)`` as it traces,
      with ``x`` the input of each ReLU (batch first) and ``weight`` 0 or 1 (a float32
      scalar; None: 1) whether the member ``arch`` uses it: the activations of
      activation-based zero-cost proxies (NASWOT, Mellor et al. 2021); None: the BatchNorm
      outputs of its one-hot relaxation (``estimators.zero_cost.output_probe``).
    connected(arch) -> bool: whether a member's output depends on its input (jittable;
      False: degenerate, e.g. no path of non-``none`` ops); None: zero-cost proxies test
      its input gradient.
    latency(arch, image_shape) -> float32: milliseconds of inference of one image (batch 1,
      evaluation mode) of a member's specialised network on a target device (jittable,
      vmappable; ``image_shape`` (H, W, C) static), e.g. a lookup table of its blocks'
      measured latencies (``jaxnas.models.latency``; ProxylessNAS, Cai et al. 2019): the
      ``latency`` objective (``--objectives=accuracy,latency``); None: it has none.
  """
  name: str
  space: Space
  network: Callable[[Hashable | None], nn.Module]
  static: Callable[[Any], Hashable]
  arrays: Callable[[Hashable], Any]
  call_arch: Callable[[Hashable], Any]
  init: Callable
  specialise_variables: Callable
  cost: Callable
  work: Callable | None = None
  compiler_options: Callable[[], dict | None] = lambda: None
  supernet: Callable | None = None
  table: Callable | None = None
  relu_probe: Callable | None = None
  connected: Callable | None = None
  latency: Callable | None = None


# Leaves of the networks' variables that flax initialises to a constant, by (collection, name).
_CONSTANT_LEAVES = {("params", "scale"): 1.0, ("params", "bias"): 0.0,
                    ("batch_stats", "mean"): 0.0, ("batch_stats", "var"): 1.0}


def init_variables(net: nn.Module, key, *args, **kwargs):
  """``net.init(key, *args, **kwargs)``'s variables, drawn with two RNG computations.

  Same tree, shapes and distributions as flax's init of this package's networks
  (NB201 and DARTS space): every conv kernel (a 4-D param, ``conv_init``; with leading
  axes, a stack of them under ``nn.scan``)
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)) from one uniform draw
  (``remat.fan_in_uniform``), the classifier's kernel ``lecun_normal`` (flax
  ``Dense``'s default), BatchNorm's scale/bias and statistics their constants.
  The values differ from ``net.init``'s: flax derives a key and runs a threefry
  loop per parameter, which in the issue-3 benchmark's population program
  (44 kernels per member) took 4-8 s of its 13-20 s XLA:CPU compile
  (experiments/NOTES_population.md). A leaf of another kind is an error, not a silent guess.
  """
  shapes = jax.eval_shape(lambda k: net.init(k, *args, **kwargs), jax.random.PRNGKey(0))
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))
  convs = {p: v for p, v in flat.items() if p[0] == "params" and v.ndim >= 4}
  dense = [p for p, v in flat.items() if p[0] == "params" and v.ndim == 2 and p[-1] == "kernel"]
  k_conv, k_dense = jax.random.split(key)
  values = fan_in_uniform(k_conv, convs)
  for p, k in zip(dense, jax.random.split(k_dense, max(len(dense), 1))):
    values[p] = nn.initializers.lecun_normal()(k, flat[p].shape, flat[p].dtype)
  for p, v in flat.items():
    if p in values:
      continue
    if (p[0], p[-1]) not in _CONSTANT_LEAVES:
      raise ValueError(f"init_variables: no initialiser known for {'/'.join(p)} {v.shape}")
    values[p] = jnp.full(v.shape, _CONSTANT_LEAVES[p[0], p[-1]], v.dtype)
  return flax.traverse_util.unflatten_dict(values)


def count_params(variables) -> int:
  """Trainable parameters (the ``params`` collection)."""
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(variables.get("params", {}))))


# Layers whose multiply-accumulates ``layer_macs`` counts: convolutions (any groups) and
# dense layers, the convention of NAS-Bench-201's FLOPs and of module-hook counters
# (ptflops, fvcore). BN, activations, pooling and sums are not counted.
_COUNTED = (ElasticConv, ElasticDense, nn.Conv, nn.Dense)


def layer_macs(module, images, arch, **kwargs) -> int:
  """Multiply-accumulates of one image through ``module`` (specialised, or any form) in
  evaluation mode: per conv ``out_h * out_w * kernel size`` (``kh * kw * in/groups * out``)
  and per dense layer ``positions * in * out``, read from the shapes of an abstract
  evaluation, whatever implementation the convs compute with (XLA's cost analysis does not
  see into a custom call such as oneDNN's)."""
  counts = []

  def count(next_fun, args, kwargs_, context):
    out = next_fun(*args, **kwargs_)
    m = context.module
    if context.method_name == "__call__" and isinstance(m, _COUNTED):
      kernel = m.variables["params"]["kernel"]
      positions = int(np.prod(out.shape[1:-1])) if out.ndim > 2 else 1
      counts.append(positions * int(np.prod(kernel.shape)))
    return out

  x = jax.ShapeDtypeStruct((1,) + tuple(images.shape[1:]), jnp.float32)

  def forward(x):
    variables = module.init(jax.random.PRNGKey(0), x, arch, train=False, **kwargs)
    with nn.intercept_methods(count):
      return module.apply(variables, x, arch, train=False, **kwargs)

  jax.eval_shape(forward, x)
  return int(sum(counts))


def cost_report(model: SearchableModel, archs, image_shape: tuple, num_classes: int) -> dict:
  """What evaluators report of a population ``archs`` (jittable): ``params`` and ``flops``
  (``model.cost``), and ``latency`` where the model has a latency model; the keys
  ``pareto.OBJECTIVES`` reads."""
  params, flops = jax.vmap(lambda a: model.cost(a, tuple(image_shape), num_classes))(archs)
  out = {"params": params, "flops": flops}
  if model.latency is not None:
    out["latency"] = jax.vmap(lambda a: model.latency(a, tuple(image_shape)))(archs)
  return out


@functools.lru_cache(maxsize=64)
def head_width(model: SearchableModel, image_shape: tuple) -> int:
  """The number of logits ``model``'s network gives per image of ``image_shape`` (traced
  abstractly: nothing is computed)."""
  space, net = model.space, model.network(None)
  arch = space.from_vector(jnp.zeros(space.num_decisions, jnp.int32))
  images = jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32)
  logits = jax.eval_shape(
      lambda key, x: net.apply(model.init(net, key, x, arch), x, arch, train=False),
      jax.random.PRNGKey(0), images)
  return int(logits.shape[-1])


def check_head(model: SearchableModel, image_shape: tuple, num_classes: int,
               dataset: str = "the dataset") -> None:
  """ValueError (one line) where ``model``'s network does not give one logit per class of
  ``dataset`` for its images (a head of the wrong width would train on out-of-range labels
  and every loss would be NaN)."""
  width = head_width(model, tuple(int(d) for d in image_shape))
  if width != num_classes:
    raise ValueError(f"model {model.name}: its network gives {width} logits per "
                     f"{'x'.join(map(str, image_shape))} image, "
                     f"but {dataset} has {num_classes} classes")


def searchable(module: nn.Module, space: Space, *, name: str | None = None,
               cost: Callable | None = None, work: Callable | None = None,
               latency: Callable | None = None) -> SearchableModel:
  """The ``SearchableModel`` of a user's flax ``module`` over a declared ``space``.

  ``module(images, arch, train=False)`` is written with ``jaxnas.nn`` blocks and reads
  ``arch`` as ``space.from_vector`` builds it; called with Python numbers at the leaves
  it builds the specialised network, whose variables ``jaxnas.nn.extract`` slices from
  the elastic ones. Its DARTS supernet (``supernet``) is the module on
  ``space.relax``'s architecture: every decision a softmax-weighted ``Mixture``, so DARTS
  and GDAS search op choices, widths, kernels and depths alike (FBNetV2's masks, Wan et
  al. 2020, for the elastic ones). ``cost`` (jittable ``(arch, image_shape, num_classes)
  -> (params, flops)``) defaults to measuring the specialised network on the host: exact
  parameter count, and the multiply-accumulates of its conv and dense layers
  (``layer_macs``), cached per architecture. ``latency`` (jittable ``(arch, image_shape)
  -> float32`` ms of one image, ``SearchableModel.latency``; e.g. a lookup table measured on
  the user's device, ``jaxnas.models.latency``) makes ``latency`` an objective; None: none.
  """

  # Host computations (also when called while a program is traced).
  def static(arch):
    with jax.ensure_compile_time_eval():
      return tuple(int(v) for v in np.asarray(space.canonical(
          space.to_vector(jax.tree.map(np.asarray, arch)))))

  def arrays(s):
    with jax.ensure_compile_time_eval():
      return jax.tree.map(np.asarray, space.from_vector(np.asarray(s, np.int32)))

  def call_arch(s):
    return to_python(arrays(s))

  def init(net, key, images, arch):
    return dict(flax.core.unfreeze(net.init(key, images, arch, train=False)))

  def specialise_variables(variables, s, images):
    return extract(variables, specialised_shapes(module, images, call_arch(s), train=False))

  def supernet(remat=False, execution=None):
    del execution  # the user's module fixes its own implementations
    if space.relax is None:
      raise ValueError(f"the {space.name} space cannot be relaxed (declare it with "
                       f"jaxnas.declare) so DARTS/GDAS cannot search it")
    cls = nn.remat(_Relaxed, static_argnums=(3,)) if remat else _Relaxed
    cards = space.cardinalities

    def derive(alpha):
      vector = jnp.stack([jnp.argmax(a, -1) for a in alpha], -1).astype(jnp.int32)
      return space.from_vector(space.canonical(vector))

    def weights_of(arch):
      vector = space.to_vector(arch)
      return [jax.nn.one_hot(vector[..., d], k, dtype=jnp.float32) for d, k in enumerate(cards)]

    return SuperNet(space, cls(module, space.relax), [(k,) for k in cards], None, derive,
                    lambda arch: jnp.int32(0), weights_of)

  @functools.lru_cache(maxsize=4096)
  def _measure(s, image_shape):
    images = jax.ShapeDtypeStruct((1,) + image_shape, jnp.float32)
    arch = call_arch(s)
    return (count_params(specialised_shapes(module, images, arch, train=False)),
            layer_macs(module, images, arch))

  def measured_cost(arch, image_shape, num_classes):
    del num_classes  # the user's module fixes its head

    def host(vector):
      return np.asarray(_measure(tuple(int(v) for v in np.asarray(vector)), tuple(image_shape)),
                        np.int32)

    vector = space.canonical(space.to_vector(arch))
    out = jax.pure_callback(host, jax.ShapeDtypeStruct((2,), jnp.int32), vector,
                            vmap_method="sequential")
    return out[0], out[1]

  return SearchableModel(
      name=name or space.name, space=space, network=lambda s: module, static=static,
      arrays=arrays, call_arch=call_arch, init=init,
      specialise_variables=specialise_variables, cost=cost or measured_cost, work=work,
      supernet=supernet, latency=latency)


class _Relaxed(nn.Module):
  """A user's module run on the relaxed architecture: every choice a ``Mixture`` of its
  candidates weighted by ``weights`` (one float vector per decision), DARTS's supernet."""
  module: nn.Module
  relax: Callable

  def __call__(self, images, weights, train=False):
    return self.module(images, self.relax(weights), train=train)
