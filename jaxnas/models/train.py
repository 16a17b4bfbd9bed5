"""Short real training of a population of NAS-Bench-201 networks.

``make_train(config)`` returns ``train(arch, init_key, data_key, data)``, one
candidate's whole run (init, ``lax.scan`` over SGD steps, validation) as a pure
function with the architecture as data (purejaxrl's ``make_train``).
``train_population`` runs it over a population with one of the execution plans:

* ``"map"``: ``lax.map`` over members inside one jitted program. The op index
  is unbatched inside the body, so ``op_impl="switch"`` is a real conditional
  and each member pays only for its own ops. One compilation for any cells.
  With several local devices (``jax_num_cpu_devices``: one single-threaded
  CPU device per core) the population is sharded over them with
  ``shard_map``, padded to a multiple of the device count.
* ``"vmap"``: ``vmap`` over members in one program; convs become grouped convs
  and a data-dependent op must compute every candidate op (select/one-hot).
* ``"sequential"``: a Python loop over members calling the same jitted
  ``train`` (arch as data, compiled once); dispatch per member.
* ``"sequential_static"``: the classic baseline, one specialised network per
  architecture, compiled per distinct cell (only its ops, nothing selected).

All members see the same minibatch sequence (common random numbers: one
``data_key``), and different initialisations. A member whose loss or gradient
norm becomes non-finite stops updating and scores NaN; members never share a
reduction (BN statistics are per member), so a failure cannot leak.

Training follows NAS-Bench-201's recipe (Dong & Yang 2020): SGD with Nesterov
momentum 0.9, weight decay 5e-4 (coupled, as PyTorch's SGD), cosine learning
rate from 0.1, cross-entropy, BatchNorm in training mode.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from jaxnas.datasets.loaders import make_preprocess
from jaxnas.models import darts_net, nb201_net
from jaxnas.models.darts_net import DartsNetwork, fixed_genotype
from jaxnas.models.nb201_net import NB201Network, OP_IMPLS
from jaxnas.models.remat import fan_in_uniform
from jaxnas.spaces.darts import DartsArch

PLANS = ("map", "vmap", "sequential", "sequential_static")


class TrainConfig(NamedTuple):
  """Hyperparameters of a population's short training run.

  ``plan="auto"`` and ``op_impl="auto"`` resolve per backend with ``resolve_plan``,
  ``eval_batch_size=0`` with ``eval_batch_size()`` when the program is built;
  ``map_batch`` > 1 makes ``lax.map`` vmap chunks of members.
  """
  steps: int = 50
  batch_size: int = 128
  learning_rate: float = 0.1
  momentum: float = 0.9
  nesterov: bool = True
  weight_decay: float = 5e-4
  channels: int = 16
  cells: int = 1
  num_classes: int = 10
  augment: bool = False
  eval_batch_size: int = 0  # 0: per backend (``eval_batch_size()``)
  bn_momentum: float = 0.9
  plan: str = "auto"
  op_impl: str = "auto"
  map_batch: int = 1
  space: str = "nb201"  # "darts": DartsNetwork with ``cells`` cells in all


class TrainData(NamedTuple):
  """Device-ready training data: uint8 NHWC images, int32 labels, channel mean/std (0..1)."""
  train_images: jax.Array
  train_labels: jax.Array
  val_images: jax.Array
  val_labels: jax.Array
  mean: jax.Array
  std: jax.Array


def make_data(train_images, train_labels, val_images, val_labels, mean, std) -> TrainData:
  """Puts the arrays on the default device once (passed as arguments, never baked into HLO)."""
  arrays = (np.asarray(train_images, np.uint8), np.asarray(train_labels, np.int32),
            np.asarray(val_images, np.uint8), np.asarray(val_labels, np.int32),
            np.asarray(mean, np.float32), np.asarray(std, np.float32))
  if arrays[0].ndim != 4 or arrays[2].ndim != 4:
    raise ValueError(f"images must be NHWC, got {arrays[0].shape} and {arrays[2].shape}")
  return TrainData(*jax.device_put(arrays))


def resolve_plan(config: TrainConfig, backend: str | None = None) -> TrainConfig:
  """Fills ``plan``/``op_impl`` "auto" by backend, from measurements (experiments/NOTES_population.md).

  On CPU, ``map`` + ``switch`` wins: each member computes only its own ops
  (about 4x fewer conv FLOPs than computing every op for a random cell) and
  the whole population is one compilation. Accelerators prefer ``vmap`` (wide
  batched kernels) and then the cheapest all-ops form, ``kernel``.
  """
  backend = backend or jax.default_backend()
  plan = config.plan
  if plan == "auto":
    plan = "map" if backend == "cpu" else "vmap"
  if plan not in PLANS:
    raise ValueError(f"unknown plan {plan!r}; choose one of auto, {', '.join(PLANS)}")
  op_impl = config.op_impl
  if op_impl == "auto":
    op_impl = "kernel" if plan == "vmap" else "switch"
  if op_impl not in OP_IMPLS:
    raise ValueError(f"unknown op_impl {op_impl!r}; choose one of auto, {', '.join(OP_IMPLS)}")
  return config._replace(plan=plan, op_impl=op_impl)


def eval_batch_size(backend: str | None = None) -> int:
  """Validation batch size when ``TrainConfig.eval_batch_size`` is 0: 50 on CPU, 500 elsewhere.

  On XLA:CPU a member's evaluation of 1000 images (one core, the issue-3 benchmark's
  network) takes 537 ms in batches of 500, 440 in batches of 125 and ~390 in batches
  of 20-50: a first-stage activation of 500 images is 26 MB, out of cache.
  Accelerators want wide batches.
  """
  return 50 if (backend or jax.default_backend()) == "cpu" else 500


def make_network(config: TrainConfig, fixed_arch=None):
  """The network trained under ``config`` (``fixed_arch``: the specialised one)."""
  if config.space == "darts":
    return DartsNetwork(channels=config.channels, layers=config.cells,
                        num_classes=config.num_classes, cell="discrete", fixed_arch=fixed_arch,
                        bn_momentum=config.bn_momentum)
  return NB201Network(channels=config.channels, cells=config.cells,
                      num_classes=config.num_classes,
                      op_impl=config.op_impl if config.op_impl != "auto" else "switch",
                      fixed_arch=fixed_arch, bn_momentum=config.bn_momentum)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """SGD (Nesterov) momentum with coupled weight decay and cosine LR, as NAS-Bench-201."""
  schedule = optax.cosine_decay_schedule(config.learning_rate, max(config.steps, 1))
  return optax.chain(optax.add_decayed_weights(config.weight_decay),
                     optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))


def _all_finite(tree):
  return jnp.all(jnp.isfinite(ravel_pytree(tree)[0]))


# Leaves of the networks' variables that flax initialises to a constant, by (collection, name).
_CONSTANT_LEAVES = {("params", "scale"): 1.0, ("params", "bias"): 0.0,
                    ("batch_stats", "mean"): 0.0, ("batch_stats", "var"): 1.0}


def init_variables(net: nn.Module, key, *args, **kwargs):
  """``net.init(key, *args, **kwargs)``'s variables, drawn with two RNG computations.

  Same tree, shapes and distributions as flax's init of this package's networks
  (NB201 and DARTS space): every conv kernel (a 4-D param, ``conv_init``)
  U(-1/sqrt(fan_in), 1/sqrt(fan_in)) from one uniform draw
  (``remat.fan_in_uniform``), the classifier's kernel ``lecun_normal`` (flax
  ``Dense``'s default), BatchNorm's scale/bias and statistics their constants.
  The values differ from ``net.init``'s: flax derives a key and runs a threefry
  loop per parameter, which in the issue-3 benchmark's population program
  (44 kernels per member) took 4-8 s of its 13-20 s XLA:CPU compile
  (BUILD_NOTES.md). A leaf of another kind is an error, not a silent guess.
  """
  shapes = jax.eval_shape(lambda k: net.init(k, *args, **kwargs), jax.random.PRNGKey(0))
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes))
  convs = {p: v for p, v in flat.items() if p[0] == "params" and v.ndim == 4}
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


def _specialised_init(config: TrainConfig, fixed_arch, key, dummy):
  """The arch-as-data network's ``init_variables`` pruned to ``fixed_arch``'s network."""
  darts = config.space == "darts"
  arch = (DartsArch(*(np.asarray(a, np.int32) for a in fixed_arch)) if darts else
          np.asarray(fixed_arch, np.int32))
  variables = init_variables(make_network(config), key, dummy, arch, train=False)
  if darts:
    return darts_net.specialise_variables(variables, arch, config.cells)
  return nb201_net.specialise_variables(variables, fixed_arch)


class TrainParts(NamedTuple):
  """One candidate's training in resumable pieces (``make_train`` composes them).

  ``init(arch, init_key, data) -> carry``; ``run(carry, arch, data_key, data,
  first, length, lr_scale=1.0) -> (carry, losses)`` takes steps ``first ..
  first + length - 1`` (``length`` static; step ``t``'s minibatch and
  augmentation come from ``fold_in(data_key, t)``, so any cut into chunks
  trains exactly as one scan); ``evaluate(carry, arch, data) -> metrics``.
  ``carry`` is ``(params, batch_stats, opt_state, failed)``; ``opt_state`` is the
  optimizer's state for the flat parameter vector (``ravel_pytree(params)``), the form
  the step loop updates.
  """
  init: Callable
  run: Callable
  evaluate: Callable


def make_train_parts(config: TrainConfig, fixed_arch=None) -> TrainParts:
  """``make_train``'s pieces, for a host loop that checkpoints between chunks (retrain).

  The specialised network (``fixed_arch``) starts from the arch-as-data network's
  initial variables for its cell, pruned (``specialise_variables``): the two
  train the same function from the same start (plans ``map`` and
  ``sequential_static`` agree).
  """
  net = make_network(config, fixed_arch)
  tx = make_optimizer(config)
  bs, ebs = config.batch_size, config.eval_batch_size or eval_batch_size()

  def init(arch, init_key, data: TrainData):
    dummy = jnp.zeros((1,) + data.train_images.shape[1:], jnp.float32)
    if fixed_arch is None:
      variables = init_variables(net, init_key, dummy, arch, train=False)
    else:
      variables = _specialised_init(config, fixed_arch, init_key, dummy)
    params, stats = variables["params"], variables["batch_stats"]
    return (params, stats, tx.init(ravel_pytree(params)[0]), jnp.asarray(False))

  def run(carry, arch, data_key, data: TrainData, first, length: int, lr_scale=1.0):
    preprocess = make_preprocess(data.mean, data.std, augment=config.augment)
    n_train = data.train_labels.shape[0]

    def loss_fn(p, s, x, y):
      logits, new = net.apply({"params": p, "batch_stats": s}, x, arch, train=True,
                              mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, new["batch_stats"]

    params, stats, opt_state, failed = carry
    flat_params, unravel_params = ravel_pytree(params)
    flat_stats, unravel_stats = ravel_pytree(stats)

    def step(flat_carry, t):
      # Parameters, BN statistics and momentum live in flat vectors across steps, so the
      # update, the finiteness check and the NaN freeze are one fused kernel each rather
      # than one per leaf (129 params and 84 statistics in the issue-3 benchmark's network,
      # ~700 tiny kernels a step and a fifth of the program's fusions). Elementwise, the
      # same float operations as optax on the tree: a short test run trained bitwise the
      # same parameters; BN running statistics moved by an ulp (another fusion).
      flat_p, flat_s, opt_state, failed = flat_carry
      params, stats = unravel_params(flat_p), unravel_stats(flat_s)
      k_idx, k_aug = jax.random.split(jax.random.fold_in(data_key, t))
      idx = jax.random.randint(k_idx, (bs,), 0, n_train)
      x = preprocess(k_aug, data.train_images[idx])
      y = data.train_labels[idx]
      (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y)
      grads = ravel_pytree(grads)[0]
      updates, new_opt = tx.update(grads, opt_state, flat_p)
      # SGD's update is linear in the learning rate, so scaling it scales the LR.
      new_p = optax.apply_updates(flat_p, updates * lr_scale)
      # A diverged member freezes at its last finite state and is scored NaN.
      failed = failed | ~jnp.isfinite(loss) | ~jnp.isfinite(jnp.sum(grads * grads))
      keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(failed, b, a), new,
                                                     old)
      flat_carry = (keep(new_p, flat_p), keep(ravel_pytree(new_stats)[0], flat_s),
                    keep(new_opt, opt_state), failed)
      return flat_carry, loss

    (flat_params, flat_stats, opt_state, failed), losses = jax.lax.scan(
        step, (flat_params, flat_stats, opt_state, failed), first + jnp.arange(length))
    return (unravel_params(flat_params), unravel_stats(flat_stats), opt_state, failed), losses

  def evaluate(carry, arch, data: TrainData):
    """Validation accuracy with running BN statistics, in fixed-size batches (last one masked)."""
    params, stats, _, failed = carry
    eval_preprocess = make_preprocess(data.mean, data.std, augment=False)
    n_val = data.val_labels.shape[0]
    nb = -(-n_val // ebs)
    pad = nb * ebs - n_val
    vx = jnp.pad(data.val_images, ((0, pad), (0, 0), (0, 0), (0, 0))).reshape(
        (nb, ebs) + data.val_images.shape[1:])
    vy = jnp.pad(data.val_labels, (0, pad), constant_values=-1).reshape(nb, ebs)

    def eval_batch(xy):
      x, y = xy
      logits = net.apply({"params": params, "batch_stats": stats}, eval_preprocess(None, x), arch,
                         train=False)
      return jnp.sum(jnp.argmax(logits, -1) == y)

    correct = jnp.sum(jax.lax.map(eval_batch, (vx, vy)))
    acc = correct / n_val
    failed = failed | ~_all_finite(params)
    return {"val_accuracy": jnp.where(failed, jnp.nan, acc), "failed": failed,
            "variables": {"params": params, "batch_stats": stats}}

  return TrainParts(init, run, evaluate)


def make_train(config: TrainConfig, fixed_arch=None, return_variables: bool = False):
  """``train(arch, init_key, data_key, data, lr_scale=1.0) -> metrics`` for one candidate.

  ``metrics`` holds ``val_accuracy`` (fraction, NaN if failed), ``failed``
  (bool), ``final_loss`` and ``losses`` (float32[steps]). ``lr_scale``
  multiplies this member's learning rate. With ``fixed_arch`` the specialised
  network is trained and ``arch`` is ignored. With ``return_variables`` the
  metrics also hold the trained ``variables`` (params and BN statistics), for
  retraining and export.
  """
  parts = make_train_parts(config, fixed_arch)

  def train(arch, init_key, data_key, data: TrainData, lr_scale=1.0):
    carry = parts.init(arch, init_key, data)
    carry, losses = parts.run(carry, arch, data_key, data, 0, config.steps, lr_scale)
    metrics = parts.evaluate(carry, arch, data)
    if not return_variables:
      del metrics["variables"]
    return {**metrics, "final_loss": losses[-1], "losses": losses}

  return train


# XLA:CPU compiles the population programs with LLVM at -O1 instead of -O3: measured on
# the issue-3 benchmark program (16 members x 50 steps, one core) compilation takes
# 25 s instead of 35 s and training is no slower (its time is in library convs and in
# kernels that XLA vectorises itself; end to end 147-151 s vs 160-161 s); -O0 is 4x
# slower to run (experiments/NOTES_population.md, round 4). An
# ``xla_backend_optimization_level`` in XLA_FLAGS takes precedence.
CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


def compiler_options(space: str = "nb201") -> dict | None:
  """XLA options for the population programs of ``space`` on the default backend (None:
  XLA's): ``CPU_COMPILER_OPTIONS`` on CPU, and for the DARTS space
  ``darts_net.compiler_options()`` (Triton GEMMs off on GPU)."""
  options = {}
  if (jax.default_backend() == "cpu" and
      "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "")):
    options.update(CPU_COMPILER_OPTIONS)
  options.update(darts_net.compiler_options(space) or {})
  return options or None


@functools.lru_cache(maxsize=64)
def _compiled(config: TrainConfig, plan: str, fixed_arch=None):
  train = make_train(config, fixed_arch)
  jit = functools.partial(jax.jit, compiler_options=compiler_options(config.space))
  if plan == "vmap":
    return jit(jax.vmap(train, in_axes=(0, 0, None, None, 0)))
  if plan == "map":
    batch = config.map_batch if config.map_batch > 1 else None

    def run(archs, keys, data_key, data, lr_scales):
      return jax.lax.map(lambda a: train(a[0], a[1], data_key, data, a[2]),
                         (archs, keys, lr_scales), batch_size=batch)

    devices = jax.local_devices()
    if len(devices) == 1:
      return jit(run)
    # Several local devices (e.g. CPU cores exposed with ``jax_num_cpu_devices``):
    # each runs its own slice of the population, concurrently.
    mesh = jax.sharding.Mesh(np.asarray(devices), ("pop",))
    pop, rep = jax.sharding.PartitionSpec("pop"), jax.sharding.PartitionSpec()
    return jit(jax.shard_map(run, mesh=mesh, in_specs=(pop, pop, rep, rep, pop),
                             out_specs=pop, check_vma=False))
  return jit(train)


def _population(archs, config: TrainConfig):
  """``archs`` as a batched architecture pytree of int32 arrays, and its size ``P``."""
  if config.space == "darts":
    archs = jax.tree.map(lambda a: jnp.asarray(a, jnp.int32), archs)
    sizes = {a.shape[0] if a.ndim == 2 and a.shape[1] == 8 else None
             for a in jax.tree.leaves(archs)}
    if not isinstance(archs, DartsArch) or len(sizes) != 1 or None in sizes:
      raise ValueError("archs must be a DartsArch of int32[P, 8] arrays")
    return archs, sizes.pop()
  archs = jnp.asarray(archs, jnp.int32)
  if archs.ndim != 2 or archs.shape[1] != 6:
    raise ValueError(f"archs must be int32[P, 6], got shape {archs.shape}")
  return archs, archs.shape[0]


def _fixed_arch(arch, config: TrainConfig):
  """The hashable ``fixed_arch`` of one member (the specialised network's cell)."""
  if config.space == "darts":
    return fixed_genotype(arch)
  return tuple(int(o) for o in np.asarray(arch))


# Relative training time of one cell edge per op (none, skip, 1x1, 3x3, pool) under the
# CPU "map" plan: CPU time per step of a population of one all-<op> cell, minus the
# all-none cell's, per edge (experiments/NOTES_population.md, round 3, item 12).
OP_TIME = (0.0, 0.1, 1.0, 1.8, 0.6)


def _op_time(archs, config: TrainConfig) -> np.ndarray:
  """``float[P]``: estimated relative training time of each member's ops (0 if unknown)."""
  if config.space == "darts":
    return np.zeros(jax.tree.leaves(archs)[0].shape[0])
  return np.asarray(OP_TIME)[np.asarray(archs)].sum(1)


def balanced_order(work, devices: int) -> np.ndarray:
  """A permutation of the members (``len(work)``, a multiple of ``devices``) whose
  ``devices`` consecutive equal blocks have about equal total work: heaviest first, each
  to the least loaded device with room (greedy LPT). Ties keep the input order."""
  work = np.asarray(work, np.float64)
  per = len(work) // devices
  load, blocks = np.zeros(devices), [[] for _ in range(devices)]
  for i in np.argsort(-work, kind="stable"):
    d = min((d for d in range(devices) if len(blocks[d]) < per), key=lambda d: (load[d], d))
    blocks[d].append(i)
    load[d] += work[i]
  return np.asarray([i for b in blocks for i in sorted(b)], np.int64)


def device_layout(archs, config: TrainConfig, devices: int):
  """``(order, back)``: ``order`` (``int[P + pad]``) lists the members as ``devices`` equal
  consecutive blocks of about equal work, padded with copies of member 0 to a multiple of
  ``devices``; ``back`` (``int[P]``) finds each member's result in that order."""
  size = jax.tree.leaves(archs)[0].shape[0]
  idx = np.concatenate([np.arange(size), np.zeros(-size % devices, np.int64)])
  order = idx[balanced_order(_op_time(archs, config)[idx], devices)]
  back = np.unique(order, return_index=True)[1]  # first position of each member
  return order, back


def train_population_metrics(archs, key, data: TrainData, config: TrainConfig = TrainConfig(),
                             lr_scales=None):
  """Trains every member of ``archs`` and returns stacked per-member metrics.

  ``archs`` is the space's batched architecture pytree: ``int32[P, 6]`` for
  NAS-Bench-201, a ``DartsArch`` of ``int32[P, 8]`` for ``config.space="darts"``.
  ``lr_scales`` (``float32[P]``, default ones) multiplies each member's learning rate.
  """
  config = resolve_plan(config)
  archs, size = _population(archs, config)
  data_key, init_key = jax.random.split(key)
  keys = jax.random.split(init_key, size)
  scales = jnp.ones(size, jnp.float32) if lr_scales is None else jnp.asarray(
      lr_scales, jnp.float32)
  devices = jax.local_device_count()
  if config.plan == "map" and devices > 1:
    # Shard evenly: pad with copies of the first member (results dropped), and give each
    # device a block of about equal work (members are independent, so where one trains
    # changes nothing in its result).
    order, back = device_layout(archs, config, devices)
    take = lambda t: jax.tree.map(lambda a: a[order], t)
    out = _compiled(config, "map")(take(archs), take(keys), data_key, data, take(scales))
    return jax.tree_util.tree_map(lambda a: a[back], out)
  if config.plan in ("vmap", "map"):
    return _compiled(config, config.plan)(archs, keys, data_key, data, scales)
  outs = []
  for p in range(size):
    arch = jax.tree.map(lambda a: a[p], archs)
    if config.plan == "sequential":
      outs.append(_compiled(config, "sequential")(arch, keys[p], data_key, data, scales[p]))
    else:
      outs.append(_compiled(config, "sequential_static", _fixed_arch(arch, config))(
          arch, keys[p], data_key, data, scales[p]))
  return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *outs)


def train_population(archs, key, data: TrainData, config: TrainConfig = TrainConfig(),
                     lr_scales=None):
  """Validation accuracy ``float32[P]`` (fraction; NaN for diverged members) of short training."""
  return train_population_metrics(archs, key, data, config, lr_scales)["val_accuracy"]
