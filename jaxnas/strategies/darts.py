"""Gradient-based NAS on a supernet: DARTS, GDAS and DARTS-, in the NAS-Bench-201 or DARTS space.

Pure functions on one explicit state pytree (``DartsState``: weights, BN
statistics, architecture logits ``alpha``, both optax states, the PRNG key and
the step), purejaxrl style: ``make_darts(config)`` returns ``init(key, data)``
and ``run_epoch(state, data)``; ``jax.vmap`` over states runs many seeds as
one program, and the host checkpoints the state between epochs.

Bilevel optimisation (Liu et al., ICLR 2019): the network weights ``w``
follow SGD on minibatches of the search-train split, the logits ``alpha``
follow Adam on minibatches of the search-validation split.

* ``order=1``: ``g_alpha = d/dalpha L_val(w, alpha)``.
* ``order=2``: the unrolled gradient at ``w' = w - xi * dL_train/dw``:
  ``g_alpha = d/dalpha L_val(w', alpha) - xi * (d2 L_train / dalpha dw) v`` with
  ``v = dL_val/dw (w', alpha)``. The mixed second derivative times ``v`` is an
  exact Hessian-vector product, the reverse-mode derivative of
  ``<dL_train/dw, v>`` with respect to alpha, not DARTS' finite difference
  (checked against finite differences in tests/test_darts.py; see
  ``mixed_hvp`` for why not ``jax.jvp``).

Variants (``variant``):
* ``"darts"``: edge weights ``softmax(alpha)``.
* ``"gdas"`` (Dong & Yang, CVPR 2019): a Gumbel-softmax sample per edge and
  step, hard (one-hot) in the forward pass with the soft sample's gradient
  (straight-through); temperature annealed from 10 to 0.1. Sampling one op
  per edge keeps the supernet from settling on parameter-free ops.
* ``"darts-"`` (Chu et al., ICLR 2021): an auxiliary skip connection with a
  coefficient decaying linearly from 1 to 0 over the search is added to every
  edge, so the skip op no longer needs a large weight to let gradients through
  (the cause of skip collapse); the derived cell is read from ``alpha`` alone.

Spaces (``space``): ``"nb201"`` uses ``NB201SuperNet`` with ``alpha``
``float[6, 5]``; ``"darts"`` the DARTS search network (``DartsNetwork(cell=
"mixed")``, ``cells`` cells in all) with ``alpha`` ``{"normal": float[14, 8],
"reduce": float[14, 8]}``; a user's model (``model``, ``protocol.searchable``) its
module on the relaxed architecture, ``alpha`` one ``float[K]`` per decision of its
declared space. Everything below treats ``alpha`` as a pytree.

Discretisation (``selection``):
* ``"magnitude"`` (DARTS): the argmax op of every edge (NAS-Bench-201); per node
  the two strongest inputs, each with its best non-``none`` op (DARTS space).
* ``"perturbation"`` (DARTS-PT, Wang et al., ICLR 2021, NAS-Bench-201 space):
  an op's weight in alpha need not be its contribution to the supernet, so the
  edges are decided one at a time in a random order, each by the op whose
  removal from the trained supernet (its weight masked to zero, the others left
  as they are) costs the most validation accuracy; the edge is then fixed to
  that op (one-hot) and the weights are tuned for ``tune_steps`` steps (SGD at a
  tenth of the search's learning rate, alpha frozen) before the next decision.
  See ``select``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxnas.datasets import make_preprocess
from jaxnas.models.protocol import SearchableModel, SuperNet
from jaxnas.models.registry import BUILTINS, builtin, model_of
from jaxnas.models.train import TrainConfig, TrainData, backend_options, flat_weights
from jaxnas.ops import Execution

VARIANTS = ("darts", "gdas", "darts-")
DATA_AXIS = "data"
# Built-in spaces DARTS can search (their models have a supernet; ``supernet_of``).
SPACES = tuple(BUILTINS)
SELECTIONS = ("magnitude", "perturbation")
_SELECT_SALT = 0x5E1EC7  # key stream of the perturbation selection, apart from the search's


def supernet_of(space: str, channels: int, cells: int, num_classes: int,
                remat: bool = False, execution: Execution = Execution(),
                model: SearchableModel | None = None) -> SuperNet:
  """The DARTS supernet of ``model`` (a user's ``protocol.searchable``), else of built-in
  space ``space`` (its model's ``supernet``)."""
  model = model or model_of(TrainConfig(space=space, channels=channels, cells=cells,
                                        num_classes=num_classes, execution=execution))
  if model.supernet is None:
    raise ValueError(f"the {model.name} model has no DARTS supernet")
  return model.supernet(remat, execution)


class DartsConfig(NamedTuple):
  variant: str = "darts"
  space: str = "nb201"
  order: int = 1
  epochs: int = 10
  steps_per_epoch: int = 50
  batch_size: int = 64
  channels: int = 8
  cells: int = 1
  num_classes: int = 10
  w_lr: float = 0.025
  w_momentum: float = 0.9
  w_weight_decay: float = 3e-4
  w_grad_clip: float = 5.0
  alpha_lr: float = 3e-4
  alpha_weight_decay: float = 1e-3
  tau_max: float = 10.0
  tau_min: float = 0.1
  warmup_epochs: int = 0
  remat: bool = False
  # First order: trace the supernet once for both passes (``fused_step``): the same step
  # in ~2/3 of the program (DARTS space, 3 cells: StableHLO 64K -> 41K lines, compile
  # 147 -> 107 s, same step time; BUILD_NOTES.md). False: the two-pass step.
  fused: bool = True
  # How the cell is read from the search (module docstring): "magnitude" or "perturbation".
  selection: str = "magnitude"
  selection_batches: int = 8   # perturbation: validation minibatches scoring each removal
  tune_steps: int | None = None  # perturbation: weight steps after each decision (None: an epoch)
  # The supernet's conv and pool implementations; "auto": the backend's defaults, and with
  # a mesh (data parallel) the conv "im2col" (``make_darts``).
  execution: Execution = Execution()
  # A user's model (``protocol.searchable``) searched instead of the built-in ``space``;
  # ``channels``, ``cells``, ``num_classes`` and ``execution`` are then its module's own.
  model: SearchableModel | None = None


@struct.dataclass
class DartsState:
  params: dict
  batch_stats: dict
  alpha: jax.Array        # architecture logits: float32[6, 5] or a dict (DARTS space)
  w_opt: optax.OptState   # of the flat weight vector, ``ravel_pytree(params)[0]``
  alpha_opt: optax.OptState
  key: jax.Array          # uint32[2], root key of this search
  step: jax.Array         # int32, bilevel steps done


# The search-train and search-validation splits on device: the layout of every
# population trainer's data (uint8 NHWC images, int32 labels, channel mean/std).
DartsData = TrainData


class Darts(NamedTuple):
  config: DartsConfig
  supernet: SuperNet
  mesh: Mesh | None
  init: Callable
  step: Callable
  run_epoch: Callable
  edge_weights: Callable
  mixed_hvp: Callable
  losses: Callable
  select: Callable
  cell_accuracy: Callable


def over_seeds(f, mesh: Mesh | None):
  """``f(states, data)`` for a ``Darts`` function ``f(state, data)`` (``run_epoch``,
  ``select``) over a batch of seeds' states, as ``make_darts(..., mesh)`` traced it:
  vmapped without a mesh; with one, ``lax.map`` over the seeds, each seed's batch split
  over the whole mesh. (Under vmap every conv of the supernet has per-seed kernels and
  becomes a grouped conv, which XLA's SPMD partitioner replicates over the batch: each
  device would compute all of it.)"""
  if mesh is None:
    return jax.vmap(f, in_axes=(0, None))
  return lambda states, data: jax.lax.map(lambda s: f(s, data), states)


def _flat_state(state: DartsState) -> tuple[Callable, Callable]:
  """``(to_flat, from_flat)`` for states shaped like ``state``: ``to_flat`` replaces the
  weights and the BN statistics with one vector each (``flat_weights``), ``from_flat``
  restores the pytrees, bit for bit."""
  _, _, unravel = flat_weights(state.params, state.batch_stats)

  def to_flat(s):
    flat_p, flat_s, _ = flat_weights(s.params, s.batch_stats)
    return s.replace(params=flat_p, batch_stats=flat_s)

  def from_flat(s):
    params, stats = unravel(s.params, s.batch_stats)
    return s.replace(params=params, batch_stats=stats)

  return to_flat, from_flat


def check_config(c: DartsConfig) -> None:
  if c.variant not in VARIANTS:
    raise ValueError(f"unknown DARTS variant {c.variant!r}; choose one of {', '.join(VARIANTS)}")
  if c.order not in (1, 2):
    raise ValueError(f"DARTS order must be 1 or 2, got {c.order}")
  if c.model is None and c.space not in SPACES:
    raise ValueError(f"unknown DARTS space {c.space!r}; choose one of {', '.join(SPACES)}")
  if c.variant == "gdas" and c.order != 1:
    raise ValueError("GDAS is first order (its architecture gradient is a straight-through "
                     "estimate); use --darts_order=1")
  for name in ("epochs", "steps_per_epoch", "batch_size", "channels", "cells"):
    if getattr(c, name) < 1:
      raise ValueError(f"{name} must be >= 1, got {getattr(c, name)}")
  if not 0 <= c.warmup_epochs < c.epochs:
    raise ValueError(f"warmup_epochs must be in [0, epochs={c.epochs}), got {c.warmup_epochs}")
  if c.selection not in SELECTIONS:
    raise ValueError(f"unknown DARTS selection {c.selection!r}; choose one of "
                     f"{', '.join(SELECTIONS)}")
  selections = ("magnitude",) if c.model is not None else builtin(c.space).darts_selections
  if c.selection not in selections and c.model is not None:
    raise ValueError(f"{c.selection} selection is implemented for the built-in spaces only; "
                     f"use --darts_selection=magnitude with a user's model")
  if c.selection not in selections:
    takers = [n for n, b in BUILTINS.items() if c.selection in b.darts_selections]
    raise ValueError(f"{c.selection} selection is implemented for the {' and '.join(takers)} "
                     f"space only; use --darts_selection=magnitude with --space={c.space}")
  if c.selection_batches < 1:
    raise ValueError(f"selection_batches must be >= 1, got {c.selection_batches}")
  if c.tune_steps is not None and c.tune_steps < 0:
    raise ValueError(f"tune_steps must be >= 0, got {c.tune_steps}")


def make_darts(c: DartsConfig, mesh: Mesh | None = None) -> Darts:
  """The DARTS functions of ``c``; with a ``mesh``, steps are data-parallel over its devices.

  Data parallelism is expressed as sharding, not as code: each step's train
  and validation minibatches are constrained to be split over the mesh's
  ``"data"`` axis and the state (weights, BN statistics, ``alpha``, both
  optimizer states) to be replicated, and XLA's SPMD partitioner inserts the
  all-reduces (gradients of ``w`` and ``alpha``, and BN's batch moments, so BN
  is synchronised: the maths is the single-device step's). Every device
  therefore holds the same ``alpha`` by construction, and the derived cell
  is the single-device one (tests/test_darts.py runs 1 vs 8 host devices).
  ``batch_size`` must divide evenly over the mesh.

  With a mesh, a conv left ``"auto"`` in ``c.execution`` is ``"im2col"``
  (``Execution.partitioned``; with the chunked kernel gradients of ``"taps"``, 8 host
  devices and the test supernet, the partitioner made 391 all-gathers, a program 1.8x the
  single-device one).
  """
  check_config(c)
  if mesh is not None and c.batch_size % mesh.size:
    raise ValueError(f"batch_size {c.batch_size} does not split over {mesh.size} devices; "
                     f"use a multiple of {mesh.size}")
  # what ``Darts.config`` records
  c = c._replace(execution=c.execution.partitioned(mesh).resolve())
  supernet = supernet_of(c.space, c.channels, c.cells, c.num_classes, c.remat, c.execution,
                         c.model)
  # The search's programs compile as the training programs do (LLVM at -O1 on CPU: the
  # DARTS-space supernet step compiles in less time and runs as fast, BUILD_NOTES.md).
  supernet = supernet._replace(compiler_options={
      **backend_options(), **(supernet.compiler_options or {})} or None)
  if c.variant == "darts-" and supernet.skip is None:
    raise ValueError("DARTS- adds a skip connection to every op choice, and this model has "
                     "no skip op; use --darts_variant=darts or gdas")
  net = supernet.net
  total = c.epochs * c.steps_per_epoch
  w_tx = optax.chain(optax.clip_by_global_norm(c.w_grad_clip),
                     optax.add_decayed_weights(c.w_weight_decay),
                     optax.sgd(optax.cosine_decay_schedule(c.w_lr, total, alpha=0.001 / c.w_lr),
                               momentum=c.w_momentum))
  a_tx = optax.chain(optax.add_decayed_weights(c.alpha_weight_decay),
                     optax.adam(c.alpha_lr, b1=0.5, b2=0.999))
  w_schedule = optax.cosine_decay_schedule(c.w_lr, total, alpha=0.001 / c.w_lr)

  def cell_weights(alpha, key, progress):
    n_ops = alpha.shape[-1]
    if c.variant == "gdas":
      tau = c.tau_max - (c.tau_max - c.tau_min) * progress
      gumbel = -jnp.log(-jnp.log(jax.random.uniform(key, alpha.shape, minval=1e-10,
                                                    maxval=1.0)))
      soft = jax.nn.softmax((jax.nn.log_softmax(alpha) + gumbel) / tau)
      hard = jax.nn.one_hot(jnp.argmax(soft, -1), n_ops, dtype=soft.dtype)
      return hard - jax.lax.stop_gradient(soft) + soft
    w = jax.nn.softmax(alpha)
    if c.variant == "darts-":
      beta = 1.0 - progress
      w = w + beta * jax.nn.one_hot(supernet.skip, n_ops, dtype=w.dtype)
    return w

  def edge_weights(alpha, key, step):
    """The op weights (same pytree as ``alpha``) the supernet uses at ``step``."""
    progress = step.astype(jnp.float32) / max(total - 1, 1)
    leaves, treedef = jax.tree.flatten(alpha)
    keys = [key if i == 0 else jax.random.fold_in(key, i) for i in range(len(leaves))]
    return jax.tree.unflatten(treedef, [cell_weights(a, k, progress)
                                        for a, k in zip(leaves, keys)])

  # Jitted so that flax traces the supernet once per step program, not once per call: a
  # second-order step calls it four times (plus the hvp's reverse-over-reverse), and
  # autodiff then works on the cached jaxpr. XLA inlines the call, so the compiled program
  # is the same (alphas and weights after an epoch bit-identical, order 1 and 2, GDAS);
  # tracing a second-order epoch of the test supernet: 10.7 -> 8.5 s.
  @jax.jit
  def loss_fn(params, stats, weights, x, y):
    logits, new = net.apply({"params": params, "batch_stats": stats}, x, weights, train=True,
                            mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    acc = jnp.mean(jnp.argmax(logits, -1) == y)
    return loss, (new["batch_stats"], acc)

  def losses(params, stats, alpha, key, step, x, y):
    """Loss of the supernet at ``alpha`` (for tests and logging)."""
    return loss_fn(params, stats, edge_weights(alpha, key, step), x, y)[0]

  def mixed_hvp(params, stats, alpha, key, step, x, y, v):
    """``(d2 L_train / dalpha dw) v``, exactly: ``d/dalpha <dL/dw, v>`` (reverse over reverse).

    Forward-over-reverse (``jax.jvp`` of the gradient) is not available here:
    the convolutions carry a ``custom_vjp`` (XLA:CPU needs it for fast
    backward convs, see jaxnas/ops/conv.py), and JAX cannot push tangents
    through a custom VJP. Differentiating the gradient once more in reverse
    mode gives the same exact product at about the same cost.
    """
    def directional(a):
      g = jax.grad(lambda p: loss_fn(p, stats, edge_weights(a, key, step), x, y)[0])(params)
      return sum(jnp.vdot(gi, vi) for gi, vi in zip(jax.tree.leaves(g), jax.tree.leaves(v)))
    return jax.grad(directional)(alpha)

  def init(key, data: DartsData):
    k_init, k_alpha = jax.random.split(jax.random.fold_in(key, 0x7FFFFFFF))
    dummy = jnp.zeros((1,) + data.train_images.shape[1:], jnp.float32)
    is_shape = lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x)
    shapes, treedef = jax.tree.flatten(supernet.alpha_shapes, is_leaf=is_shape)
    uniform = jax.tree.unflatten(treedef, [jnp.full(s, 1.0 / s[-1]) for s in shapes])
    variables = net.init(k_init, dummy, uniform, False)
    alpha = jax.tree.unflatten(treedef, [
        1e-3 * jax.random.normal(k_alpha if i == 0 else jax.random.fold_in(k_alpha, i), s)
        for i, s in enumerate(shapes)])
    params = variables["params"]
    return DartsState(params=params, batch_stats=variables["batch_stats"], alpha=alpha,
                      w_opt=w_tx.init(ravel_pytree(params)[0]), alpha_opt=a_tx.init(alpha),
                      key=key, step=jnp.zeros((), jnp.int32))

  def minibatch(data: DartsData, key, val: bool):
    """A random minibatch of the validation (``val``) or training split, split over the mesh."""
    images, labels = ((data.val_images, data.val_labels) if val else
                      (data.train_images, data.train_labels))
    i = jax.random.randint(key, (c.batch_size,), 0, labels.shape[0])
    x, y = make_preprocess(data.mean, data.std)(None, images[i]), labels[i]
    if mesh is not None:
      split = NamedSharding(mesh, P(DATA_AXIS))
      x, y = (jax.lax.with_sharding_constraint(a, split) for a in (x, y))
    return x, y

  def step(state: DartsState, data: DartsData):
    """One bilevel step: alpha on a validation batch, then w on a training batch."""
    k = jax.random.fold_in(state.key, state.step)
    k_t, k_v, k_g = jax.random.split(k, 3)
    xt, yt = minibatch(data, k_t, val=False)
    xv, yv = minibatch(data, k_v, val=True)
    params, stats, alpha = state.params, state.batch_stats, state.alpha

    def val_loss(p, a):
      return loss_fn(p, stats, edge_weights(a, k_g, state.step), xv, yv)

    if c.order == 1 and c.fused:
      return fused_step(state, k_g, xv, yv, xt, yt)
    if c.order == 1:
      (l_val, (_, val_acc)), g_alpha = jax.value_and_grad(
          lambda a: val_loss(params, a), has_aux=True)(alpha)
    else:
      xi = w_schedule(state.step)
      g_w = jax.grad(lambda p: loss_fn(p, stats, edge_weights(alpha, k_g, state.step), xt,
                                       yt)[0])(params)
      unrolled = jax.tree.map(lambda p, g: p - xi * g, params, g_w)
      (l_val, (_, val_acc)), (v, g_direct) = jax.value_and_grad(
          val_loss, argnums=(0, 1), has_aux=True)(unrolled, alpha)
      hvp = mixed_hvp(params, stats, alpha, k_g, state.step, xt, yt, v)
      g_alpha = jax.tree.map(lambda d, h: d - xi * h, g_direct, hvp)
    alpha, alpha_opt = alpha_update(state, g_alpha)
    weights = edge_weights(alpha, k_g, state.step)
    (l_train, (stats, train_acc)), g_w = jax.value_and_grad(loss_fn, has_aux=True)(
        params, state.batch_stats, weights, xt, yt)
    params, w_opt = weight_update(g_w, state.w_opt, params)
    new = state.replace(params=params, batch_stats=stats, alpha=alpha, w_opt=w_opt,
                        alpha_opt=alpha_opt, step=state.step + 1)
    return finish(new, l_train, train_acc, l_val, val_acc)

  def flat_weight_update(flat_g, w_opt, flat_p):
    """``(flat_p, w_opt)`` after one SGD step on the flat gradient ``flat_g``: on flat
    vectors (``ravel_pytree``) the update (clipping, weight decay, momentum) is a few
    kernels instead of a few per weight array (the DARTS-space supernet has ~170), which
    XLA compiles one by one."""
    updates, w_opt = w_tx.update(flat_g, w_opt, flat_p)
    return optax.apply_updates(flat_p, updates), w_opt

  def weight_update(g_w, w_opt, params):
    """``(params, w_opt)`` after one SGD step on the gradient pytree ``g_w``."""
    flat, unravel = ravel_pytree(params)
    flat, w_opt = flat_weight_update(ravel_pytree(g_w)[0], w_opt, flat)
    return unravel(flat), w_opt

  def alpha_update(state, g_alpha):
    """``(alpha, alpha_opt)`` after one Adam step on ``g_alpha``."""
    a_updates, alpha_opt = a_tx.update(g_alpha, state.alpha_opt, state.alpha)
    alpha = optax.apply_updates(state.alpha, a_updates)
    if c.warmup_epochs:
      # Warm-up (PC-DARTS): the weights train under the initial, near-uniform alpha
      # first, so that untrained convolutions do not lose every edge to the
      # parameter-free ops. The alpha pass still runs (one traced step), unused.
      frozen = state.step < c.warmup_epochs * c.steps_per_epoch
      keep = lambda new, old: jnp.where(frozen, old, new)
      alpha = jax.tree.map(keep, alpha, state.alpha)
      alpha_opt = jax.tree.map(keep, alpha_opt, state.alpha_opt)
    return alpha, alpha_opt

  def finish(new, l_train, train_acc, l_val, val_acc):
    if mesh is not None:
      new = jax.lax.with_sharding_constraint(new, NamedSharding(mesh, P()))
    return new, {"train_loss": l_train, "train_acc": train_acc, "val_loss": l_val,
                 "val_acc": val_acc}

  def fused_step(state, k_g, xv, yv, xt, yt):
    """The first-order step with the supernet traced once: a two-iteration scan whose body
    takes the loss's gradient in both ``w`` and ``alpha`` on one batch, applying the alpha
    gradient on the validation batch, then the ``w`` gradient on the training batch.

    The same maths as the two-pass step (the validation pass discards its BN
    statistics and ``w`` gradient, the training pass its ``alpha`` gradient) in
    half the program, so about half the compile time (the DARTS-space supernet
    compiles for many minutes), for the validation pass's unneeded kernel gradients.
    Weights and BN statistics cross the scan as flat vectors (``ravel_pytree``), so
    the update and the choice between the passes' results are one kernel each, not
    one per array (DARTS-space supernet: ~3200 of the step's ~12500 fusions were
    those per-array updates and selects).
    """
    xs, ys = jnp.stack([xv, xt]), jnp.stack([yv, yt])
    flat_p, flat_s, unravel = flat_weights(state.params, state.batch_stats)

    def body(carry, inputs):
      flat_p, flat_s, w_opt, alpha, alpha_opt = carry
      is_train, x, y = inputs
      weights_of = lambda a: edge_weights(a, k_g, state.step)
      (loss, (stats, acc)), (g_w, g_alpha) = jax.value_and_grad(
          lambda p, a: loss_fn(*unravel(p, flat_s), weights_of(a), x, y),
          argnums=(0, 1), has_aux=True)(flat_p, alpha)
      new_alpha, new_alpha_opt = alpha_update(state.replace(alpha=alpha, alpha_opt=alpha_opt),
                                              g_alpha)
      new_p, new_w_opt = flat_weight_update(g_w, w_opt, flat_p)
      pick = lambda new, old: jax.tree.map(lambda a, b: jnp.where(is_train, a, b), new, old)
      carry = (pick(new_p, flat_p),
               pick(ravel_pytree(stats)[0], flat_s), pick(new_w_opt, w_opt),
               pick(alpha, new_alpha), pick(alpha_opt, new_alpha_opt))
      return carry, (loss, acc)

    carry = (flat_p, flat_s, state.w_opt, state.alpha, state.alpha_opt)
    (flat_p, flat_s, w_opt, alpha, alpha_opt), (loss, acc) = jax.lax.scan(
        body, carry, (jnp.arange(2) == 1, xs, ys))
    params, stats = unravel(flat_p, flat_s)
    new = state.replace(params=params, batch_stats=stats, w_opt=w_opt, alpha=alpha,
                        alpha_opt=alpha_opt, step=state.step + 1)
    return finish(new, loss[1], acc[1], loss[0], acc[0])

  def run_epoch(state: DartsState, data: DartsData):
    """``steps_per_epoch`` bilevel steps; returns the state and epoch-mean metrics.

    The weights and BN statistics cross the steps' loop as two flat vectors
    (``ravel_pytree``), not one array each: XLA's loop passes (copy insertion first)
    take time per carried array, and the DARTS-space supernet has ~250."""
    to_flat, from_flat = _flat_state(state)

    def body(flat, _):
      new, metrics = step(from_flat(flat), data)
      return to_flat(new), metrics

    flat, metrics = jax.lax.scan(body, to_flat(state), None, length=c.steps_per_epoch)
    state = from_flat(flat)
    metrics = jax.tree.map(jnp.mean, metrics)
    metrics["arch"] = supernet.derive(state.alpha)
    metrics["skip_count"] = supernet.skip_count(metrics["arch"])
    return state, metrics

  tune_tx = optax.chain(optax.clip_by_global_norm(c.w_grad_clip),
                        optax.add_decayed_weights(c.w_weight_decay),
                        optax.sgd(c.w_lr / 10, momentum=c.w_momentum))
  tune_steps = c.steps_per_epoch if c.tune_steps is None else c.tune_steps

  def select(state: DartsState, data: DartsData):
    """The cell of ``state`` by perturbation (DARTS-PT); ``(arch int32[6], info)``.

    Edges are decided in a random order (keyed by the search's key). For the
    edge at hand, each op is removed in turn (its weight in the projected op
    weights set to zero: decided edges one-hot, the others softmax(alpha), not
    renormalised) and the supernet's accuracy measured on the same
    ``selection_batches`` validation minibatches (BN in batch-statistics mode,
    as in the search); the op whose removal leaves the lowest accuracy is kept.
    Between decisions the weights take ``tune_steps`` SGD steps under the new
    projection (one optimizer state for the whole selection, fresh at its
    start). ``info``: ``order`` (edges in decision order), ``removal_acc``
    (``float[6, 5]``, row i the accuracies of decision i) and ``base_acc``
    (``float[6]``, decision i's accuracy with nothing removed). Pure, jittable and
    vmappable over seeds; the search's state is not changed.
    """
    n_edges, n_ops = supernet.alpha_shapes
    key = jax.random.fold_in(state.key, _SELECT_SALT)
    order = jax.random.permutation(jax.random.fold_in(key, 0), n_edges)
    eval_keys = jax.random.split(jax.random.fold_in(key, 1), c.selection_batches)
    soft = jax.nn.softmax(state.alpha)

    def projected(chosen):  # chosen[e] = op of a decided edge, -1 while undecided
      one_hot = jax.nn.one_hot(chosen, n_ops, dtype=soft.dtype)
      return jnp.where((chosen >= 0)[:, None], one_hot, soft)

    def accuracy(params, stats, weights):
      def one(k):
        x, y = minibatch(data, k, val=True)
        logits, _ = net.apply({"params": params, "batch_stats": stats}, x, weights,
                              train=True, mutable=["batch_stats"])
        return jnp.mean(jnp.argmax(logits, -1) == y)
      return jnp.mean(jax.lax.map(one, eval_keys))

    # Weights, BN statistics and momentum cross the loops as flat vectors (as in run_epoch).
    flat_p0, flat_s0, unravel = flat_weights(state.params, state.batch_stats)

    def tune(carry, i):
      flat_p, flat_s, opt, chosen = carry
      weights = projected(chosen)

      def body(inner, t):
        flat_p, flat_s, opt = inner
        x, y = minibatch(data, jax.random.fold_in(jax.random.fold_in(key, 2 + i), t), val=False)
        (_, (stats, _)), g = jax.value_and_grad(
            lambda p: loss_fn(*unravel(p, flat_s), weights, x, y),
            has_aux=True)(flat_p)
        updates, opt = tune_tx.update(g, opt, flat_p)
        return (optax.apply_updates(flat_p, updates), ravel_pytree(stats)[0], opt), None

      (flat_p, flat_s, opt), _ = jax.lax.scan(body, (flat_p, flat_s, opt),
                                              jnp.arange(tune_steps))
      return flat_p, flat_s, opt, chosen

    def decide(carry, i):
      flat_p, flat_s, opt, chosen = carry
      params, stats = unravel(flat_p, flat_s)
      e = order[i]
      # Candidate o < n_ops: the projected weights with op o of edge e masked out;
      # candidate n_ops: nothing removed (the accuracy each removal is measured against).
      remove = jnp.concatenate([jnp.eye(n_ops), jnp.zeros((1, n_ops))])
      keep = 1.0 - jax.nn.one_hot(e, n_edges)[None, :, None] * remove[:, None, :]
      accs = jax.vmap(lambda w: accuracy(params, stats, w))(projected(chosen)[None] * keep)
      best = jnp.argmin(accs[:n_ops]).astype(jnp.int32)
      carry = (flat_p, flat_s, opt, chosen.at[e].set(best))
      # The index is the same for every seed, so under vmap this stays a conditional:
      # no tuning after the last decision.
      carry = jax.lax.cond(i < n_edges - 1, tune, lambda c_, _: c_, carry, i)
      return carry, (accs[:n_ops], accs[n_ops])

    carry = (flat_p0, flat_s0, tune_tx.init(flat_p0), jnp.full((n_edges,), -1, jnp.int32))
    (_, _, _, chosen), (accs, base) = jax.lax.scan(decide, carry, jnp.arange(n_edges))
    return chosen, {"order": order, "removal_acc": accs, "base_acc": base}

  def cell_accuracy(state: DartsState, data: DartsData, arch):
    """Validation accuracy of the discrete cell ``arch`` with the supernet's trained weights
    (its one-hot op weights, ``SuperNet.weights_of``): the derived cell's own inherited-weight
    accuracy, as one-shot methods score a subnetwork (Bender et al. 2018; Guo et al. 2020),
    not the mixed supernet's that the search optimises. Over the whole search-validation
    split in order, in minibatches of ``batch_size`` (a last partial one dropped), BN on
    each batch's statistics as in the search and the perturbation selection. Pure and
    deterministic; vmappable over seeds."""
    weights = supernet.weights_of(arch)
    n = data.val_labels.shape[0]
    size = min(c.batch_size, n)
    prep = make_preprocess(data.mean, data.std)

    def one(i):
      x = jax.lax.dynamic_slice_in_dim(data.val_images, i * size, size)
      y = jax.lax.dynamic_slice_in_dim(data.val_labels, i * size, size)
      x = prep(None, x)
      if mesh is not None:
        split = NamedSharding(mesh, P(DATA_AXIS))
        x, y = (jax.lax.with_sharding_constraint(a, split) for a in (x, y))
      logits, _ = net.apply({"params": state.params, "batch_stats": state.batch_stats}, x,
                            weights, train=True, mutable=["batch_stats"])
      return jnp.sum(jnp.argmax(logits, -1) == y)

    correct = jax.lax.map(one, jnp.arange(n // size))
    return jnp.sum(correct) / ((n // size) * size)

  return Darts(c, supernet, mesh, init, step, run_epoch, edge_weights, mixed_hvp, losses, select,
               cell_accuracy)
