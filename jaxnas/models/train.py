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
  architecture, compiled per distinct cell (only its ops, nothing selected); with several
  local devices each trains its share of the members, from its own host thread.

All members see the same minibatch sequence (common random numbers: one
``data_key``), and different initialisations. A member whose loss or gradient
norm becomes non-finite stops updating and scores NaN; members never share a
reduction (BN statistics are per member), so a failure cannot leak.

Training follows NAS-Bench-201's recipe (Dong & Yang 2020): SGD with Nesterov
momentum 0.9, weight decay 5e-4 (coupled, as PyTorch's SGD), cosine learning
rate from 0.1, cross-entropy, BatchNorm in training mode.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from jaxnas import distributed
from jaxnas.datasets.loaders import make_preprocess
from jaxnas.models.nb201_net import OP_IMPLS
from jaxnas.models.protocol import SearchableModel, init_variables  # noqa: F401 (re-export)
from jaxnas.models.registry import model_of
from jaxnas.ops import Execution
from jaxnas.spaces.base import Space

PLANS = ("map", "vmap", "sequential", "sequential_static")
WIDTH_IMPLS = ("mask", "switch")


class TrainConfig(NamedTuple):
  """Hyperparameters of a population's short training run.

  ``plan="auto"``, ``op_impl="auto"`` and ``execution``'s "auto" fields (the conv and
  pool implementations, ``jaxnas.ops.Execution``) resolve per backend with
  ``resolve_plan``, ``eval_batch_size=0`` with ``eval_batch_size()`` when the program is
  built; ``map_batch`` > 1 makes ``lax.map`` vmap chunks of members.
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
  space: str = "nb201"  # a built-in model (``registry.MODELS``) when ``model`` is None
  model: SearchableModel | None = None  # a user's model (``protocol.searchable``)
  execution: Execution = Execution()
  # Cells that repeat (NB201's ``cells`` per stage) as one ``nn.scan`` over stacked
  # variables (``nb201_net.NB201Network``): compile time nearly independent of ``cells``,
  # but on CPU each step is slower than unrolled (BUILD_NOTES.md), so off by default.
  scan_cells: bool = False
  # How a model's traced widths run where members run one at a time (``plan`` "map" /
  # "sequential"): "mask" computes the widest network with the inactive channels zeroed;
  # "switch" one specialised branch per width combination (``jnn.specialised_switch``),
  # only the member's own widths, for much longer compiles (BUILD_NOTES.md). Models without
  # width choices ignore it.
  width_impl: str = "mask"


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
  batched kernels) and then the cheapest all-ops form, ``kernel``. ``execution`` resolves
  with ``Execution.resolve`` (the backend's conv and pool defaults).
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
  if config.width_impl not in WIDTH_IMPLS:
    raise ValueError(f"unknown width_impl {config.width_impl!r}; choose one of "
                     f"{', '.join(WIDTH_IMPLS)}")
  return config._replace(plan=plan, op_impl=op_impl,
                         execution=config.execution.resolve(backend))


def eval_batch_size(backend: str | None = None) -> int:
  """Validation batch size when ``TrainConfig.eval_batch_size`` is 0: 50 on CPU, 500 elsewhere.

  On XLA:CPU a member's evaluation of 1000 images (one core, the issue-3 benchmark's
  network) takes 537 ms in batches of 500, 440 in batches of 125 and ~390 in batches
  of 20-50: a first-stage activation of 500 images is 26 MB, out of cache.
  Accelerators want wide batches.
  """
  return 50 if (backend or jax.default_backend()) == "cpu" else 500


def make_network(config: TrainConfig, fixed_arch=None):
  """The network trained under ``config`` (``fixed_arch``: the specialised one, a
  ``SearchableModel.static`` key)."""
  return model_of(config).network(fixed_arch)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
  """SGD (Nesterov) momentum with coupled weight decay and cosine LR, as NAS-Bench-201."""
  schedule = optax.cosine_decay_schedule(config.learning_rate, max(config.steps, 1))
  return optax.chain(optax.add_decayed_weights(config.weight_decay),
                     optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))


def flat_weights(params, stats):
  """``(flat_params, flat_stats, unravel)``: a network's weights and BN statistics as one
  vector each (``ravel_pytree``), and ``unravel(flat_params, flat_stats) -> (params,
  stats)``, which restores the pytrees bit for bit.

  The form training loops carry: XLA's loop passes (copy insertion first) take time per
  carried array, and an update or a select on one vector is one fused kernel where on the
  trees it is one per array (a supernet has hundreds)."""
  flat_p, unravel_p = ravel_pytree(params)
  flat_s, unravel_s = ravel_pytree(stats)
  return flat_p, flat_s, lambda p, s: (unravel_p(p), unravel_s(s))


def _all_finite(tree):
  return jnp.all(jnp.isfinite(ravel_pytree(tree)[0]))


def _specialised_init(config: TrainConfig, fixed_arch, key, dummy):
  """The arch-as-data network's initial variables cut to ``fixed_arch``'s network."""
  model = model_of(config)
  variables = model.init(model.network(None), key, dummy, model.arrays(fixed_arch))
  return model.specialise_variables(variables, fixed_arch, dummy)


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
  model = model_of(config)
  net = model.network(fixed_arch)
  # The specialised network gets its architecture as constants (``call_arch``).
  fixed_call = None if fixed_arch is None else model.call_arch(fixed_arch)
  tx = make_optimizer(config)
  bs, ebs = config.batch_size, config.eval_batch_size or eval_batch_size()

  def init(arch, init_key, data: TrainData):
    dummy = jnp.zeros((1,) + data.train_images.shape[1:], jnp.float32)
    if fixed_arch is None:
      variables = model.init(net, init_key, dummy, arch)
    else:
      variables = _specialised_init(config, fixed_arch, init_key, dummy)
    params, stats = variables["params"], variables.get("batch_stats", {})
    return (params, stats, tx.init(ravel_pytree(params)[0]), jnp.asarray(False))

  def run(carry, arch, data_key, data: TrainData, first, length: int, lr_scale=1.0):
    preprocess = make_preprocess(data.mean, data.std, augment=config.augment)
    n_train = data.train_labels.shape[0]

    def loss_fn(p, s, x, y):
      logits, new = net.apply({"params": p, "batch_stats": s}, x,
                              arch if fixed_arch is None else fixed_call, train=True,
                              mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, new["batch_stats"]

    params, stats, opt_state, failed = carry
    flat_params, flat_stats, unravel = flat_weights(params, stats)

    def step(flat_carry, t):
      # Parameters, BN statistics and momentum live in flat vectors across steps, so the
      # update, the finiteness check and the NaN freeze are one fused kernel each rather
      # than one per leaf (129 params and 84 statistics in the issue-3 benchmark's network,
      # ~700 tiny kernels a step and a fifth of the program's fusions). Elementwise, the
      # same float operations as optax on the tree: a short test run trained bitwise the
      # same parameters; BN running statistics moved by an ulp (another fusion).
      flat_p, flat_s, opt_state, failed = flat_carry
      params, stats = unravel(flat_p, flat_s)
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
    return (*unravel(flat_params, flat_stats), opt_state, failed), losses

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

    flat_p, flat_s, unravel = flat_weights(params, stats)

    def eval_batch(xy):
      x, y = xy
      p, s = unravel(flat_p, flat_s)
      logits = net.apply({"params": p, "batch_stats": s}, eval_preprocess(None, x),
                         arch if fixed_arch is None else fixed_call, train=False)
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


def backend_options() -> dict:
  """The XLA options of every training program on the default backend, whatever the model:
  ``CPU_COMPILER_OPTIONS`` on CPU (unless XLA_FLAGS sets the level), none elsewhere."""
  if (jax.default_backend() == "cpu" and
      "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "")):
    return dict(CPU_COMPILER_OPTIONS)
  return {}


def compiler_options(model: SearchableModel | str = "nb201") -> dict | None:
  """XLA options for the population programs of ``model`` (or a built-in space's name) on
  the default backend (None: XLA's): ``backend_options()``, and the model's own (the DARTS
  space: Triton GEMMs off on GPU)."""
  if isinstance(model, str):
    model = model_of(TrainConfig(space=model))
  return {**backend_options(), **(model.compiler_options() or {})} or None


@functools.lru_cache(maxsize=64)
def _compiled(config: TrainConfig, plan: str, fixed_arch=None):
  train = make_train(config, fixed_arch)
  jit = functools.partial(jax.jit, compiler_options=compiler_options(model_of(config)))
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
    mesh = distributed.mesh("pop", devices)
    pop, rep = jax.sharding.PartitionSpec("pop"), jax.sharding.PartitionSpec()
    return jit(jax.shard_map(run, mesh=mesh, in_specs=(pop, pop, rep, rep, pop),
                             out_specs=pop, check_vma=False))
  return jit(train)


def population(archs, space: Space):
  """``archs`` as a batched architecture pytree of ``space`` (every leaf a ``[P, ...]``
  array of the member's leaf shape, cast to its dtype), and its size ``P``."""
  member = jax.tree.map(np.asarray, space.from_vector(np.zeros(space.num_decisions, np.int32)))
  try:
    leaves = jax.tree.leaves(archs)
    same = jax.tree.structure(archs) == jax.tree.structure(member)
  except Exception:  # not a pytree of this structure
    same = False
  if same:
    archs = jax.tree.map(lambda a, m: jnp.asarray(a, m.dtype), archs, member)
    leaves = jax.tree.leaves(archs)
    ok = all(a.ndim == m.ndim + 1 and a.shape[1:] == m.shape
             for a, m in zip(leaves, jax.tree.leaves(member)))
    sizes = {a.shape[0] for a in leaves}
    if ok and len(sizes) == 1:
      return archs, sizes.pop()
  want = jax.tree.map(lambda m: f"{m.dtype}[P, {', '.join(map(str, m.shape))}]".replace(
      ", ]", "]"), member)
  got = jax.tree.map(lambda a: tuple(np.shape(a)), archs)
  raise ValueError(f"archs must be a population of {space.name} architectures, {want}; "
                   f"got shapes {got}")


def _population(archs, config: TrainConfig):
  return population(archs, model_of(config).space)


def _op_time(archs, config: TrainConfig) -> np.ndarray:
  """``float[P]``: estimated relative training time of each member (0 if unknown)."""
  work = model_of(config).work
  if work is None:
    return np.zeros(jax.tree.leaves(archs)[0].shape[0])
  return np.asarray(work(jax.tree.map(np.asarray, archs)), np.float64)


def device_shares(work, devices: int, per: int | None = None) -> list[list[int]]:
  """Members (``len(work)``) dealt to ``devices`` shares of about equal total work: heaviest
  first, each to the least loaded device with room (greedy LPT; ``per``: at most that many
  members a device, else no limit), among equal loads the one with fewest members (unknown
  work, all zeros, deals round robin). Ties keep the input order; each share is sorted."""
  work = np.asarray(work, np.float64)
  load, shares = np.zeros(devices), [[] for _ in range(devices)]
  for i in np.argsort(-work, kind="stable"):
    d = min((d for d in range(devices) if per is None or len(shares[d]) < per),
            key=lambda d: (load[d], len(shares[d]), d))
    shares[d].append(int(i))
    load[d] += work[i]
  return [sorted(s) for s in shares]


def balanced_order(work, devices: int) -> np.ndarray:
  """A permutation of the members (``len(work)``, a multiple of ``devices``) whose
  ``devices`` consecutive equal blocks have about equal total work (``device_shares``)."""
  shares = device_shares(work, devices, per=len(work) // devices)
  return np.asarray([i for s in shares for i in s], np.int64)


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

  ``archs`` is the model's batched architecture pytree (``population``): ``int32[P, 6]``
  for NAS-Bench-201, a ``DartsArch`` of ``int32[P, 8]`` for ``config.space="darts"``, the
  declared structure for a user's model (``config.model``).
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
  return _train_members(archs, keys, data_key, data, scales, config)


def _train_members(archs, keys, data_key, data: TrainData, scales, config: TrainConfig):
  """Plans ``sequential`` and ``sequential_static``: members one at a time, per device.

  ``sequential_static`` compiles a program per member anyway, so with several local
  devices (one CPU device per core) each trains its own share of the members
  (``device_shares`` of their estimated work; the same shares every call, so a member's
  program is compiled for one device), from its own host thread: while one device's thread
  traces and compiles its next member, the others train theirs (XLA compiles and runs
  outside the GIL). Where a member trains changes nothing in its result. ``sequential``
  (one arch-as-data program) runs on the first device: a program compiles for one device,
  and its point is one compile."""
  model, size = model_of(config), len(keys)
  devices = jax.local_devices()[:None if config.plan == "sequential_static" else 1]
  # What a thread needs before its next dispatch is ready on the host first: an op on a
  # device waits for the training queued there, so slicing device arrays, or the eager ops
  # of ``model.static``, would hold every thread's next compile until the first device is
  # idle (measured: the devices' compiles and trainings ran in lockstep).
  archs, keys, scales = jax.device_get((archs, keys, scales))
  member = lambda p: jax.tree.map(lambda a: a[p], archs)
  statics = ([model.static(member(p)) for p in range(size)]
             if config.plan == "sequential_static" else None)

  def program(p):
    if config.plan == "sequential":
      return _compiled(config, "sequential")
    return _compiled(config, "sequential_static", statics[p])

  def train_share(device, share):
    put = lambda tree: jax.device_put(tree, device)
    on_device = put((data_key, data))
    # Eager ops while tracing (a model's ``arrays``) run on the thread's own device, after
    # its last member, not behind another device's training.
    with jax.default_device(device):
      return {p: program(p)(*put((member(p), keys[p])), *on_device, put(scales[p]))
              for p in share}

  shares = device_shares(_op_time(archs, config), len(devices))
  if len(devices) == 1:
    outs = train_share(devices[0], shares[0])
  else:
    with concurrent.futures.ThreadPoolExecutor(len(devices)) as pool:
      outs = {}
      for done in pool.map(train_share, devices, shares):
        outs.update(done)
  first = lambda x: jax.device_put(x, devices[0])
  return jax.tree.map(lambda *xs: jnp.stack([first(x) for x in xs]),
                      *[outs[p] for p in range(size)])


def train_population(archs, key, data: TrainData, config: TrainConfig = TrainConfig(),
                     lr_scales=None):
  """Validation accuracy ``float32[P]`` (fraction; NaN for diverged members) of short training."""
  return train_population_metrics(archs, key, data, config, lr_scales)["val_accuracy"]
