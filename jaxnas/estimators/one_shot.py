"""One-shot weight sharing: a single-path supernet (SPOS) that scores any searchable model.

Single Path One-Shot (Guo et al., "Single Path One-Shot Neural Architecture
Search with Uniform Sampling", ECCV 2020): one supernet holds the weights of
every member of a space; each training step samples one member and trains only
its path. A search then scores any member with the weights it inherits from the
supernet, after re-estimating the BatchNorm statistics of that path on a few
training batches (their Sec. 3.3: the running statistics of a weight-sharing
supernet belong to no single path).

The supernet is a ``SearchableModel``'s arch-as-data network (``model.network(None)``):
the built-in model of ``config.space`` (``registry.model_of``: NAS-Bench-201 by
default) or a user's (``protocol.searchable``). Run one member at a time, its
choice blocks compute only the chosen ops (NB201's ``op_impl="switch"``, ``lax.cond``
depth), so SPOS training is plain training of that network with a fresh member
every step.

* ``make_spos(config, ..., model=None)`` gives ``init(key) -> SposState`` and
  ``run_epoch(state, data) -> (state, metrics)``, pure and jittable
  (purejaxrl style). ``SposState`` is one pytree (params, BN statistics,
  optimizer state, key, step), so a checkpoint restores training bit-exactly.
  Step ``t`` trains on minibatch ``t mod E`` of epoch ``t div E``'s permutation
  (``E`` steps per epoch) the members of ``config.sampling``: ``"uniform"`` (SPOS)
  the member ``space.sample(fold_in(k_arch, t))``; ``"sandwich"`` (BigNAS, Yu et
  al. 2020; the largest/smallest idea of Once-for-All's progressive shrinking, Cai
  et al. 2020) the largest member, the smallest and that uniform one, their
  gradients summed into one optimizer step (no in-place distillation).
  Parameters that none of a step's members uses (that their specialised networks
  do not have, ``model.specialise_variables``) are left exactly as they are (no
  weight decay, no momentum step), as PyTorch's SGD leaves parameters without a
  gradient; the optimizer is ``models.make_optimizer``'s (NAS-Bench-201's SGD
  recipe), its cosine schedule spanning all steps.
* ``make_scorer(config, ..., model=None)`` gives the batched score of a population
  with inherited weights: per member (its canonical vector: two vectors of one
  network score the same), BN statistics recalibrated as the exact average of the
  batch statistics of ``bn_batches`` fixed training batches (train-mode forwards;
  PyTorch's ``momentum=None``), then accuracy (%) on the fixed validation subset in
  eval mode. ``lax.map`` over members on CPU (a real conditional: each runs only its
  ops), ``vmap`` on accelerators (for NB201 ``op_impl="kernel"``: one grouped conv
  per edge), as ``models.resolve_plan``.
* ``supernet_evaluator(config, workdir, model=None)`` trains (or resumes, or loads)
  the supernet, checkpointing to ``workdir/supernet`` after every epoch, and wraps
  the scorer in the ``Evaluator`` protocol: ``--evaluator=supernet``.

Over several devices (``mesh``: a 1-D mesh over the local devices, or over those of
all processes, ``jaxnas.distributed``) training is data-parallel as DARTS' steps are
(``strategies.darts.make_darts``): each step's minibatch is split over the devices,
the state replicated, and XLA's SPMD partitioner all-reduces the gradients and BN's
batch moments, so every step is the single-device step's maths (BN synchronised) up
to float summation order. Scoring shards the members over the devices
(``shard_map``, as ``models.sharded``); each device scores its members as one
device scores them all.

"Largest" and "smallest" are the canonical vectors of every decision's last and
first candidate: a space meant for sandwich sampling declares its candidates in
increasing size (widths, kernels, depths; ``jaxnas.declare({"width": choice(4, 8)})``).
NAS-Bench-201's ops have no such order (its "largest" is the all-pool cell, its
smallest the empty one): use uniform sampling there.

Data are the training evaluator's (``training.search_split``): the same fixed
search-train/validation split and subsets, so supernet scores and stand-alone
proxy training are measured on the same examples. A score is a fixed function
of the network (no key, no dependence on the rest of the population), like a
table lookup. One supernet serves all seeds of a search (``supernet_seed``).
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxnas import distributed, host_loop
from jaxnas.checkpoint import Checkpointer
from jaxnas.datasets import default_augment, make_preprocess
from jaxnas.estimators.base import Evaluator
from jaxnas.estimators.training import ProxySpec, search_split, validate_spec
from jaxnas.models import TrainConfig, TrainData, make_optimizer, resolve_plan
from jaxnas.models.protocol import SearchableModel, check_head, cost_report
from jaxnas.models.registry import BUILTINS, model_of
from jaxnas.ops import Execution
from jaxnas.spaces.base import Space

SUPERNET_PLANS = ("auto", "map", "vmap")
SAMPLINGS = ("uniform", "sandwich")
_EVAL_BATCH = 500
# ``init`` runs once per process, and XLA's optimising passes made its compile 7x
# longer (19 s vs 2.9 s, C=4 N=1 on the 2-core CPU): it is always compiled without them.
_INIT_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class SupernetConfig(NamedTuple):
  """The supernet and how it scores members (the CLI's proxy flags where they mean the same).

  epochs: SPOS training passes over the proxy training subset (fractions allowed).
  space: the built-in model (``registry.BUILTINS``) trained when no ``model`` is given.
  bn_batches: training batches (of ``batch_size``) whose exact average batch
    statistics replace every scored member's BN statistics; 0 scores with the
    supernet's running statistics (stale: a baseline, not recommended).
  supernet_seed: the supernet's initialisation and path/minibatch sampling.
  sampling: the members each training step trains, one of ``SAMPLINGS``: "uniform"
    (SPOS: one uniformly random member) or "sandwich" (BigNAS: the largest, the
    smallest and one uniformly random member; see the module docstring).
  execution: the conv and pool implementations (``jaxnas.ops.Execution``; "auto": the
    backend's defaults).
  Other fields as ``training.ProxySpec``; ``channels`` and ``cells`` shape the built-in
  models only (a user's module fixes its network).
  """
  dataset: str = "fashion_mnist"
  data_dir: str | None = None
  epochs: float = 5.0
  space: str = "nb201"
  channels: int = 16
  cells: int = 1
  batch_size: int = 128
  train_fraction: float = 0.1
  val_fraction: float = 0.1
  learning_rate: float = 0.1
  weight_decay: float = 5e-4
  augment: bool | None = None  # None: crop + flip for CIFAR, nothing for (Fashion-)MNIST
  split_seed: int = 0
  bn_batches: int = 4
  supernet_seed: int = 0
  sampling: str = "uniform"
  plan: str = "auto"
  execution: Execution = Execution()


# Fields that change how a supernet computes or scores, not which supernet is trained: a
# workdir's supernet serves them all (``trained_by``).
_NOT_TRAINED_BY = ("bn_batches", "plan", "execution")


def trained_by(config: SupernetConfig) -> dict:
  """The fields of ``config`` that decide the trained supernet (a workdir's identity):
  all but ``bn_batches`` and ``plan`` (scoring only) and ``execution`` (float rounding;
  results.json's environment records the conv implementation)."""
  return {k: v for k, v in config._asdict().items() if k not in _NOT_TRAINED_BY}


def validate_config(config: SupernetConfig, flag=str) -> SupernetConfig:
  """Checks a config at the edge (ValueError with one clear line, naming a field as
  ``flag(field)``, as in ``validate_spec``); returns it."""
  validate_spec(config, flag)
  if config.bn_batches < 0:
    raise ValueError(f"{flag('bn_batches')} must be >= 0, got {config.bn_batches}")
  if config.plan not in SUPERNET_PLANS:
    raise ValueError(f"{flag('plan')} {config.plan!r} does not apply to the supernet evaluator; "
                     f"choose one of {', '.join(SUPERNET_PLANS)}")
  if config.sampling not in SAMPLINGS:
    raise ValueError(f"{flag('sampling')} {config.sampling!r} is not a supernet sampling rule; "
                     f"choose one of {', '.join(SAMPLINGS)}")
  if config.space not in BUILTINS:
    raise ValueError(f"{flag('space')} {config.space!r} is not a built-in space; choose one of "
                     f"{', '.join(BUILTINS)}")
  return config


def proxy_spec(config: SupernetConfig) -> ProxySpec:
  """The training evaluator's spec with this config's data settings (hence the same split)."""
  return ProxySpec(**{k: getattr(config, k) for k in ProxySpec._fields if k in config._fields})


@flax.struct.dataclass
class SposState:
  """Everything SPOS training needs to continue: one pytree, checkpointed whole."""
  params: Any
  batch_stats: Any
  opt_state: Any
  key: jax.Array   # uint32[2], root of all sampling (paths, minibatches, augmentation)
  step: jax.Array  # int32, training steps done


class Spos(NamedTuple):
  """SPOS training as pure functions (``make_spos``); ``mesh``: the devices its steps are
  data-parallel over (None: one device)."""
  init: Callable[[jax.Array], SposState]
  run_epoch: Callable[[SposState, TrainData], tuple[SposState, dict]]
  network: nn.Module
  model: SearchableModel
  steps_per_epoch: int
  total_steps: int
  num_epochs: int
  mesh: Mesh | None = None


def _axis(mesh: Mesh | None) -> str | None:
  """The one axis of a 1-D ``mesh`` (None without a mesh); ValueError for another mesh."""
  if mesh is None:
    return None
  if len(mesh.axis_names) != 1:
    raise ValueError(f"the supernet is data-parallel over a 1-D mesh, got axes {mesh.axis_names}")
  return mesh.axis_names[0]


def for_mesh(config: SupernetConfig, mesh: Mesh | None) -> SupernetConfig:
  """``config`` as it computes over ``mesh`` (``Execution.partitioned``, DARTS' rule)."""
  return config._replace(execution=config.execution.partitioned(mesh))


def train_config(config: SupernetConfig, num_classes: int, num_train: int,
                 model: SearchableModel | None = None) -> TrainConfig:
  """The ``TrainConfig`` of SPOS training: ``steps`` is the whole run (the cosine schedule's
  span); one member at a time (plan "map", NB201's ``switch`` ops)."""
  steps_per_epoch = max(1, num_train // config.batch_size)
  steps = max(1, math.ceil(config.epochs * steps_per_epoch))
  augment = default_augment(config.dataset, config.augment)
  return TrainConfig(steps=steps, batch_size=config.batch_size,
                     learning_rate=config.learning_rate, weight_decay=config.weight_decay,
                     channels=config.channels, cells=config.cells, num_classes=num_classes,
                     augment=augment, plan="map", op_impl="switch", space=config.space,
                     model=model, execution=config.execution)


def supernet_model(config: SupernetConfig, num_classes: int, op_impl: str = "switch",
                   model: SearchableModel | None = None) -> SearchableModel:
  """``model``, or the built-in model of ``config.space`` built with ``op_impl`` (how its
  op choices compute: "switch" to run one member, ``resolve_plan``'s per scoring plan)."""
  return model_of(TrainConfig(channels=config.channels, cells=config.cells,
                              num_classes=num_classes, op_impl=op_impl, space=config.space,
                              model=model, execution=config.execution))


def extremes(space: Space) -> tuple[jax.Array, jax.Array]:
  """``(largest, smallest)``: the canonical vectors of every decision's last and first
  candidate (candidates declared in increasing size; module docstring)."""
  cards = np.asarray(space.cardinalities, np.int32)
  return (space.canonical(jnp.asarray(cards - 1)),
          space.canonical(jnp.zeros(len(cards), jnp.int32)))


def _leaf_keys(tree) -> list[tuple[str, ...]]:
  """The path of every leaf of ``tree``, in ``jax.tree.leaves`` order."""
  leaves = jax.tree_util.tree_flatten_with_path(flax.core.unfreeze(tree))[0]
  return [tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
          for path, _ in leaves]


class Uses(NamedTuple):
  """Which ``params`` leaves (``jax.tree.leaves`` order) a member of a space uses.

  ``used(vector) -> bool[L]``: host, for one canonical vector (a tuple), cached.
  ``rules``: per leaf ``True`` (every member uses it), ``(d, values)`` (exactly the
  members whose decision ``d`` is in ``values``), or ``None`` (neither: ``used`` decides).
  """
  used: Callable[[tuple], np.ndarray]
  rules: tuple

  @property
  def unruled(self) -> list[int]:
    """The leaves without a rule."""
    return [j for j, r in enumerate(self.rules) if r is None]

  def host(self, members) -> np.ndarray:
    """``bool[..., L']`` for ``members`` (``int32[..., K, D]``): whether any of the ``K``
    uses each leaf without a rule (host; a ``pure_callback``)."""
    m = np.asarray(members, np.int32)
    out = [np.any([self.used(tuple(int(d) for d in v)) for v in step], axis=0)[self.unruled]
           for step in m.reshape((-1,) + m.shape[-2:])]
    return np.stack(out).reshape(m.shape[:-2] + (len(self.unruled),))

  def mask(self, vectors, host=None) -> list:
    """Per leaf, a bool scalar: whether any of ``vectors`` (``int32[D]`` each, traced)
    uses it; ``host``: ``bool[L']`` for the leaves without a rule (in order)."""
    out, h = [], 0
    for rule in self.rules:
      if rule is True:
        out.append(jnp.asarray(True))
      elif rule is None:
        out.append(host[h])
        h += 1
      else:
        d, values = rule
        out.append(functools.reduce(jnp.logical_or, [v[d] == c for v in vectors
                                                     for c in values]))
    return out


def make_uses(model: SearchableModel, variables, images, num_random: int = 4) -> Uses:
  """Which parameters each member of ``model.space`` uses (``Uses``).

  A member uses exactly the leaves its specialised network has
  (``model.specialise_variables``: unchosen ops and blocks absent), the parameters
  exporting it would keep; an elastic leaf it uses in part counts whole, as a PyTorch
  tensor sliced by the forward pass gets a gradient (zeros outside the slice).
  ``variables`` and ``images`` give the shapes (arrays or ``ShapeDtypeStruct``).

  The rules come from probing a few members: the largest with every decision ``d`` whose
  ``d + 1`` has bit ``k`` set changed to candidate ``c`` (for every ``k`` and ``c``: a
  group test that tells which one decision a leaf's use depends on, in ``log2(D)`` times
  the most candidates probes), the smallest and ``num_random`` random ones. A leaf whose
  use by all of them is "always" or "decision d takes one of these values" gets that
  rule (NAS-Bench-201's conv ops, the blocks of an elastic depth), computed in the
  program; any other is looked up
  per member on the host (``used``; slow where specialising a network is). ValueError
  where the specialised variables are not cut out at the elastic ones' paths.
  """
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables)
  images = jax.ShapeDtypeStruct(tuple(images.shape), images.dtype)
  keys = _leaf_keys(shapes["params"])
  index = {k: i for i, k in enumerate(keys)}
  space = model.space

  @functools.lru_cache(maxsize=None)
  def used(vector: tuple[int, ...]) -> np.ndarray:
    # Host work, also when called while a program is traced or from its callback.
    with jax.ensure_compile_time_eval(), jax.default_device(jax.local_devices(backend="cpu")[0]):
      arch = jax.tree.map(np.asarray, space.from_vector(np.asarray(vector, np.int32)))
      static = model.static(arch)
    kept = jax.eval_shape(lambda v: model.specialise_variables(v, static, images), shapes)
    out = np.zeros(len(keys), bool)
    for k in _leaf_keys(flax.core.unfreeze(kept).get("params", {})):
      if k not in index:
        raise ValueError(f"model {model.name}: its specialised network has {'/'.join(k)}, which "
                         "the arch-as-data network has not (SPOS needs specialise_variables to "
                         "cut the variables out at the same paths)")
      out[index[k]] = True
    return out

  cards = np.asarray(space.cardinalities, np.int32)
  decisions = np.arange(len(cards))
  largest = cards - 1
  candidates = [largest, np.zeros_like(cards)] + list(
      (np.random.default_rng(0).random((num_random, len(cards))) * cards).astype(np.int32))
  for k in range(int(len(cards)).bit_length()):
    for c in range(int(cards.max()) - 1):
      chosen = ((decisions + 1) >> k) & 1 == 1
      candidates.append(np.where(chosen & (c < cards - 1), c, largest))
  with jax.ensure_compile_time_eval(), jax.default_device(jax.local_devices(backend="cpu")[0]):
    canonical = np.asarray(jax.jit(jax.vmap(space.canonical))(np.stack(candidates)), np.int32)
  vectors = np.unique(canonical, axis=0)
  uses = np.stack([used(tuple(int(x) for x in v)) for v in vectors])  # [probes, L]

  def rule(u):
    if u.all():
      return True
    for d in range(len(cards)):
      values = tuple(sorted({int(x) for x in vectors[u, d]}))
      if values and np.array_equal(np.isin(vectors[:, d], values), u):
        return d, values
    return None

  rules = tuple(rule(uses[:, j]) for j in range(len(keys)))
  unruled = [keys[j] for j, r in enumerate(rules) if r is None]
  if unruled:
    logging.warning("SPOS of %s: whether a member uses %d parameter arrays (%s, ...) depends on "
                    "more than one decision; each member's is looked up on the host",
                    model.name, len(unruled), "/".join(unruled[0]))
  return Uses(used, rules)


@functools.lru_cache(maxsize=16)
def _uses(model: SearchableModel, image_shape: tuple, treedef, leaves: tuple) -> Uses:
  variables = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(*x) for x in leaves])
  return make_uses(model, variables, jax.ShapeDtypeStruct((1,) + image_shape, jnp.float32))


def _select_opt_state(ok, mask, new, old, param_def):
  """``new`` where the step applies, else ``old``: per leaf for parameter-shaped subtrees
  (momentum), by ``ok`` alone elsewhere (the schedule's step count)."""
  is_param_tree = lambda x: jax.tree.structure(x) == param_def

  def pick(n, o):
    if is_param_tree(n):
      return jax.tree.map(lambda m, a, b: jnp.where(ok & m, a, b), mask, n, o)
    return jnp.where(ok, n, o)

  return jax.tree.map(pick, new, old, is_leaf=is_param_tree)


def make_spos(config: SupernetConfig, num_classes: int, image_shape: tuple[int, ...],
              num_train: int, model: SearchableModel | None = None,
              mesh: Mesh | None = None) -> Spos:
  """SPOS training (Guo et al. 2020) of ``model``'s supernet as ``init``/``run_epoch``.

  ``model``: a ``SearchableModel``; None: the built-in model of ``config.space``.
  ``image_shape`` is ``(H, W, C)`` and ``num_train`` the size of the training
  data ``run_epoch`` will get. ``run_epoch`` always scans ``steps_per_epoch``
  steps (one compiled program); steps past ``total_steps`` (a fractional last
  epoch) leave the state unchanged. Metrics per step: ``loss`` and
  ``accuracy`` of the uniformly sampled member on its minibatch, ``live`` and ``ok``
  (False: the loss or gradient was not finite and the step was skipped).

  With a 1-D ``mesh`` the steps are data-parallel over its devices, expressed as
  sharding (``make_darts``'s way): each step's minibatch is constrained to be split
  over the mesh and the new state to be replicated, and XLA's SPMD partitioner inserts
  the all-reduces of the gradients and of BN's batch moments (synchronised BN: the
  single-device step's maths, summed in another order). ``batch_size`` must divide
  over the mesh (ValueError); a conv left "auto" is "im2col" (``for_mesh``). Jit
  ``init`` and ``run_epoch`` with replicated outputs, their data replicated
  (``replicated``).
  """
  validate_config(config)
  axis = _axis(mesh)
  if mesh is not None and config.batch_size % mesh.size:
    raise ValueError(f"batch_size {config.batch_size} does not split over {mesh.size} devices; "
                     f"use a multiple of {mesh.size}")
  config = for_mesh(config, mesh)
  split = None if mesh is None else NamedSharding(mesh, P(axis))
  whole = None if mesh is None else NamedSharding(mesh, P())
  tc = train_config(config, num_classes, num_train, model)
  model = supernet_model(config, num_classes, tc.op_impl, model)
  net = model.network(None)
  tx = make_optimizer(tc)
  space = model.space
  bs, total = config.batch_size, tc.steps
  spe = max(1, num_train // bs)
  shape = tuple(int(d) for d in image_shape)
  with jax.ensure_compile_time_eval():
    largest, smallest = (np.asarray(v) for v in extremes(space))
  # Trained together each step: (largest, smallest) and the uniformly sampled member.
  fixed = (np.stack([largest, smallest]) if config.sampling == "sandwich" else
           np.zeros((0, space.num_decisions), np.int32))

  def uses_of(state: SposState) -> Uses:
    """The supernet's ``Uses`` (when ``run_epoch`` is traced; probed once per process)."""
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    leaves, treedef = jax.tree.flatten(variables)
    return _uses(model, shape, treedef, tuple((x.shape, x.dtype) for x in leaves))

  def init(key):
    k_init, k_train = jax.random.split(key)
    arch = space.from_vector(jnp.zeros(space.num_decisions, jnp.int32))
    # flax's own init (what ``protocol.searchable`` models' ``init`` is); the built-in
    # models' ``init`` draws other values, which would change every NB201 supernet.
    variables = net.init(k_init, jnp.zeros((1,) + shape, jnp.float32), arch, train=False)
    params = variables["params"]
    return SposState(params=params, batch_stats=variables.get("batch_stats", {}),
                     opt_state=tx.init(params), key=k_train, step=jnp.asarray(0, jnp.int32))

  def member_loss(params, stats, x, y, arch):
    logits, new = net.apply({"params": params, "batch_stats": stats}, x, arch, train=True,
                            mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, logits, new.get("batch_stats", {})

  def loss_fn(params, stats, x, y, vectors):
    # Members in order (sandwich: largest, smallest, random), each seeing the BN
    # statistics the previous left; the gradient of the sum is the sum of theirs.
    losses = []
    for v in vectors:
      loss, logits, stats = member_loss(params, stats, x, y, space.from_vector(v))
      losses.append(loss)
    return sum(losses[1:], losses[0]), (losses[-1], logits, stats)

  def run_epoch(state: SposState, data: TrainData):
    if data.train_labels.shape[0] != num_train:
      raise ValueError(f"make_spos was built for {num_train} training examples, "
                       f"got {data.train_labels.shape[0]}")
    preprocess = make_preprocess(data.mean, data.std, augment=tc.augment)
    k_arch, k_aug, k_perm = (jax.random.fold_in(state.key, i) for i in range(3))
    # run_epoch starts at an epoch boundary: one permutation serves the whole scan.
    perm = jax.random.permutation(jax.random.fold_in(k_perm, state.step // spe), num_train)
    param_def = jax.tree.structure(state.params)
    # Step state.step + i (the i-th of this scan, when live) trains these members.
    sampled = jax.vmap(lambda t: space.sample_vector(jax.random.fold_in(k_arch, t)))(
        state.step + jnp.arange(spe, dtype=jnp.int32))
    members = jnp.concatenate([jnp.broadcast_to(jnp.asarray(fixed, jnp.int32),
                                                (spe,) + fixed.shape), sampled[:, None]], 1)
    uses = uses_of(state)
    host = None
    if uses.unruled:  # leaves that no one-decision rule covers: the host's answer, per epoch
      host = jax.pure_callback(uses.host, jax.ShapeDtypeStruct((spe, len(uses.unruled)), bool),
                               members, vmap_method="expand_dims")

    def live(s: SposState, i):
      vectors = [members[i, k] for k in range(members.shape[1])]
      idx = jax.lax.dynamic_slice_in_dim(perm, i * bs, bs)
      x = preprocess(jax.random.fold_in(k_aug, s.step), data.train_images[idx])
      y = data.train_labels[idx]
      if split is not None:
        x, y = (jax.lax.with_sharding_constraint(a, split) for a in (x, y))
      (summed, (loss, logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          s.params, s.batch_stats, x, y, vectors)
      updates, opt_state = tx.update(grads, s.opt_state, s.params)
      params = optax.apply_updates(s.params, updates)
      ok = jnp.isfinite(summed) & jnp.isfinite(optax.tree.norm(grads))
      mask = jax.tree.unflatten(param_def, uses.mask(vectors, None if host is None else host[i]))
      params = jax.tree.map(lambda m, a, b: jnp.where(ok & m, a, b), mask, params, s.params)
      opt_state = _select_opt_state(ok, mask, opt_state, s.opt_state, param_def)
      # Only the members' BN layers ran (switch, cond), the others pass their statistics through.
      stats = jax.tree.map(lambda a, b: jnp.where(ok, a, b), stats, s.batch_stats)
      acc = jnp.mean(jnp.argmax(logits, -1) == y)
      new = s.replace(params=params, batch_stats=stats, opt_state=opt_state, step=s.step + 1)
      if whole is not None:
        new = jax.lax.with_sharding_constraint(new, whole)
      return new, {"loss": loss, "accuracy": acc, "live": jnp.asarray(True), "ok": ok}

    def dead(s: SposState, i):
      del i
      zero = jnp.asarray(0.0, jnp.float32)
      return s, {"loss": zero, "accuracy": zero, "live": jnp.asarray(False),
                 "ok": jnp.asarray(True)}

    def body(s, i):
      return jax.lax.cond(s.step < total, live, dead, s, i)

    return jax.lax.scan(body, state, jnp.arange(spe))

  return Spos(init=init, run_epoch=run_epoch, network=net, model=model, steps_per_epoch=spe,
              total_steps=total, num_epochs=-(-total // spe), mesh=mesh)


def calibration_batches(config: SupernetConfig, data: TrainData) -> jax.Array:
  """The fixed BN-recalibration batches: ``uint8[bn_batches, batch_size, H, W, C]``.

  The first ``bn_batches * batch_size`` examples of a fixed permutation (from
  ``split_seed``) of the proxy training subset; the same for every member.
  """
  n, need = int(data.train_labels.shape[0]), config.bn_batches * config.batch_size
  if need > n:
    raise ValueError(f"bn_batches * batch_size = {need} exceeds the {n} examples of the proxy "
                     "training subset; lower --bn_batches or raise --train_fraction")
  idx = np.random.default_rng(config.split_seed + 2).permutation(n)[:need]
  images = data.train_images[jnp.asarray(np.sort(idx))]
  return images.reshape((config.bn_batches, config.batch_size) + images.shape[1:])


def _bn_momentum_zero(next_fun, args, kwargs, context):
  """A flax method interceptor: every module with a float ``momentum`` field (the BN
  layers: ``nn.BatchNorm``, ``jaxnas.nn.BatchNorm``, ``ops.BatchNorm``) runs its methods
  with momentum 0, so a train-mode forward leaves exactly the batch's statistics."""
  module = context.module
  momentum = vars(module).get("momentum")  # vars: no flax __getattr__ (it may run setup)
  if not isinstance(momentum, float) or momentum == 0.0:
    return next_fun(*args, **kwargs)
  object.__setattr__(module, "momentum", 0.0)
  try:
    return next_fun(*args, **kwargs)
  finally:
    object.__setattr__(module, "momentum", momentum)


def recalibration(net: nn.Module, bn_batches: int):
  """``recalibrate(params, batch_stats, arch, calib, data) -> batch_stats`` of ``net``
  (an arch-as-data or a specialised network; ``arch`` its architecture argument).

  Every BN layer that runs for ``arch`` gets the exact average over the ``calib``
  batches (``calibration_batches``) of its train-mode batch mean and (biased)
  variance: PyTorch's cumulative ``momentum=None`` re-estimation, as SPOS does (each
  forward runs with BN momentum 0, whatever the network's). The statistics of layers
  off the path are returned as given. With ``bn_batches == 0`` the statistics are
  returned unchanged.
  """

  def recalibrate(params, stats, arch, calib, data: TrainData):
    if not bn_batches:
      return stats
    preprocess = make_preprocess(data.mean, data.std, augment=False)

    def add_batch(total, images):
      with nn.intercept_methods(_bn_momentum_zero):
        _, new = net.apply({"params": params, "batch_stats": stats}, preprocess(None, images),
                           arch, train=True, mutable=["batch_stats"])
      return jax.tree.map(jnp.add, total, new.get("batch_stats", {})), None

    total, _ = jax.lax.scan(add_batch, jax.tree.map(jnp.zeros_like, stats), calib)
    return jax.tree.map(lambda s: s / bn_batches, total)

  return recalibrate


def make_recalibrate(config: SupernetConfig, num_classes: int, op_impl: str = "switch",
                     model: SearchableModel | None = None):
  """``recalibration`` of the supernet of ``model`` (None: the built-in model of
  ``config.space`` with ``op_impl``): ``recalibrate(params, batch_stats, arch, calib,
  data) -> batch_stats`` of one member."""
  net = supernet_model(config, num_classes, op_impl, model).network(None)
  return recalibration(net, config.bn_batches)


def accuracy(net: nn.Module, variables, arch, data: TrainData) -> jax.Array:
  """Eval-mode accuracy (%) of ``net`` (arch ``arch``) on ``data``'s validation part,
  in batches of at most ``_EVAL_BATCH``."""
  preprocess = make_preprocess(data.mean, data.std, augment=False)
  n_val = data.val_labels.shape[0]
  ebs = min(_EVAL_BATCH, n_val)
  nb = -(-n_val // ebs)
  pad = nb * ebs - n_val
  vx = jnp.pad(data.val_images, ((0, pad), (0, 0), (0, 0), (0, 0))).reshape(
      (nb, ebs) + data.val_images.shape[1:])
  vy = jnp.pad(data.val_labels, (0, pad), constant_values=-1).reshape(nb, ebs)

  def correct(xy):
    logits = net.apply(variables, preprocess(None, xy[0]), arch, train=False)
    return jnp.sum(jnp.argmax(logits, -1) == xy[1])

  return 100.0 * jnp.sum(jax.lax.map(correct, (vx, vy))) / n_val


def make_scorer(config: SupernetConfig, num_classes: int, plan: str = "auto",
                model: SearchableModel | None = None, mesh: Mesh | None = None):
  """``score(variables, archs, calib, data) -> float32[P]``: inherited-weight accuracy (%).

  ``variables`` are the supernet's ``{"params", "batch_stats"}``, ``archs`` a
  population of the space's architectures (leading axis ``P``), ``calib`` the
  ``calibration_batches`` and ``data`` the ``TrainData`` whose validation part is
  scored. Per member, its canonical vector (``space.to_vector``/``canonical``/
  ``from_vector``: a network's score whatever its inactive decisions): BN statistics
  from ``recalibration``, then eval-mode accuracy. Pure; everything is an argument
  (jit it). ``model``: None is the built-in model of ``config.space``. ``plan``:
  "map" (``lax.map``; NB201's ``switch`` ops), "vmap" (NB201's ``kernel`` ops) or
  "auto": ``config.plan``, by backend if that is "auto" (``models.resolve_plan``).

  With a 1-D ``mesh`` the members are sharded over its devices (``shard_map``, as
  ``models.sharded``; everything else replicated), each device scoring its block as
  above: ``P`` must divide over the mesh (``score_members`` pads a population).
  """
  validate_config(config)
  axis = _axis(mesh)
  config = for_mesh(config, mesh)
  resolved = resolve_plan(TrainConfig(plan=config.plan if plan == "auto" else plan))
  if resolved.plan not in ("map", "vmap"):
    raise ValueError(f"plan {resolved.plan!r} does not apply to the supernet scorer")
  model = supernet_model(config, num_classes, resolved.op_impl, model)
  net, space = model.network(None), model.space
  recalibrate = recalibration(net, config.bn_batches)

  def score_one(params, stats, vector, calib, data: TrainData):
    arch = space.from_vector(vector)
    stats = recalibrate(params, stats, arch, calib, data)
    return accuracy(net, {"params": params, "batch_stats": stats}, arch, data)

  def score(variables, archs, calib, data: TrainData):
    params, stats = variables["params"], variables.get("batch_stats", {})
    vectors = jax.vmap(lambda a: space.canonical(space.to_vector(a)))(archs)
    if resolved.plan == "vmap":
      return jax.vmap(score_one, in_axes=(None, None, 0, None, None))(params, stats, vectors,
                                                                        calib, data)
    return jax.lax.map(lambda v: score_one(params, stats, v, calib, data), vectors)

  if mesh is None:
    return score
  # Members never communicate: nothing crosses devices, so the varying-axes type check
  # (which flax's lifted switch trips over) has nothing to protect.
  return jax.shard_map(score, mesh=mesh, in_specs=(P(), P(axis), P(), P()), out_specs=P(axis),
                       check_vma=False)


def score_members(score, mesh: Mesh | None, variables, archs, calib, data) -> np.ndarray:
  """``score(variables, archs, calib, data)`` of ``make_scorer(..., mesh=mesh)``, as host
  ``float32[P]`` on every process: the population (host or local arrays, the same in
  every process) padded to a multiple of the mesh's devices with copies of member 0,
  whose scores are dropped, and laid out over them (``distributed.put``); ``variables``,
  ``calib`` and ``data`` replicated on the mesh. Without a mesh, ``score``'s own call."""
  if mesh is None:
    return score(variables, archs, calib, data)
  archs = jax.tree.map(np.asarray, archs)
  size = jax.tree.leaves(archs)[0].shape[0]
  pad = -size % mesh.size
  archs = jax.tree.map(lambda a: np.concatenate([a, np.repeat(a[:1], pad, axis=0)]), archs)
  members = NamedSharding(mesh, P(_axis(mesh)))
  out = score(variables, jax.tree.map(lambda a: distributed.put(a, members), archs), calib, data)
  return distributed.host(out)[:size]


@functools.lru_cache(maxsize=16)
def _programs(config: SupernetConfig, num_classes: int, image_shape: tuple, num_train: int,
              compiler_options: tuple, model: SearchableModel | None = None,
              mesh: Mesh | None = None):
  """Jitted SPOS and scoring programs, cached so that in-process reruns compile once
  (``config.execution`` resolved by the callers, so the key names the programs' convs);
  with a ``mesh`` the SPOS state and metrics come out replicated on it."""
  options = dict(compiler_options) or None
  spos = make_spos(config, num_classes, image_shape, num_train, model, mesh)
  if mesh is None:
    init = jax.jit(spos.init, compiler_options=_INIT_COMPILE)
    run_epoch = jax.jit(spos.run_epoch, compiler_options=options)
  else:
    whole = NamedSharding(mesh, P())
    init = jax.jit(spos.init, out_shardings=whole, compiler_options=_INIT_COMPILE)
    run_epoch = jax.jit(spos.run_epoch, out_shardings=whole, compiler_options=options)
  return (spos, init, run_epoch,
          jax.jit(make_scorer(config, num_classes, model=model, mesh=mesh),
                  compiler_options=options))


def train_supernet(config: SupernetConfig, data: TrainData, num_classes: int,
                   workdir: str | None = None, compiler_options: dict | None = None,
                   model: SearchableModel | None = None, mesh: Mesh | None = None) -> SposState:
  """Trains the SPOS supernet of ``model`` (None: the built-in model of ``config.space``)
  epoch by epoch; returns its final state (with a ``mesh``: data-parallel over its
  devices, ``make_spos``, the state replicated on them).

  With a ``workdir`` every epoch is checkpointed to ``workdir/supernet`` (and
  logged to ``workdir/supernet_metrics.jsonl``); a rerun resumes from the
  newest verified checkpoint, so it ends with the same state as an
  uninterrupted run, and a finished supernet is only loaded. A workdir holding
  a supernet trained with other settings or of another model is refused
  (``workdir/supernet_config.json``; ``bn_batches`` and ``plan`` only affect
  scoring and may differ; so may the devices: a supernet trained on some resumes on
  others, at float level from an uninterrupted run's).
  """
  return _train_supernet(config, data, num_classes, workdir, compiler_options, model, mesh)[0]


def _train_supernet(config: SupernetConfig, data: TrainData, num_classes: int,
                    workdir: str | None, compiler_options: dict | None,
                    model: SearchableModel | None = None, mesh: Mesh | None = None):
  """``train_supernet`` plus its training wall time (seconds, over every run of ``workdir``)."""
  config = for_mesh(config, mesh)
  config = config._replace(execution=config.execution.resolve())
  num_train = int(data.train_labels.shape[0])
  spos, init, run_epoch, _ = _programs(config, num_classes, tuple(data.train_images.shape[1:]),
                                       num_train, tuple(sorted((compiler_options or {}).items())),
                                       model, mesh)
  data = distributed.replicate(data, mesh)
  # A host key: across processes every process passes the same (a device array is local).
  state = init(np.asarray(jax.random.PRNGKey(config.supernet_seed)))
  ckpt = log_path = None
  epoch, elapsed = 0, 0.0
  if workdir is not None:
    os.makedirs(workdir, exist_ok=True)
    # Scoring settings (bn_batches, plan) do not change the supernet: a workdir serves them all.
    described = {"config": trained_by(config), "model": spos.model.name,
                 "num_classes": num_classes, "num_train": num_train}
    config_path = os.path.join(workdir, "supernet_config.json")
    if os.path.exists(config_path):
      with open(config_path) as f:
        previous = json.load(f)
      if previous != json.loads(json.dumps(described)):
        raise ValueError(f"{workdir} holds a supernet with other settings ({config_path}); "
                         "use another workdir")
    else:
      host_loop.write_json_atomic(config_path, described)
    ckpt = Checkpointer(os.path.join(workdir, "supernet"))
    log_path = os.path.join(workdir, "supernet_metrics.jsonl")
    epoch, state, elapsed = host_loop.resume(ckpt, state, log_path, "epoch", "supernet: ")
    # Restored as the template lies (replicated on the mesh); placed so again regardless.
    state = distributed.replicate(state, mesh)

  def advance(epoch):
    new_state, metrics = run_epoch(state, data)
    metrics, step = distributed.host((metrics, new_state.step))
    return epoch + 1, (new_state, metrics, int(step))

  def commit(epoch, out, seconds, elapsed):
    nonlocal state
    state, metrics, step = out
    live = np.asarray(metrics["live"])
    line = {"epoch": epoch, "step": step,
            "loss": round(float(np.mean(metrics["loss"][live])), 6),
            "train_accuracy": round(100.0 * float(np.mean(metrics["accuracy"][live])), 4),
            "skipped_steps": int(np.sum(live & ~np.asarray(metrics["ok"]))),
            "seconds": round(seconds, 3)}
    logging.info("supernet epoch %d/%d  loss %.4f  sampled-path train accuracy %.2f %%  (%.1fs)",
                 epoch, spos.num_epochs, line["loss"], line["train_accuracy"], seconds)
    if ckpt is not None:
      host_loop.append_jsonl(log_path, [line])
      ckpt.save(epoch, state, {"elapsed_s": elapsed})

  _, elapsed, _ = host_loop.drive(epoch, elapsed, advance, commit,
                                  done=lambda epoch: epoch >= spos.num_epochs)
  if ckpt is not None:
    ckpt.close()
  return state, elapsed


def supernet_evaluator(config: SupernetConfig = SupernetConfig(), workdir: str | None = None,
                       model: SearchableModel | None = None,
                       compiler_options: dict | None = None,
                       mesh: Mesh | None = None) -> Evaluator:
  """Scores ``model``'s architectures with weights inherited from its SPOS supernet
  (validation %, higher is better).

  ``model``: a ``SearchableModel`` (``protocol.searchable``); None: the built-in model
  of ``config.space`` (NAS-Bench-201 cells by default). Trains the supernet first
  (``train_supernet``: resumed from / saved to ``workdir/supernet`` when ``workdir`` is
  given). ``evaluate(key, archs)`` ignores ``key``: a member's score is fixed (BN
  recalibrated on fixed batches, fixed validation subset), whatever the population.
  ``report`` gives the specialised network's params and FLOPs (``model.cost``), as
  ``train_evaluator``. ``compiler_options`` go to XLA (tests compile at low
  optimisation). Not jittable: scoring is its own compiled program, with the
  supernet's weights passed as arguments.

  ``mesh``: a 1-D mesh over which the supernet trains data-parallel (``make_spos``)
  and the members are scored sharded (``make_scorer``, ``score_members``), spanning
  processes where its devices do (every process then builds this evaluator alike and
  gets every score); None: one device.
  """
  validate_config(config)
  config = for_mesh(config, mesh)
  config = config._replace(execution=config.execution.resolve())
  ds, data = search_split(proxy_spec(config))
  image_shape = tuple(int(d) for d in ds.train_images.shape[1:])
  num_train = int(data.train_labels.shape[0])
  options = tuple(sorted((compiler_options or {}).items()))
  spos, *_, score = _programs(config, ds.num_classes, image_shape, num_train, options, model,
                              mesh)
  check_head(spos.model, image_shape, ds.num_classes, config.dataset)
  calib, data = distributed.replicate((calibration_batches(config, data), data), mesh)
  state, train_s = _train_supernet(config, data, ds.num_classes, workdir, compiler_options,
                                   model, mesh)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  model = spos.model

  def evaluate(key, archs):
    del key  # a member's score is a fixed function of its network
    return score_members(score, mesh, variables, archs, calib, data)

  def report(archs):
    return cost_report(model, archs, image_shape, ds.num_classes)

  return Evaluator(name=f"supernet/{config.dataset}/{model.name}", space=model.space,
                   evaluate=evaluate, report=report, jittable=False, setup_s=train_s,
                   execution=config.execution)
