"""Zero-cost proxies: score untrained networks of any searchable model, a population per call.

A zero-cost proxy ranks untrained networks from one minibatch (or none), so a
search can look at thousands of architectures for the price of a few trainings.
This module computes them for a whole population in one ``vmap`` over the
arch-as-data network of a ``SearchableModel`` (``jaxnas.models.protocol``):
NAS-Bench-201's by default (``model=None``: ``op_impl="onehot"``, which vmaps
without batched kernels, see ``make_scorer``), or any other, a user's
``jaxnas.searchable`` model included:

* ``naswot`` (Mellor et al. 2021, "Neural Architecture Search without
  Training", v2): ``log|det K|`` of the kernel ``K[i, j] = N_A - hamming(c_i,
  c_j)`` of the binary codes ``c_i`` (which units are positive) at the input
  of every ReLU of the network for image ``i``: distinct codes per image mean
  the network already separates the inputs.
* ``synflow`` (Tanaka et al. 2020, "Pruning neural networks without any data
  by iteratively conserving synaptic flow"), as used for NAS by Abdelfattah et
  al. 2021: parameters replaced by their absolute values, BN off, an all-ones
  input of batch 1, ``R = sum(logits)`` and the score ``sum |theta * dR/dtheta|``
  over conv and linear weights. Returned as its natural log (see
  ``_log_synflow`` for the exact rescaling that keeps float32 from overflowing).
* ``grad_norm`` (Abdelfattah et al. 2021, "Zero-Cost Proxies for Lightweight
  NAS"): sum over conv/linear layers of ``||dL/dW||_2`` for the cross-entropy
  loss of the minibatch, BN in training mode.
* ``snip`` (Lee et al. 2019, as a NAS proxy in Abdelfattah et al. 2021): sum
  over conv/linear weights of ``|theta * dL/dtheta|``.
* ``jacov`` (Mellor et al. 2021 v1, Abdelfattah et al.'s ``jacob_cov``):
  ``-sum(log(v + k) + 1 / (v + k))``, ``k = 1e-5``, over the eigenvalues ``v``
  of the correlation matrix of the per-image input gradients of ``sum(logits)``.
* ``params`` and ``flops``: the specialised network's size (``model.cost``),
  the baselines every proxy must beat (White et al. 2022, "A Deeper Look at
  Zero-Cost Proxies").

Where NASWOT looks (its activation codes) is the model's: ``model.relu_probe``
records the input of every ReLU the member uses (NAS-Bench-201's: before each
conv op its cell chose, in the reduction blocks, after the last BN). A model
without one (a ``searchable`` model) gets ``output_probe``: the member runs as
the one-hot relaxation of its architecture (``space.relax``: every choice a
``Mixture`` whose chosen candidate has weight 1, which computes exactly that
member), and the codes are taken at the output of every BatchNorm
(``jaxnas.nn``'s, ``jaxnas.ops``' or flax's): the ReLU inputs of conv-BN-ReLU
networks, Mellor et al.'s hooks. Each code kernel is weighted by ``jaxnas.nn.gate()``,
so a candidate the member did not choose and a block past its depth count for
nothing, and its units are those nonzero on some image of the batch (the inactive
channels of an elastic width are exact zeros on every image: not units of this
member). NASWOT of a member is then that of its specialised network with the same
convention. Relaxing (rather than running the int32 arrays) also keeps every
candidate an ordinary call that an interceptor can see, not a ``lax.switch`` or
``nn.cond`` branch whose tracers it could not hand out. The other proxies see the
same network (outputs and gradients equal in either form).

Higher is better for every proxy. A member whose output does not depend on its
input (the all-``none`` NB201 cell, or any cell with no path from input to output;
a ``searchable`` model's member whose only route is a ``zero`` op) computes a
constant, so every proxy would be degenerate there (``log 0``, ``0/0``): those
members score ``WORST = -inf`` in every proxy, as does any non-finite value, so a
degenerate member can never come out NaN or above a real one. Which members are
degenerate is ``model.connected`` (NB201: a path of non-``none`` edges) or, where
a model has none, those whose input gradient of the cross-entropy loss (training
mode, one backward pass shared with grad_norm/snip, and run for this alone where only
synflow, params or flops are asked for) is exactly zero.
``zero_cost_evaluator`` hands the search a finite floor instead (``floor``): the
search loop would count ``-inf`` as a failed evaluation and record it as 0, which
is above every ``jacov`` score.

Conventions shared by the proxies: parameters come from one ``init`` per call
(``shared_init=True``): members differ only in their ops, not in their random
weights (common random numbers, less noise in the ranking); proxies that use
weights count conv kernels and the classifier matrix only (not BN, not biases),
as the reference implementations do. Architectures are canonicalised first
(``space.canonical``), so two vectors of one network score identically.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxnas import nn as jnn
from jaxnas import ops
from jaxnas.estimators.base import Evaluator
from jaxnas.models import registry
from jaxnas.models.protocol import SearchableModel, check_head, cost_report, head_width
from jaxnas.models.train import TrainConfig
from jaxnas.ops import Execution
from jaxnas.spaces import Space

PROXIES = ("naswot", "synflow", "grad_norm", "snip", "jacov", "params", "flops")
WORST = -jnp.inf
# The modules whose outputs ``output_probe`` takes NASWOT's codes at (outermost only:
# ``jaxnas.ops.BatchNorm`` wraps a flax one).
BATCH_NORMS = (jnn.BatchNorm, ops.BatchNorm, nn.BatchNorm)
_SHARED_PASS = ("naswot", "grad_norm", "snip", "jacov")  # one forward pass serves all four
_SYNFLOW_PROBE = 64  # first synflow pass runs at input scale 2**-64 (see _log_synflow)
_HI = jax.lax.Precision.HIGHEST

# NAS-Bench-201's cell connectivity (``model.connected`` of the registry's model).
is_connected = registry.nb201_connected


def check_proxies(proxies: Sequence[str]) -> tuple[str, ...]:
  """Validates proxy names at the edge; returns them as a tuple (a hashable static argument)."""
  proxies = (proxies,) if isinstance(proxies, str) else tuple(proxies)
  bad = [p for p in proxies if p not in PROXIES]
  if bad or not proxies:
    raise ValueError(f"unknown zero-cost proxy {bad or proxies!r}; choose from {', '.join(PROXIES)}")
  return proxies


def _flax_init(net, key, images, arch):
  return net.init(key, images, arch, train=False)


@functools.lru_cache(maxsize=32)
def default_model(channels: int = 16, cells: int = 1, num_classes: int = 10,
                op_impl: str = "onehot", execution: Execution = Execution(),
                space: str = "nb201") -> SearchableModel:
  """What ``model=None`` scores: the registry's model of built-in ``space`` with these
  fields (``registry.model_of(TrainConfig(...))``), its weights drawn by flax's own
  ``init`` (the draws every NB201 zero-cost score has been computed with)."""
  config = TrainConfig(space=space, channels=channels, cells=cells, num_classes=num_classes,
                       op_impl=op_impl, execution=execution)
  return registry.model_of(config)._replace(init=_flax_init)


def _nb201_of(net) -> SearchableModel:
  return default_model(net.channels, net.cells, net.num_classes, net.op_impl, net.execution)


def _is_weight(path) -> bool:
  """Conv kernels (``kernel``, ``stem``, ``shortcut``) and the classifier matrix; not BN or biases."""
  return getattr(path[-1], "key", None) not in ("scale", "bias")


def _weights(tree) -> list:
  return [x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if _is_weight(p)]


def _code_kernel(x, active=None) -> jax.Array:
  """``K[i, j] = #units where codes i and j agree`` for the ReLU input ``x`` (batch first).

  ``c c^T + (1 - c)(1 - c)^T = D - |c_i| - |c_j| + 2 c_i . c_j`` with one
  matmul; the counts are integers below 2**24, exact in float32. ``active``
  (bool, ``x.shape[1:]``) restricts the units to those it marks, where ``x``
  is zero on every image elsewhere (so ``c`` is 0 there): ``D = sum(active)``.
  """
  c = jax.lax.stop_gradient(x > 0).reshape(x.shape[0], -1).astype(jnp.float32)
  s = c.sum(1)
  d = c.shape[1] if active is None else jnp.sum(active, dtype=jnp.float32)
  return d - s[:, None] - s[None, :] + 2.0 * jnp.dot(c, c.T, precision=_HI)


def _recorder(kernels: list, units: list) -> Callable:
  """The ``record(x, weight=None, active=None)`` a ``relu_probe`` calls: adds the code
  kernel of ``x`` and its number of units, both times ``weight`` (None: 1), to the
  trace-local lists. ``active``: which units of ``x`` count (None: all; see ``_code_kernel``)."""
  def record(x, weight=None, active=None):
    kernel = _code_kernel(x, active)
    if active is not None:
      n = jnp.sum(active, dtype=jnp.float32)
    else:
      n = float(np.prod(x.shape[1:])) if weight is None else np.prod(x.shape[1:])
    if weight is not None:
      kernel, n = weight * kernel, weight * n
    kernels.append(kernel)
    units.append(n)

  return record


def output_probe(space: Space | None = None, modules: tuple = BATCH_NORMS) -> Callable:
  """The ``relu_probe`` of a model without its own: codes at the output of every
  ``modules`` instance (the ReLU inputs of conv-BN-ReLU networks).

  With ``space`` (it must ``relax``) the member runs as its one-hot relaxation and each
  output is weighted by ``jaxnas.nn.gate()`` (1 in the chosen candidates, 0 elsewhere);
  with ``space=None`` ``arch`` is applied as given (e.g. a specialised network's Python
  ints). A module called inside another of ``modules`` is not counted twice. The units of
  an output are those nonzero on some image (module docstring). Outputs traced inside a
  flax lifted transform (``nn.scan``, ``nn.remat``, ``nn.cond``) cannot leave it through
  an interceptor: a model that has its BNs there needs its own ``relu_probe``.
  """
  if space is not None and space.relax is None:
    raise ValueError(f"space {space.name!r} cannot relax (space.relax is None): give the model "
                     "a relu_probe for naswot")

  def relaxed(arch):
    if space is None:
      return arch
    v = space.canonical(space.to_vector(arch))
    return space.relax([jax.nn.one_hot(v[d], k, dtype=jnp.float32)
                        for d, k in enumerate(space.cardinalities)])

  def probe(net, variables, images, arch, record, **kwargs):
    depth = [0]

    def interceptor(next_fun, args, kwargs_, context):
      if context.method_name != "__call__" or not isinstance(context.module, modules):
        return next_fun(*args, **kwargs_)
      depth[0] += 1
      try:
        out = next_fun(*args, **kwargs_)
      finally:
        depth[0] -= 1
      if depth[0] == 0:
        record(out, jnn.gate(), active=jnp.any(out != 0, axis=0))
      return out

    with nn.intercept_methods(interceptor):
      return net.apply(variables, images, relaxed(arch), **kwargs)

  return probe


def _probe_of(model: SearchableModel) -> Callable | None:
  """The model's ``relu_probe``, else ``output_probe`` where its space relaxes, else None."""
  if model.relu_probe is not None:
    return model.relu_probe
  return output_probe(model.space) if model.space.relax is not None else None


def _check_probe(model: SearchableModel) -> Callable:
  probe = _probe_of(model)
  if probe is None:
    raise ValueError(f"naswot needs the ReLU inputs of model {model.name!r}: give it a "
                     "relu_probe, or a space that relaxes (jaxnas.declare)")
  return probe


def naswot_kernel(net, variables, arch, images, model: SearchableModel | None = None,
                  probe: Callable | None = None):
  """Mellor et al.'s ``K`` (float32[B, B]) and the total number of ReLU units ``N_A``.

  ``net`` is ``model``'s arch-as-data network (None: an ``NB201Network``) and ``arch``
  one member; ``probe`` (a ``relu_probe``) overrides the model's, e.g.
  ``output_probe()`` for a specialised network called with its Python ints.
  """
  probe = probe or _check_probe(model or _nb201_of(net))
  kernels, units = [], []
  probe(net, variables, images, arch, _recorder(kernels, units), train=True,
        mutable=["batch_stats"])
  return sum(kernels), sum(units)


def _logdet_codes(kernel, units):
  """``log|det K|``, computed on ``K / N_A`` (entries in [0, 1]) and shifted back exactly."""
  _, logdet = jnp.linalg.slogdet(kernel / units)
  return logdet + kernel.shape[0] * jnp.log(units)


def _log_synflow(net, variables, arch, image_shape):
  """Natural log of synflow, exact up to float32 rounding for any network depth.

  With |params|, BN in eval mode at its initial statistics (mean 0, var 1:
  the identity up to 1/sqrt(1 + 1e-5); Abdelfattah et al. remove BN) and zero
  biases, the network is linear and positive in its input, so scaling the
  input by ``s`` and the output's cotangent by ``t`` scales every
  ``theta * dR/dtheta`` by exactly ``s * t`` (powers of two: no rounding).
  Pass 1 measures ``R ~ 2**k`` at a tiny input scale; pass 2 uses
  ``s * t = 2**-k`` split evenly, so activations stay near ``2**(k/2)`` at most
  and the products sum to about the mean path depth, far from float32's
  limits even where ``R`` itself (or its gradient) would overflow. Traced under
  ``jaxnas.nn.linearized()``: a bounded activation (``jnn.relu6``) is its unbounded form,
  else activations past its bound would clip and members would tie.
  """
  params = jax.tree_util.tree_map(jnp.abs, variables["params"])
  ones = jnp.ones((1,) + tuple(image_shape), jnp.float32)

  def out_sum(p, scale):
    with jnn.linearized():  # ReLU6 as ReLU: the linear network SynFlow scores
      logits = net.apply({**variables, "params": p}, ones * scale, arch, train=False)
    return jnp.sum(logits)

  r = out_sum(params, jnp.ldexp(jnp.float32(1), -_SYNFLOW_PROBE))
  k = jnp.where(r > 0, jnp.round(jnp.log2(jnp.where(r > 0, r, 1.0))), 0).astype(jnp.int32)
  k = k + _SYNFLOW_PROBE
  k_in = k // 2
  s = jnp.ldexp(jnp.float32(1), -k_in)
  t = jnp.ldexp(jnp.float32(1), -(k - k_in))
  grads = jax.grad(lambda p: t * out_sum(p, s))(params)
  total = sum(jnp.sum(jnp.abs(w * g)) for w, g in zip(_weights(params), _weights(grads)))
  return jnp.log(total) + k.astype(jnp.float32) * jnp.log(2.0)


def _jacov_score(jac):
  """Abdelfattah et al.'s ``jacob_cov`` of per-image input gradients ``jac`` (float32[B, ...])."""
  v = jnp.linalg.eigvalsh(jnp.corrcoef(jac.reshape(jac.shape[0], -1)))
  return -jnp.sum(jnp.log(v + 1e-5) + 1.0 / (v + 1e-5))


def _member(net, variables, arch, images, labels, proxies, model, num_classes):
  """``(raw proxies, connected)`` of one member; ``connected`` None where the model
  decides it (``model.connected``), else whether the loss's input gradient is nonzero."""
  out, connected = {}, None
  generic = model.connected is None
  if generic or any(p in proxies for p in _SHARED_PASS):
    probe = _probe_of(model)  # the same network form whichever proxies are asked for

    def forward(params, x):
      kernels, units = [], []
      v, kw = {**variables, "params": params}, dict(train=True, mutable=["batch_stats"])
      if probe is None:
        logits, _ = net.apply(v, x, arch, **kw)
      else:
        logits, _ = probe(net, v, x, arch, _recorder(kernels, units), **kw)
      return logits, (sum(kernels, jnp.float32(0)), sum(units, jnp.float32(0)))

    logits, backward, (kernel, units) = jax.vjp(forward, variables["params"], images, has_aux=True)
    if "naswot" in proxies:
      out["naswot"] = _logdet_codes(kernel, units)
    if "grad_norm" in proxies or "snip" in proxies or generic:
      # d(mean cross-entropy)/d(logits), the cotangent of the loss gradient.
      onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
      grads, dx = backward((jax.nn.softmax(logits) - onehot) / logits.shape[0])
      ws, gs = _weights(variables["params"]), _weights(grads)
      out["grad_norm"] = sum(jnp.sqrt(jnp.sum(g * g)) for g in gs)
      out["snip"] = sum(jnp.sum(jnp.abs(w * g)) for w, g in zip(ws, gs))
      if generic:
        connected = jnp.any(dx != 0)
    if "jacov" in proxies:
      out["jacov"] = _jacov_score(backward(jnp.ones_like(logits))[1])
  if "synflow" in proxies:
    out["synflow"] = _log_synflow(net, variables, arch, images.shape[1:])
  if "params" in proxies or "flops" in proxies:
    out["params"], out["flops"] = model.cost(arch, images.shape[1:], num_classes)
  return {p: jnp.asarray(out[p], jnp.float32) for p in proxies}, connected


def member_scores(net, variables, arch, images, labels, proxies: Sequence[str] = PROXIES,
                  model: SearchableModel | None = None, num_classes: int | None = None) -> dict:
  """Proxies of one member ``arch`` of ``model`` (None: NB201, ``net`` an ``NB201Network``
  and ``arch`` its ``int32[6]``) with ``variables`` of its arch-as-data network ``net``:
  dict of float32 scalars.

  Raw values: a degenerate member is not special-cased here (see ``make_scorer``).
  naswot, grad_norm, snip and jacov share one forward pass in training mode
  (its ReLU codes, then one backward pass per cotangent: the loss gradient for
  grad_norm/snip, all-ones logits for jacov's input gradients). ``num_classes``
  is what ``model.cost`` is told (None: the network's number of logits).
  """
  if model is None:
    model, num_classes = _nb201_of(net), net.num_classes
  if num_classes is None:
    num_classes = head_width(model, tuple(images.shape[1:]))
  proxies = check_proxies(proxies)
  if "naswot" in proxies:
    _check_probe(model)
  return _member(net, variables, arch, images, labels, proxies, model, num_classes)[0]


def make_scorer(proxies: Sequence[str] = PROXIES, channels: int = 16, cells: int = 1,
                num_classes: int = 10, op_impl: str = "onehot", shared_init: bool = True,
                chunk: int | None = None, execution: Execution = Execution(),
                model: SearchableModel | None = None, space: str = "nb201") -> Callable:
  """``score(archs, key, images, labels) -> {proxy: float32[P]}`` for a population ``archs``.

  Pure and jittable. ``model``: whose architectures ``archs`` are (a population: the
  space's pytree with a leading axis) and whose arch-as-data network scores them; None:
  the built-in ``space`` (``default_model`` of ``channels``, ``cells``, ``num_classes``,
  ``op_impl``, ``execution``; NAS-Bench-201 by default, ``archs`` ``int32[P, 6]``),
  otherwise those are the model's and ignored. ``images`` is one float32 NHWC minibatch (already normalised), ``labels`` its
  int32 classes; ``key`` draws the initial weights (``model.init``), one draw for all
  members when ``shared_init`` (else one per member). NB201's ``op_impl``:
  ``"onehot"`` (default) keeps the weights unbatched under ``vmap``, so each conv of the
  population is one ordinary conv over ``P * B`` images; ``"kernel"`` gives the same
  numbers with grouped convs (cheaper where those are fast: accelerators). ``chunk``
  bounds memory: the population is vmapped ``chunk`` members at a time with
  ``lax.map``. ``execution``: the conv and pool implementations (``jaxnas.ops.Execution``).
  Degenerate members and non-finite values score ``WORST`` (module docstring).
  """
  proxies = check_proxies(proxies)
  classes = None
  if model is None:
    if op_impl not in ("onehot", "kernel"):
      raise ValueError(f"op_impl {op_impl!r} does not vmap into one program; use onehot or kernel")
    model = default_model(channels, cells, num_classes, op_impl, execution, space)
    classes = num_classes
  if "naswot" in proxies:
    _check_probe(model)
  net, space = model.network(None), model.space

  def init(key, images):
    # Drawn with XLA's RngBitGenerator, seeded from ``key``: flax's per-parameter
    # threefry draws compiled 4x slower (20 s vs 5 s on 2 CPU cores) for no
    # statistical gain here. Deterministic per key and backend.
    seed = jax.random.bits(key, (4,), jnp.uint32)
    rbg_key = jax.random.wrap_key_data(seed, impl="rbg")
    first = space.from_vector(jnp.zeros(space.num_decisions, jnp.int32))
    return model.init(net, rbg_key, images[:1], first)

  def score(archs, key, images, labels):
    archs = np.asarray(archs) if isinstance(archs, list) else archs
    archs = jax.vmap(lambda a: space.from_vector(space.canonical(space.to_vector(a))))(archs)
    images = jnp.asarray(images, jnp.float32)
    width = classes or head_width(model, tuple(images.shape[1:]))
    one = lambda a, v: _member(net, v, a, images, labels, proxies, model, width)
    if shared_init:
      variables = init(key, images)
      f, xs = (lambda x: one(x, variables)), archs
    else:
      keys = jax.random.split(key, jax.tree.leaves(archs)[0].shape[0])
      f, xs = (lambda x: one(x[0], init(x[1], images))), (archs, keys)
    raw, connected = jax.vmap(f)(xs) if chunk is None else jax.lax.map(f, xs, batch_size=chunk)
    ok = connected if model.connected is None else jax.vmap(model.connected)(archs)
    return {p: jnp.where(ok & jnp.isfinite(v), v, WORST) for p, v in raw.items()}

  return score


@functools.lru_cache(maxsize=32)
def _jitted_scorer(*args, model=None, space="nb201"):
  options = model.compiler_options() if model is not None else None
  return jax.jit(make_scorer(*args, model=model, space=space), compiler_options=options)


def zero_cost_scores(archs, key, images, labels, proxies: Sequence[str] = PROXIES,
                     channels: int = 16, cells: int = 1, num_classes: int = 10,
                     op_impl: str = "onehot", shared_init: bool = True,
                     chunk: int | None = None, execution: Execution = Execution(),
                     model: SearchableModel | None = None, space: str = "nb201") -> dict:
  """Every requested proxy of every member of ``archs`` (a population of ``model``'s
  architectures; None: NB201 cells ``int32[P, 6]``): ``{name: float32[P]}``.

  One compiled, vmapped program per configuration, execution resolved (cached); see
  ``make_scorer`` for the arguments. Inside your own ``jit``, call ``make_scorer(...)``
  instead.
  """
  score = _jitted_scorer(check_proxies(proxies), channels, cells, num_classes, op_impl,
                         shared_init, chunk, execution.resolve(), model=model, space=space)
  return score(archs, key, images, labels)


def floor(proxy: str, batch_size: int) -> float:
  """A finite score at or below the proxy's value for every connected cell (the evaluator's worst).

  naswot: ``K`` has integer entries, so a nonsingular ``K`` has ``|det K| >= 1``
  and ``log|det K| >= 0``. grad_norm, snip, params, flops: non-negative.
  jacov: the correlation matrix has trace ``B`` and no negative eigenvalue, so
  with ``f(v) = log(v + k) + 1/(v + k)`` convex the score is at least
  ``-((B - 1) f(0) + f(B))``. synflow (its log) has no bound in theory; 0
  (synflow = 1) is below every NB201 network we measured (>= 13 at C = 4).
  """
  if proxy == "jacov":
    f = lambda v: np.log(v + 1e-5) + 1.0 / (v + 1e-5)
    return float(-((batch_size - 1) * f(0.0) + f(float(batch_size))))
  check_proxies((proxy,))
  return 0.0


def fixed_minibatch(dataset: str = "fashion_mnist", data_dir: str | None = None,
                    batch_size: int = 64, seed: int = 0, pool: int = 1):
  """``pool`` stacked minibatches of training images (normalised float32) and labels.

  Drawn without replacement with numpy's PCG64, so the same ``seed`` always
  scores on the same images, whatever the JAX version or backend.
  """
  from jaxnas.datasets import load_dataset, normalize
  ds = load_dataset(dataset, data_dir)
  idx = np.random.default_rng(seed).choice(len(ds.train_labels), pool * batch_size, replace=False)
  images = np.asarray(normalize(ds.train_images[idx], ds.mean, ds.std))
  labels = ds.train_labels[idx].astype(np.int32)
  shape = (pool, batch_size)
  return images.reshape(shape + images.shape[1:]), labels.reshape(shape), ds.num_classes


def zero_cost_evaluator(proxy: str = "naswot", dataset: str = "fashion_mnist",
                        data_dir: str | None = None, batch_size: int = 64, channels: int = 16,
                        cells: int = 1, seed: int = 0, resample: bool = False,
                        op_impl: str = "onehot", chunk: int | None = None,
                        execution: Execution = Execution(),
                        model: SearchableModel | None = None, space: str = "nb201") -> Evaluator:
  """Fitness = one zero-cost proxy of a member of ``model`` (higher is better); report =
  every proxy the model supports (all of them, naswot where it has a probe).

  ``model=None``: the built-in ``space`` (``default_model`` of ``channels``, ``cells``,
  ``op_impl``, ``execution`` and the dataset's classes; the NB201 cell by default);
  otherwise its space, network and cost are the model's, and its head must have the
  dataset's classes. Named ``zero_cost/{proxy}/{dataset}/{model name}``.

  Degenerate members get the finite ``floor(proxy, batch_size)`` as fitness
  (not a failure: they are legitimately the worst); the report keeps ``WORST``.

  By default the score is a fixed function of the architecture, like a table: one
  minibatch and one initialisation, both from ``seed``, and the search key is
  ignored, so re-evaluating a member gives the same fitness. ``resample=True``
  draws the minibatch (from a pool of 16, all baked into the program) and the
  weights from the evaluation key instead. Jittable: usable inside the
  scanned search loop; the runner wires it as ``--evaluator=zero_cost``.
  """
  (proxy,) = check_proxies((proxy,))
  pool = 16 if resample else 1
  images, labels, num_classes = fixed_minibatch(dataset, data_dir, batch_size, seed, pool)
  given = model is not None
  if model is None:
    model = default_model(channels, cells, num_classes, op_impl, execution.resolve(), space)
  if given:
    check_head(model, images.shape[2:], num_classes, dataset)
  images, labels = jnp.asarray(images), jnp.asarray(labels)
  fixed_key = jax.random.PRNGKey(seed)
  kw = dict(channels=channels, cells=cells, num_classes=num_classes, op_impl=op_impl, chunk=chunk,
            execution=execution.resolve(), model=model if given else None, space=space)
  score_one = make_scorer((proxy,), **kw)
  reported = tuple(p for p in PROXIES if p != "naswot" or _probe_of(model))
  score_all = make_scorer(reported, **kw)
  name = f"zero_cost/{proxy}/{dataset}/{model.name}"

  worst = floor(proxy, batch_size)

  def evaluate(key, archs):
    if resample:
      k_batch, k_init = jax.random.split(key)
      b = jax.random.randint(k_batch, (), 0, pool)
      s = score_one(archs, k_init, images[b], labels[b])[proxy]
    else:
      s = score_one(archs, fixed_key, images[0], labels[0])[proxy]
    return jnp.where(s == WORST, worst, s)

  def report(archs):
    out = score_all(archs, fixed_key, images[0], labels[0])
    if model.latency is not None:
      out["latency"] = cost_report(model, archs, images.shape[2:], num_classes)["latency"]
    return out

  return Evaluator(name=name, space=model.space, evaluate=evaluate, report=report,
                   jittable=True)


def prefilter(space: Space, score_fn: Callable, key: jax.Array, num_candidates: int,
              keep: int):
  """The ``keep`` best of ``num_candidates`` uniform samples by ``score_fn``: ``(archs, scores)``.

  Pure and jittable (``num_candidates`` and ``keep`` static). ``score_fn(archs)
  -> float32[N]`` is any batch scorer, higher is better, e.g.
  ``lambda a: zero_cost_evaluator("naswot").evaluate(None, a)``. Duplicate
  samples and NaN scores count as ``-inf`` (never kept ahead of a real one),
  so a strategy gets distinct cells unless fewer than ``keep`` were drawn.

  Use it to seed any strategy with proxy-filtered cells: e.g. evaluate
  ``prefilter(...)[0]`` with the expensive evaluator first, or let
  ``jaxnas.strategies.prefilter.prefiltered`` filter every ``ask``.
  """
  if not 1 <= keep <= num_candidates:
    raise ValueError(f"need 1 <= keep <= num_candidates, got keep={keep}, "
                     f"num_candidates={num_candidates}")
  vectors = jax.vmap(space.sample_vector)(jax.random.split(key, num_candidates))
  archs = jax.vmap(space.from_vector)(vectors)
  scores = jnp.asarray(score_fn(archs), jnp.float32)
  same = jnp.all(vectors[:, None] == vectors[None], -1)
  dup = jnp.any(jnp.triu(same, 1), axis=0)  # every repeat after the first sample
  scores = jnp.where(dup | jnp.isnan(scores), -jnp.inf, scores)
  top, idx = jax.lax.top_k(scores, keep)
  return jax.tree_util.tree_map(lambda x: x[idx], archs), top
