"""Multi-objective utilities: dominance, non-dominated sorting, crowding (jittable).

Objectives are float32[N, M], all to be *maximised* (negate what you minimise,
e.g. parameter count). Non-dominated sorting follows NSGA-II (Deb et al. 2002),
written as repeated peeling of the dominance matrix so that it is a fixed-shape
``lax.while_loop``: O(N^2 M) memory, fine for populations and archives up to a
few thousand.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def dominates(a: jax.Array, b: jax.Array) -> jax.Array:
  """a dominates b: no worse in every objective and better in at least one."""
  return jnp.all(a >= b, axis=-1) & jnp.any(a > b, axis=-1)


def dominance_matrix(objectives: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """bool[N, N]: entry (i, j) says i dominates j; invalid rows neither dominate nor count."""
  d = dominates(objectives[:, None, :], objectives[None, :, :])
  if valid is not None:
    d = d & valid[:, None] & valid[None, :]
  return d


def non_dominated_rank(objectives: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """int32[N] front index (0 = Pareto front); invalid rows get N."""
  n = objectives.shape[0]
  valid = jnp.ones((n,), bool) if valid is None else valid
  dom = dominance_matrix(objectives, valid)
  rank = jnp.full((n,), n, jnp.int32)

  def cond(c):
    _, remaining, _ = c
    return jnp.any(remaining)

  def body(c):
    rank, remaining, front = c
    # Rows not dominated by any remaining row form the next front.
    dominated = jnp.any(dom & remaining[:, None], axis=0)
    current = remaining & ~dominated
    return jnp.where(current, front, rank), remaining & ~current, front + 1

  rank, _, _ = jax.lax.while_loop(cond, body, (rank, valid, jnp.int32(0)))
  return rank


def pareto_front_mask(objectives: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """bool[N]: the non-dominated rows."""
  n = objectives.shape[0]
  valid = jnp.ones((n,), bool) if valid is None else valid
  dom = dominance_matrix(objectives, valid)
  return valid & ~jnp.any(dom, axis=0)


def crowding_distance(objectives: jax.Array, mask: jax.Array) -> jax.Array:
  """NSGA-II crowding distance of the rows in ``mask`` (others 0); boundary rows inf."""
  n, m = objectives.shape
  dist = jnp.zeros((n,), jnp.float32)
  for j in range(m):
    f = jnp.where(mask, objectives[:, j], jnp.inf)
    order = jnp.argsort(f)
    sorted_f = f[order]
    count = mask.sum()
    lo, hi = sorted_f[0], sorted_f[jnp.maximum(count - 1, 0)]
    span = jnp.maximum(hi - lo, 1e-12)
    pos = jnp.arange(n)
    prev = sorted_f[jnp.maximum(pos - 1, 0)]
    nxt = sorted_f[jnp.minimum(pos + 1, n - 1)]
    gap = jnp.where((pos == 0) | (pos == count - 1), jnp.inf, (nxt - prev) / span)
    gap = jnp.where(pos < count, gap, 0.0)
    dist = dist.at[order].add(gap)
  return jnp.where(mask, dist, 0.0)


def front_mask_2d(points) -> np.ndarray:
  """bool[N]: ``pareto_front_mask`` of float[N, 2] points (both maximised), host-side in
  O(N log N) time and O(N) memory, for sets the N x N dominance matrix is too big for
  (the 15,625 cells of NB201)."""
  pts = np.asarray(points, np.float64).reshape(-1, 2)
  if not len(pts):
    return np.zeros(0, bool)
  order = np.lexsort((-pts[:, 1], -pts[:, 0]))  # x descending, then y descending
  x, y = pts[order, 0], pts[order, 1]
  first = np.r_[True, x[1:] != x[:-1]]
  start = np.maximum.accumulate(np.where(first, np.arange(len(x)), 0))  # of each point's x
  best_before = np.r_[-np.inf, np.maximum.accumulate(y)][start]  # best y at greater x
  mask = np.zeros(len(pts), bool)
  # Non-dominated: the best y of its x (ties: all of them), above every greater x's.
  mask[order] = (y == y[start]) & (y > best_before)
  return mask


def hypervolume_2d(points, reference=(0.0, 0.0)) -> float:
  """Area that ``points`` (float[N, 2], both maximised) dominate above ``reference``
  (host-side numpy; points not above the reference add nothing)."""
  pts = np.asarray(points, np.float64).reshape(-1, 2) - np.asarray(reference, np.float64)
  pts = pts[np.all(pts > 0, axis=1)]
  area, best_y = 0.0, 0.0
  for x, y in pts[np.argsort(-pts[:, 0], kind="stable")]:
    if y > best_y:  # x falls; each point adds the strip its y raises above the best so far
      area += x * (y - best_y)
      best_y = y
  return float(area)


class TableFront:
  """The (accuracy, ``cost``) front of every cell of a tabular ``evaluator``'s space, against
  which search fronts are scored (host-side; the table is evaluated once, here).

  Accuracy and cost are scaled to [0, 1] over the whole space (cost flipped, so larger
  is better in both) and the reference point is the worst corner. ``size`` is the
  number of cells on the table's front.
  """

  def __init__(self, evaluator, cost: str):
    archs = evaluator.space.enumerate()
    acc = np.asarray(evaluator.evaluate(jax.random.PRNGKey(0), archs), np.float64)
    costs = np.asarray(evaluator.report(archs)[cost], np.float64)
    self.cost = cost
    self._acc_min, self._acc_span = acc.min(), np.ptp(acc)
    self._cost_max, self._cost_span = costs.max(), np.ptp(costs)
    self.size = int(front_mask_2d(np.stack([acc, -costs], -1)).sum())
    self.hypervolume = hypervolume_2d(self._scaled(acc, costs))  # dominated cells add nothing

  def _scaled(self, acc, costs):
    return np.stack([(np.asarray(acc, np.float64) - self._acc_min) / self._acc_span,
                     (self._cost_max - np.asarray(costs, np.float64)) / self._cost_span], -1)

  def gaps(self, fronts) -> np.ndarray:
    """float64[len(fronts)]: each front's hypervolume gap to the table's, in percent,
    ``100 * (1 - hypervolume / the table's)``, lower is better. ``fronts`` are lists of
    points with ``"accuracy"`` and the cost (pareto.json's ``per_run``)."""
    return np.asarray([100 * (1 - hypervolume_2d(self._scaled(
        [q["accuracy"] for q in f], [q[self.cost] for q in f])) / self.hypervolume)
                       for f in fronts])


# Objectives a search can report a front over: (report key or "accuracy", sign).
# Fronts are computed on maximised values, so costs are negated.
# latency: ms of one image on the model's target device (``SearchableModel.latency``).
OBJECTIVES = {"accuracy": 1.0, "params": -1.0, "flops": -1.0, "latency": -1.0}


def cost_objectives(evaluator, names: tuple[str, ...]):
  """``f(archs) -> float32[B, len(names)]``: the evaluator's reported ``names`` (e.g.
  params, flops), signed to be maximised like every objective here (jittable)."""
  signs = jnp.asarray([OBJECTIVES[o] for o in names], jnp.float32)

  def f(archs):
    report = evaluator.report(archs)
    return jnp.stack([jnp.asarray(report[o], jnp.float32) for o in names], -1) * signs

  return f


def archive_front(space, evaluator, archive, objectives: tuple[str, ...]) -> dict:
  """The Pareto front of every architecture one search evaluated (jittable; vmap over seeds).

  Accuracy is the search signal (the archive's fitness); costs come from the
  evaluator's ``report``. Returns ``mask`` (bool[capacity], the front),
  ``values`` (float32[capacity, len(objectives)], natural signs) and ``valid``.
  """
  valid = archive.valid() & jnp.isfinite(archive.fitness)
  archs = jax.vmap(space.from_vector)(archive.vectors)
  report = evaluator.report(archs)
  cols = [archive.fitness if o == "accuracy" else jnp.asarray(report[o], jnp.float32)
          for o in objectives]
  values = jnp.stack(cols, -1)
  signs = jnp.asarray([OBJECTIVES[o] for o in objectives], jnp.float32)
  return {"mask": pareto_front_mask(values * signs, valid), "values": values, "valid": valid}
