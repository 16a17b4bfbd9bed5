"""Zero-cost proxies: score NAS-Bench-201 cells at initialisation, a population per call.

A zero-cost proxy ranks untrained networks from one minibatch (or none), so a
search can look at thousands of cells for the price of a few trainings. This
module computes them for a whole population ``int32[P, 6]`` in one ``vmap``
over the arch-as-data ``NB201Network`` (``op_impl="onehot"`` by default: it
vmaps without batched kernels, see ``make_scorer``):

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
* ``params`` and ``flops``: the specialised network's size (``models.cost``),
  the baselines every proxy must beat (White et al. 2022, "A Deeper Look at
  Zero-Cost Proxies").

Higher is better for every proxy. A cell with no path from its input to its
output (all ``none`` on every route, e.g. the all-``none`` cell) computes a
constant, so every proxy would be degenerate there (``log 0``, ``0/0``):
those cells score ``WORST = -inf`` in every proxy, as does any non-finite
value, so a degenerate member can never come out NaN or above a real one.
``zero_cost_evaluator`` hands the search a finite floor instead (``floor``):
the search loop would count ``-inf`` as a failed evaluation and record it as
0, which is above every ``jacov`` score.

Conventions shared by the proxies: parameters come from one ``init`` per call
(``shared_init=True``): members differ only in their ops, not in their random
weights (common random numbers, less noise in the ranking); proxies that use
weights count conv kernels and the classifier matrix only (not BN, not biases),
as the reference implementations do.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxnas.estimators.base import Evaluator
from jaxnas.models import nb201_net
from jaxnas.ops import BatchNorm, Execution
from jaxnas.spaces import Space, nb201_space

PROXIES = ("naswot", "synflow", "grad_norm", "snip", "jacov", "params", "flops")
WORST = -jnp.inf
_SHARED_PASS = ("naswot", "grad_norm", "snip", "jacov")  # one forward pass serves all four
_SYNFLOW_PROBE = 64  # first synflow pass runs at input scale 2**-64 (see _log_synflow)
_HI = jax.lax.Precision.HIGHEST


def check_proxies(proxies: Sequence[str]) -> tuple[str, ...]:
  """Validates proxy names at the edge; returns them as a tuple (a hashable static argument)."""
  proxies = (proxies,) if isinstance(proxies, str) else tuple(proxies)
  bad = [p for p in proxies if p not in PROXIES]
  if bad or not proxies:
    raise ValueError(f"unknown zero-cost proxy {bad or proxies!r}; choose from {', '.join(PROXIES)}")
  return proxies


def is_connected(arch) -> jax.Array:
  """Whether an NB201 cell has a path of non-``none`` edges from node 0 to node 3 (jittable).

  Edges are in ``spaces.nb201.EDGES`` order: 1<-0, 2<-0, 2<-1, 3<-0, 3<-1, 3<-2.
  """
  on = jnp.asarray(arch) != nb201_net.NONE
  r1 = on[..., 0]
  r2 = on[..., 1] | (r1 & on[..., 2])
  return on[..., 3] | (r1 & on[..., 4]) | (r2 & on[..., 5])


def _is_weight(path) -> bool:
  """Conv kernels (``kernel``, ``stem``, ``shortcut``) and the classifier matrix; not BN or biases."""
  return getattr(path[-1], "key", None) not in ("scale", "bias")


def _weights(tree) -> list:
  return [x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0] if _is_weight(p)]


def _code_kernel(x) -> jax.Array:
  """``K[i, j] = #units where codes i and j agree`` for the ReLU input ``x`` (batch first).

  ``c c^T + (1 - c)(1 - c)^T = D - |c_i| - |c_j| + 2 c_i . c_j`` with one
  matmul; the counts are integers below 2**24, exact in float32.
  """
  c = jax.lax.stop_gradient(x > 0).reshape(x.shape[0], -1).astype(jnp.float32)
  s = c.sum(1)
  return c.shape[1] - s[:, None] - s[None, :] + 2.0 * jnp.dot(c, c.T, precision=_HI)


def _collect_relu_codes(kernels: list, units: list):
  """A flax method interceptor adding each ReLU's code kernel to ``kernels`` (trace-local lists).

  Where NAS-Bench-201 applies a ReLU: before every conv op of a cell edge
  (only if the edge chose a conv: the arch-as-data net also runs the others),
  before both convs of a residual reduction block, and after the last BN. The
  stem (conv + BN) has none. This mirrors Mellor et al.'s forward hooks on
  every ``nn.ReLU`` of the specialised network.
  """
  def interceptor(next_fun, args, kwargs, context):
    m = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if isinstance(m, nb201_net.Edge):
      x, op = args[0], args[1]
      used = ((op == nb201_net.CONV1) | (op == nb201_net.CONV3)).astype(jnp.float32)
      kernels.append(used * _code_kernel(x))
      units.append(used * np.prod(x.shape[1:]))
    elif isinstance(m, nb201_net.ReLUConvBN) and isinstance(m.parent, nb201_net.ResidualReduction):
      kernels.append(_code_kernel(args[0]))
      units.append(float(np.prod(args[0].shape[1:])))
    out = next_fun(*args, **kwargs)
    if isinstance(m, BatchNorm) and m.name == "last_bn":
      kernels.append(_code_kernel(out))
      units.append(float(np.prod(out.shape[1:])))
    return out

  return interceptor


def naswot_kernel(net, variables, arch, images):
  """Mellor et al.'s ``K`` (float32[B, B]) and the total number of ReLU units ``N_A``."""
  kernels, units = [], []
  with nn.intercept_methods(_collect_relu_codes(kernels, units)):
    net.apply(variables, images, arch, train=True, mutable=["batch_stats"])
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
  limits even where ``R`` itself (or its gradient) would overflow.
  """
  params = jax.tree_util.tree_map(jnp.abs, variables["params"])
  stats = variables["batch_stats"]
  ones = jnp.ones((1,) + tuple(image_shape), jnp.float32)

  def out_sum(p, scale):
    logits = net.apply({"params": p, "batch_stats": stats}, ones * scale, arch, train=False)
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


def member_scores(net, variables, arch, images, labels, proxies: Sequence[str] = PROXIES) -> dict:
  """Proxies of one cell ``arch`` (``int32[6]``) with ``variables`` of ``net``: dict of float32 scalars.

  Raw values: a disconnected cell is not special-cased here (see ``make_scorer``).
  naswot, grad_norm, snip and jacov share one forward pass in training mode
  (its ReLU codes, then one backward pass per cotangent: the loss gradient for
  grad_norm/snip, all-ones logits for jacov's input gradients).
  """
  out = {}
  if any(p in proxies for p in _SHARED_PASS):
    def forward(params, x):
      kernels, units = [], []
      with nn.intercept_methods(_collect_relu_codes(kernels, units)):
        logits, _ = net.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                              arch, train=True, mutable=["batch_stats"])
      return logits, (sum(kernels), sum(units))

    logits, backward, (kernel, units) = jax.vjp(forward, variables["params"], images, has_aux=True)
    if "naswot" in proxies:
      out["naswot"] = _logdet_codes(kernel, units)
    if "grad_norm" in proxies or "snip" in proxies:
      # d(mean cross-entropy)/d(logits), the cotangent of the loss gradient.
      onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
      grads, _ = backward((jax.nn.softmax(logits) - onehot) / logits.shape[0])
      ws, gs = _weights(variables["params"]), _weights(grads)
      out["grad_norm"] = sum(jnp.sqrt(jnp.sum(g * g)) for g in gs)
      out["snip"] = sum(jnp.sum(jnp.abs(w * g)) for w, g in zip(ws, gs))
    if "jacov" in proxies:
      out["jacov"] = _jacov_score(backward(jnp.ones_like(logits))[1])
  if "synflow" in proxies:
    out["synflow"] = _log_synflow(net, variables, arch, images.shape[1:])
  if "params" in proxies or "flops" in proxies:
    params, flops = nb201_net.cost(arch, net.channels, net.cells, net.num_classes,
                                   images.shape[-1], images.shape[1])
    out["params"], out["flops"] = params, flops
  return {p: jnp.asarray(out[p], jnp.float32) for p in proxies}


def make_scorer(proxies: Sequence[str] = PROXIES, channels: int = 16, cells: int = 1,
                num_classes: int = 10, op_impl: str = "onehot", shared_init: bool = True,
                chunk: int | None = None, execution: Execution = Execution()) -> Callable:
  """``score(archs, key, images, labels) -> {proxy: float32[P]}`` for ``archs`` ``int32[P, 6]``.

  Pure and jittable. ``images`` is one float32 NHWC minibatch (already
  normalised), ``labels`` its int32 classes; ``key`` draws the initial
  weights, one draw for all members when ``shared_init`` (else one per
  member). ``op_impl``: ``"onehot"`` (default) keeps the weights unbatched
  under ``vmap``, so each conv of the population is one ordinary conv over
  ``P * B`` images; ``"kernel"`` gives the same numbers with grouped convs
  (cheaper where those are fast: accelerators). ``chunk`` bounds memory: the
  population is vmapped ``chunk`` members at a time with ``lax.map``. ``execution``: the
  conv and pool implementations (``jaxnas.ops.Execution``).
  Disconnected cells and non-finite values score ``WORST`` (module docstring).
  """
  proxies = check_proxies(proxies)
  if op_impl not in ("onehot", "kernel"):
    raise ValueError(f"op_impl {op_impl!r} does not vmap into one program; use onehot or kernel")
  net = nb201_net.NB201Network(channels=channels, cells=cells, num_classes=num_classes,
                               op_impl=op_impl, execution=execution)

  def init(key, images):
    # Drawn with XLA's RngBitGenerator, seeded from ``key``: flax's per-parameter
    # threefry draws compiled 4x slower (20 s vs 5 s on 2 CPU cores) for no
    # statistical gain here. Deterministic per key and backend.
    seed = jax.random.bits(key, (4,), jnp.uint32)
    rbg_key = jax.random.wrap_key_data(seed, impl="rbg")
    return net.init(rbg_key, images[:1], jnp.zeros(nb201_net.NUM_EDGES, jnp.int32), train=False)

  def score(archs, key, images, labels):
    archs = jnp.asarray(archs, jnp.int32)
    images = jnp.asarray(images, jnp.float32)
    one = lambda a, v: member_scores(net, v, a, images, labels, proxies)
    if shared_init:
      variables = init(key, images)
      f, xs = (lambda x: one(x, variables)), archs
    else:
      keys = jax.random.split(key, archs.shape[0])
      f, xs = (lambda x: one(x[0], init(x[1], images))), (archs, keys)
    raw = jax.vmap(f)(xs) if chunk is None else jax.lax.map(f, xs, batch_size=chunk)
    ok = is_connected(archs)
    return {p: jnp.where(ok & jnp.isfinite(v), v, WORST) for p, v in raw.items()}

  return score


@functools.lru_cache(maxsize=32)
def _jitted_scorer(*args):
  return jax.jit(make_scorer(*args))


def zero_cost_scores(archs, key, images, labels, proxies: Sequence[str] = PROXIES,
                     channels: int = 16, cells: int = 1, num_classes: int = 10,
                     op_impl: str = "onehot", shared_init: bool = True,
                     chunk: int | None = None, execution: Execution = Execution()) -> dict:
  """Every requested proxy of every cell of ``archs`` (``int32[P, 6]``): ``{name: float32[P]}``.

  One compiled, vmapped program per configuration, execution resolved (cached); see
  ``make_scorer`` for the arguments. Inside your own ``jit``, call ``make_scorer(...)``
  instead.
  """
  score = _jitted_scorer(check_proxies(proxies), channels, cells, num_classes, op_impl,
                         shared_init, chunk, execution.resolve())
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
                        execution: Execution = Execution()) -> Evaluator:
  """Fitness = one zero-cost proxy of the NB201 cell (higher is better); report = all proxies.

  Disconnected cells get the finite ``floor(proxy, batch_size)`` as fitness
  (not a failure: they are legitimately the worst); the report keeps ``WORST``.

  By default the score is a fixed function of the cell, like a table: one
  minibatch and one initialisation, both from ``seed``, and the search key is
  ignored, so re-evaluating a cell gives the same fitness. ``resample=True``
  draws the minibatch (from a pool of 16, all baked into the program) and the
  weights from the evaluation key instead. Jittable: usable inside the
  scanned search loop; the runner wires it as ``--evaluator=zero_cost``.
  """
  (proxy,) = check_proxies((proxy,))
  space = nb201_space()
  pool = 16 if resample else 1
  images, labels, num_classes = fixed_minibatch(dataset, data_dir, batch_size, seed, pool)
  images, labels = jnp.asarray(images), jnp.asarray(labels)
  fixed_key = jax.random.PRNGKey(seed)
  kw = dict(channels=channels, cells=cells, num_classes=num_classes, op_impl=op_impl, chunk=chunk,
            execution=execution.resolve())
  score_one = make_scorer((proxy,), **kw)
  score_all = make_scorer(PROXIES, **kw)

  worst = floor(proxy, batch_size)

  def evaluate(key, archs):
    archs = space.to_vector(archs)
    if resample:
      k_batch, k_init = jax.random.split(key)
      b = jax.random.randint(k_batch, (), 0, pool)
      s = score_one(archs, k_init, images[b], labels[b])[proxy]
    else:
      s = score_one(archs, fixed_key, images[0], labels[0])[proxy]
    return jnp.where(s == WORST, worst, s)

  def report(archs):
    return score_all(space.to_vector(archs), fixed_key, images[0], labels[0])

  return Evaluator(name=f"zero_cost/{proxy}/{dataset}", space=space, evaluate=evaluate,
                   report=report, jittable=True)


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
