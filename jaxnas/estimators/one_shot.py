"""One-shot weight sharing: a single-path supernet (SPOS) that scores NAS-Bench-201 cells.

Single Path One-Shot (Guo et al., "Single Path One-Shot Neural Architecture
Search with Uniform Sampling", ECCV 2020): one supernet holds the weights of
every op of every edge; each training step samples one cell uniformly and
trains only that path. A search then scores any cell with the weights it
inherits from the supernet, after re-estimating the BatchNorm statistics of
that path on a few training batches (their Sec. 3.3: the running statistics
of a weight-sharing supernet belong to no single path).

The supernet is ``NB201Network`` with the architecture as data: with
``op_impl="switch"`` and an unbatched cell only the chosen ops run, so SPOS
training is plain training of that network with a fresh cell every step.

* ``make_spos(config, ...)`` gives ``init(key) -> SposState`` and
  ``run_epoch(state, data) -> (state, metrics)``, pure and jittable
  (purejaxrl style). ``SposState`` is one pytree (params, BN statistics,
  optimizer state, key, step), so a checkpoint restores training bit-exactly.
  Step ``t`` trains the cell ``space.sample(fold_in(k_arch, t))`` on minibatch
  ``t mod E`` of epoch ``t div E``'s permutation (``E`` steps per epoch).
  Parameters of the ops a step did not choose are left exactly as they are
  (no weight decay, no momentum step), as PyTorch's SGD leaves parameters
  without a gradient; the optimizer is ``models.make_optimizer``'s
  (NAS-Bench-201's SGD recipe), its cosine schedule spanning all steps.
* ``make_scorer(config, ...)`` gives the batched score of a population with
  inherited weights: per cell, BN statistics recalibrated as the exact average
  of the batch statistics of ``bn_batches`` fixed training batches (train-mode
  forwards; PyTorch's ``momentum=None``), then accuracy (%) on the fixed
  validation subset in eval mode. ``lax.map`` over cells on CPU (a real
  conditional: each cell runs only its ops), ``vmap`` on accelerators
  (``op_impl="kernel"``: one grouped conv per edge), as ``models.resolve_plan``.
* ``supernet_evaluator(config, workdir)`` trains (or resumes, or loads) the
  supernet, checkpointing to ``workdir/supernet`` after every epoch, and wraps
  the scorer in the ``Evaluator`` protocol: ``--evaluator=supernet``.

Data are the training evaluator's (``training.search_split``): the same fixed
search-train/validation split and subsets, so supernet scores and stand-alone
proxy training are measured on the same examples. A score is a fixed function
of the cell (no key, no dependence on the rest of the population), like a
table lookup. One supernet serves all seeds of a search (``supernet_seed``).
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jaxnas import host_loop
from jaxnas.checkpoint import Checkpointer
from jaxnas.datasets import default_augment, make_preprocess
from jaxnas.estimators.base import Evaluator
from jaxnas.estimators.training import ProxySpec, search_split, validate_spec
from jaxnas.models import TrainConfig, TrainData, cost, make_optimizer, resolve_plan
from jaxnas.models.nb201_net import CONV1, CONV3, NB201Network
from jaxnas.ops import Execution
from jaxnas.spaces import nb201_space

SUPERNET_PLANS = ("auto", "map", "vmap")
_EVAL_BATCH = 500
# ``init`` runs once per process, and XLA's optimising passes made its compile 7x
# longer (19 s vs 2.9 s, C=4 N=1 on the 2-core CPU): it is always compiled without them.
_INIT_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class SupernetConfig(NamedTuple):
  """The supernet and how it scores cells (the CLI's proxy flags where they mean the same).

  epochs: SPOS training passes over the proxy training subset (fractions allowed).
  bn_batches: training batches (of ``batch_size``) whose exact average batch
    statistics replace every scored cell's BN statistics; 0 scores with the
    supernet's running statistics (stale: a baseline, not recommended).
  supernet_seed: the supernet's initialisation and path/minibatch sampling.
  execution: the conv and pool implementations (``jaxnas.ops.Execution``; "auto": the
    backend's defaults).
  Other fields as ``training.ProxySpec``.
  """
  dataset: str = "fashion_mnist"
  data_dir: str | None = None
  epochs: float = 5.0
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
  """SPOS training as pure functions (``make_spos``)."""
  init: Callable[[jax.Array], SposState]
  run_epoch: Callable[[SposState, TrainData], tuple[SposState, dict]]
  network: NB201Network
  steps_per_epoch: int
  total_steps: int
  num_epochs: int


def train_config(config: SupernetConfig, num_classes: int, num_train: int) -> TrainConfig:
  """The ``TrainConfig`` of SPOS training: ``steps`` is the whole run (the cosine schedule's span)."""
  steps_per_epoch = max(1, num_train // config.batch_size)
  steps = max(1, math.ceil(config.epochs * steps_per_epoch))
  augment = default_augment(config.dataset, config.augment)
  return TrainConfig(steps=steps, batch_size=config.batch_size,
                     learning_rate=config.learning_rate, weight_decay=config.weight_decay,
                     channels=config.channels, cells=config.cells, num_classes=num_classes,
                     augment=augment, plan="map", op_impl="switch", execution=config.execution)


def path_mask(params, arch):
  """Per parameter leaf: a bool scalar, whether the single path ``arch`` uses it.

  Only the conv ops of cell edges are optional (``edge<e>/nor_conv_1x1`` and
  ``nor_conv_3x3``, kernel and BN); the stem, reductions and classifier are on
  every path.
  """
  ops = {"nor_conv_1x1": CONV1, "nor_conv_3x3": CONV3}

  def used(path, leaf):
    del leaf
    names = [getattr(k, "key", None) for k in path]
    for edge, op in zip(names, names[1:]):
      if isinstance(edge, str) and edge.startswith("edge") and edge[4:].isdigit() and op in ops:
        return arch[int(edge[4:])] == ops[op]
    return jnp.asarray(True)

  return jax.tree_util.tree_map_with_path(used, params)


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
              num_train: int) -> Spos:
  """SPOS training of the NB201 supernet (Guo et al. 2020) as ``init``/``run_epoch``.

  ``image_shape`` is ``(H, W, C)`` and ``num_train`` the size of the training
  data ``run_epoch`` will get. ``run_epoch`` always scans ``steps_per_epoch``
  steps (one compiled program); steps past ``total_steps`` (a fractional last
  epoch) leave the state unchanged. Metrics per step: ``loss`` and
  ``accuracy`` of the sampled path on its minibatch, ``live`` and ``ok``
  (False: the loss or gradient was not finite and the step was skipped).
  """
  validate_config(config)
  tc = train_config(config, num_classes, num_train)
  net = NB201Network(channels=config.channels, cells=config.cells, num_classes=num_classes,
                     op_impl="switch", bn_momentum=tc.bn_momentum, execution=config.execution)
  tx = make_optimizer(tc)
  space = nb201_space()
  bs, total = config.batch_size, tc.steps
  spe = max(1, num_train // bs)
  shape = tuple(int(d) for d in image_shape)

  def init(key):
    k_init, k_train = jax.random.split(key)
    variables = net.init(k_init, jnp.zeros((1,) + shape, jnp.float32),
                         jnp.zeros(6, jnp.int32), train=False)
    params = variables["params"]
    return SposState(params=params, batch_stats=variables["batch_stats"],
                     opt_state=tx.init(params), key=k_train, step=jnp.asarray(0, jnp.int32))

  def loss_fn(params, stats, x, y, arch):
    logits, new = net.apply({"params": params, "batch_stats": stats}, x, arch, train=True,
                            mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (logits, new["batch_stats"])

  def run_epoch(state: SposState, data: TrainData):
    if data.train_labels.shape[0] != num_train:
      raise ValueError(f"make_spos was built for {num_train} training examples, "
                       f"got {data.train_labels.shape[0]}")
    preprocess = make_preprocess(data.mean, data.std, augment=tc.augment)
    k_arch, k_aug, k_perm = (jax.random.fold_in(state.key, i) for i in range(3))
    # run_epoch starts at an epoch boundary: one permutation serves the whole scan.
    perm = jax.random.permutation(jax.random.fold_in(k_perm, state.step // spe), num_train)
    param_def = jax.tree.structure(state.params)

    def live(s: SposState, i):
      arch = space.sample(jax.random.fold_in(k_arch, s.step))
      idx = jax.lax.dynamic_slice_in_dim(perm, i * bs, bs)
      x = preprocess(jax.random.fold_in(k_aug, s.step), data.train_images[idx])
      y = data.train_labels[idx]
      (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          s.params, s.batch_stats, x, y, arch)
      updates, opt_state = tx.update(grads, s.opt_state, s.params)
      params = optax.apply_updates(s.params, updates)
      ok = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
      mask = path_mask(s.params, arch)
      params = jax.tree.map(lambda m, a, b: jnp.where(ok & m, a, b), mask, params, s.params)
      opt_state = _select_opt_state(ok, mask, opt_state, s.opt_state, param_def)
      # Only the path's BN layers ran (switch), the others pass their statistics through.
      stats = jax.tree.map(lambda a, b: jnp.where(ok, a, b), stats, s.batch_stats)
      acc = jnp.mean(jnp.argmax(logits, -1) == y)
      new = s.replace(params=params, batch_stats=stats, opt_state=opt_state, step=s.step + 1)
      return new, {"loss": loss, "accuracy": acc, "live": jnp.asarray(True), "ok": ok}

    def dead(s: SposState, i):
      del i
      zero = jnp.asarray(0.0, jnp.float32)
      return s, {"loss": zero, "accuracy": zero, "live": jnp.asarray(False),
                 "ok": jnp.asarray(True)}

    def body(s, i):
      return jax.lax.cond(s.step < total, live, dead, s, i)

    return jax.lax.scan(body, state, jnp.arange(spe))

  return Spos(init=init, run_epoch=run_epoch, network=net, steps_per_epoch=spe,
              total_steps=total, num_epochs=-(-total // spe))


def calibration_batches(config: SupernetConfig, data: TrainData) -> jax.Array:
  """The fixed BN-recalibration batches: ``uint8[bn_batches, batch_size, H, W, C]``.

  The first ``bn_batches * batch_size`` examples of a fixed permutation (from
  ``split_seed``) of the proxy training subset; the same for every cell.
  """
  n, need = int(data.train_labels.shape[0]), config.bn_batches * config.batch_size
  if need > n:
    raise ValueError(f"bn_batches * batch_size = {need} exceeds the {n} examples of the proxy "
                     "training subset; lower --bn_batches or raise --train_fraction")
  idx = np.random.default_rng(config.split_seed + 2).permutation(n)[:need]
  images = data.train_images[jnp.asarray(np.sort(idx))]
  return images.reshape((config.bn_batches, config.batch_size) + images.shape[1:])


def make_recalibrate(config: SupernetConfig, num_classes: int, op_impl: str = "switch"):
  """``recalibrate(params, batch_stats, arch, calib, data) -> batch_stats`` of one cell.

  Every BN layer on the cell's path gets the exact average over the
  ``calib`` batches (``calibration_batches``) of its train-mode batch mean and
  (biased) variance: PyTorch's cumulative ``momentum=None`` re-estimation, as
  SPOS does. The statistics of ops off the path are returned as given. With
  ``bn_batches == 0`` the statistics are returned unchanged.
  """
  # Momentum 0: a train-mode forward leaves exactly this batch's statistics in batch_stats.
  net = NB201Network(channels=config.channels, cells=config.cells, num_classes=num_classes,
                     op_impl=op_impl, bn_momentum=0.0, execution=config.execution)
  bn_batches = config.bn_batches

  def recalibrate(params, stats, arch, calib, data: TrainData):
    if not bn_batches:
      return stats
    preprocess = make_preprocess(data.mean, data.std, augment=False)

    def add_batch(total, images):
      _, new = net.apply({"params": params, "batch_stats": stats}, preprocess(None, images),
                         arch, train=True, mutable=["batch_stats"])
      return jax.tree.map(jnp.add, total, new["batch_stats"]), None

    total, _ = jax.lax.scan(add_batch, jax.tree.map(jnp.zeros_like, stats), calib)
    return jax.tree.map(lambda s: s / bn_batches, total)

  return recalibrate


def make_scorer(config: SupernetConfig, num_classes: int, plan: str = "auto"):
  """``score(variables, archs, calib, data) -> float32[P]``: inherited-weight accuracy (%).

  ``variables`` are the supernet's ``{"params", "batch_stats"}``, ``archs``
  ``int32[P, 6]``, ``calib`` the ``calibration_batches`` and ``data`` the
  ``TrainData`` whose validation part is scored. Per cell: BN statistics from
  ``make_recalibrate``, then eval-mode accuracy. Pure; everything is an
  argument (jit it). ``plan``: "map" (``lax.map``, ``switch``), "vmap"
  (``kernel`` ops) or "auto": ``config.plan``, by backend if that is "auto"
  (``models.resolve_plan``).
  """
  validate_config(config)
  resolved = resolve_plan(TrainConfig(plan=config.plan if plan == "auto" else plan))
  if resolved.plan not in ("map", "vmap"):
    raise ValueError(f"plan {resolved.plan!r} does not apply to the supernet scorer")
  recalibrate = make_recalibrate(config, num_classes, resolved.op_impl)
  net = NB201Network(channels=config.channels, cells=config.cells, num_classes=num_classes,
                     op_impl=resolved.op_impl, execution=config.execution)

  def score_one(params, stats, arch, calib, data: TrainData):
    stats = recalibrate(params, stats, arch, calib, data)
    preprocess = make_preprocess(data.mean, data.std, augment=False)
    n_val = data.val_labels.shape[0]
    ebs = min(_EVAL_BATCH, n_val)
    nb = -(-n_val // ebs)
    pad = nb * ebs - n_val
    vx = jnp.pad(data.val_images, ((0, pad), (0, 0), (0, 0), (0, 0))).reshape(
        (nb, ebs) + data.val_images.shape[1:])
    vy = jnp.pad(data.val_labels, (0, pad), constant_values=-1).reshape(nb, ebs)

    def correct(xy):
      logits = net.apply({"params": params, "batch_stats": stats}, preprocess(None, xy[0]),
                         arch, train=False)
      return jnp.sum(jnp.argmax(logits, -1) == xy[1])

    return 100.0 * jnp.sum(jax.lax.map(correct, (vx, vy))) / n_val

  def score(variables, archs, calib, data: TrainData):
    params, stats = variables["params"], variables["batch_stats"]
    archs = jnp.asarray(archs, jnp.int32)
    if resolved.plan == "vmap":
      return jax.vmap(score_one, in_axes=(None, None, 0, None, None))(params, stats, archs,
                                                                        calib, data)
    return jax.lax.map(lambda a: score_one(params, stats, a, calib, data), archs)

  return score


@functools.lru_cache(maxsize=16)
def _programs(config: SupernetConfig, num_classes: int, image_shape: tuple, num_train: int,
              compiler_options: tuple):
  """Jitted SPOS and scoring programs, cached so that in-process reruns compile once
  (``config.execution`` resolved by the callers, so the key names the programs' convs)."""
  options = dict(compiler_options) or None
  spos = make_spos(config, num_classes, image_shape, num_train)
  return (spos, jax.jit(spos.init, compiler_options=_INIT_COMPILE),
          jax.jit(spos.run_epoch, compiler_options=options),
          jax.jit(make_scorer(config, num_classes), compiler_options=options))


def train_supernet(config: SupernetConfig, data: TrainData, num_classes: int,
                   workdir: str | None = None, compiler_options: dict | None = None) -> SposState:
  """Trains the SPOS supernet epoch by epoch; returns its final state.

  With a ``workdir`` every epoch is checkpointed to ``workdir/supernet`` (and
  logged to ``workdir/supernet_metrics.jsonl``); a rerun resumes from the
  newest verified checkpoint, so it ends with the same state as an
  uninterrupted run, and a finished supernet is only loaded. A workdir holding
  a supernet trained with other settings is refused
  (``workdir/supernet_config.json``; ``bn_batches`` and ``plan`` only affect
  scoring and may differ).
  """
  return _train_supernet(config, data, num_classes, workdir, compiler_options)[0]


def _train_supernet(config: SupernetConfig, data: TrainData, num_classes: int,
                    workdir: str | None, compiler_options: dict | None):
  """``train_supernet`` plus its training wall time (seconds, over every run of ``workdir``)."""
  config = config._replace(execution=config.execution.resolve())
  num_train = int(data.train_labels.shape[0])
  spos, init, run_epoch, _ = _programs(config, num_classes, tuple(data.train_images.shape[1:]),
                                       num_train, tuple(sorted((compiler_options or {}).items())))
  state = init(jax.random.PRNGKey(config.supernet_seed))
  ckpt = log_path = None
  epoch, elapsed = 0, 0.0
  if workdir is not None:
    os.makedirs(workdir, exist_ok=True)
    # Scoring settings (bn_batches, plan) do not change the supernet: a workdir serves them all.
    described = {"config": trained_by(config), "num_classes": num_classes, "num_train": num_train}
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

  def advance(epoch):
    new_state, metrics = run_epoch(state, data)
    return epoch + 1, (new_state, jax.device_get(metrics))

  def commit(epoch, out, seconds, elapsed):
    nonlocal state
    state, metrics = out
    live = np.asarray(metrics["live"])
    line = {"epoch": epoch, "step": int(state.step),
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
                       compiler_options: dict | None = None) -> Evaluator:
  """Scores NAS-Bench-201 cells with weights inherited from a SPOS supernet (validation %, higher is better).

  Trains the supernet first (``train_supernet``: resumed from / saved to
  ``workdir/supernet`` when ``workdir`` is given). ``evaluate(key, archs)``
  ignores ``key``: a cell's score is fixed (BN recalibrated on fixed batches,
  fixed validation subset), whatever the population. ``report`` gives the
  stand-alone network's exact params and FLOPs, as ``train_evaluator``.
  ``compiler_options`` go to XLA (tests compile at low optimisation).
  Not jittable: scoring is its own compiled program, with the supernet's
  weights passed as arguments.
  """
  validate_config(config)
  config = config._replace(execution=config.execution.resolve())
  ds, data = search_split(proxy_spec(config))
  calib = calibration_batches(config, data)
  state, train_s = _train_supernet(config, data, ds.num_classes, workdir, compiler_options)
  options = tuple(sorted((compiler_options or {}).items()))
  *_, score = _programs(config, ds.num_classes, tuple(data.train_images.shape[1:]),
                        int(data.train_labels.shape[0]), options)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  image, in_channels = ds.train_images.shape[1], ds.train_images.shape[3]

  def evaluate(key, archs):
    del key  # a cell's score is a fixed function of the cell
    return score(variables, jnp.asarray(archs, jnp.int32), calib, data)

  def report(archs):
    params, flops = jax.vmap(lambda a: cost(a, config.channels, config.cells, ds.num_classes,
                                            in_channels, image))(archs)
    return {"params": params, "flops": flops}

  return Evaluator(name=f"supernet/{config.dataset}", space=nb201_space(), evaluate=evaluate,
                   report=report, jittable=False, setup_s=train_s)
