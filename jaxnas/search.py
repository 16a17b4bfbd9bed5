"""The search loop: ask -> evaluate -> tell, scanned over steps, vmapped over seeds.

``make_search(strategy, evaluator, budget)`` returns a ``Search`` of pure
functions on one ``SearchState`` pytree (purejaxrl style). Everything a resume
needs lives in that pytree: the strategy state, the archive of evaluations,
the root key and the step counter. Per-step keys are derived with
``fold_in(key, step)``, never stored as streams, so a run cut into chunks of
steps computes exactly what an uncut run computes.

For a jittable evaluator (the tabular benchmark) a chunk of steps is one
``lax.scan`` and many seeds are one ``jax.vmap`` of it. For an evaluator that
is its own compiled program (real training), ``ask`` and ``tell`` are jitted
and vmapped over seeds and the evaluator is called between them on the whole
population of all seeds at once.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from jaxnas.estimators import Evaluator
from jaxnas.strategies.base import (Archive, Strategy, archive_add, archive_init, contains,
                                    to_vectors)

# Window of most recent evaluations over which population diversity is logged.
DIVERSITY_WINDOW = 20


@struct.dataclass
class SearchState:
  step: jax.Array          # int32: steps completed
  key: jax.Array           # uint32[2]: root key of this run
  strategy: Any            # the strategy's state pytree
  archive: Archive         # every evaluation so far
  best: jax.Array          # float32: best fitness so far
  num_failed: jax.Array    # int32: evaluations that returned NaN/inf
  num_duplicates: jax.Array  # int32: proposals that were not novel (should stay 0)


class Search(NamedTuple):
  """Pure functions of one search (one seed); vmap them for many seeds."""
  strategy: Strategy
  evaluator: Evaluator
  budget: int
  num_steps: int
  init: Callable[[jax.Array], SearchState]
  ask: Callable[[SearchState], tuple[Any, SearchState]]
  evaluation_key: Callable[[SearchState], jax.Array]
  tell: Callable[[SearchState, Any, jax.Array], tuple[SearchState, dict]]
  step: Callable[[SearchState], tuple[SearchState, dict]]
  run_chunk: Callable[[SearchState, int], tuple[SearchState, dict]]


def _step_keys(state: SearchState):
  k = jax.random.fold_in(state.key, state.step)
  return jax.random.split(k, 3)


def novelty(archive: Archive, vectors: jax.Array, window: int = DIVERSITY_WINDOW) -> jax.Array:
  """Mean Hamming distance (fraction of decisions) of ``vectors`` to the last ``window`` evaluations.

  The per-step diversity signal: it falls towards 1/D when a search keeps
  proposing near-copies of what it just evaluated (mode collapse), and is
  about 0.8 for uniform sampling of NAS-Bench-201. It costs B * window * D
  comparisons, not window^2 * D, so it can be logged at every step.
  """
  w = min(window, archive.capacity)
  start = jnp.clip(archive.count - w, 0, archive.capacity - w)
  rows = jax.lax.dynamic_slice_in_dim(archive.vectors, start, w, axis=0)
  valid = (start + jnp.arange(w)) < archive.count
  # Mismatches counted in integers and divided once (a float mean over the D decisions
  # of every pair cost ~6 % of an evolution step over 2000 seeds on CPU).
  diff = jnp.sum(vectors[:, None, :] != rows[None, :, :], axis=-1, dtype=jnp.int32)  # [B, w]
  total = jnp.sum(jnp.where(valid, diff, 0))
  return total / jnp.maximum(valid.sum() * vectors.shape[0] * vectors.shape[1], 1).astype(
      jnp.float32)


def make_search(strategy: Strategy, evaluator: Evaluator, budget: int,
                failed_fitness: float = 0.0) -> Search:
  """Builds the search of ``strategy`` on ``evaluator`` for ``budget`` evaluations.

  Failed evaluations (NaN/inf) are recorded with ``failed_fitness`` (0% accuracy)
  so they can never win a tournament or poison a predictor.
  """
  space = evaluator.space
  if strategy.space.name != space.name:
    raise ValueError(f"strategy searches {strategy.space.name!r} but evaluator scores {space.name!r}")
  if budget < 1:
    raise ValueError(f"budget must be >= 1, got {budget}")
  networks = space.size if space.active is None else space.num_networks()
  if networks is not None and budget > networks:
    raise ValueError(f"budget {budget} exceeds the {networks} architectures of {space.name}")
  batch = strategy.batch_size
  num_steps = math.ceil(budget / batch)
  # Step t writes archive rows t*B .. t*B+B-1 (the last step's rows past the
  # budget are written but never counted), so every write is an in-place
  # dynamic_update_slice at an offset shared by all seeds.
  capacity = num_steps * batch

  def init(key):
    k_strategy = jax.random.fold_in(key, 0x7FFFFFFF)  # steps fold in 0, 1, ...
    return SearchState(step=jnp.zeros((), jnp.int32), key=key,
                       strategy=strategy.init(k_strategy),
                       archive=archive_init(capacity, space.num_decisions),
                       best=jnp.full((), -jnp.inf, jnp.float32),
                       num_failed=jnp.zeros((), jnp.int32),
                       num_duplicates=jnp.zeros((), jnp.int32))

  def ask(state):
    k_ask, _, _ = _step_keys(state)
    archs, strategy_state = strategy.ask(k_ask, state.strategy, state.archive)
    return archs, state.replace(strategy=strategy_state)

  def evaluation_key(state):
    return _step_keys(state)[1]

  def tell(state, archs, fitness, t):
    """Records step ``t``'s evaluations and tells the strategy.

    ``t`` must equal ``state.step``; it is passed separately so that under
    vmap over seeds it stays one scalar, the archive write stays in place and
    the budget mask is shared.
    """
    _, _, k_tell = _step_keys(state)
    mask = t * batch + jnp.arange(batch) < budget
    finite = jnp.isfinite(fitness)
    fitness = jnp.where(finite, fitness, failed_fitness).astype(jnp.float32)
    vectors = to_vectors(space, archs)
    seen = jax.vmap(lambda v: contains(space, state.archive, v))(vectors)
    dup_in_batch = jnp.any(jnp.triu(jnp.all(vectors[:, None] == vectors[None], -1), 1), axis=0)
    diversity = novelty(state.archive, vectors)
    keys = jax.vmap(space.key_of)(vectors)
    archive = archive_add(state.archive, vectors, keys, fitness, t * batch, mask.sum())
    strategy_state, metrics = strategy.tell(k_tell, archs, fitness, state.strategy, archive)
    n = mask.sum()
    new = state.replace(
        step=state.step + 1, strategy=strategy_state, archive=archive,
        best=jnp.maximum(state.best, jnp.max(jnp.where(mask, fitness, -jnp.inf))),
        num_failed=state.num_failed + jnp.sum(~finite & mask),
        num_duplicates=state.num_duplicates + jnp.sum((seen | dup_in_batch) & mask))
    metrics = dict(metrics)
    metrics.update(
        step=new.step,
        evaluations=archive.count,
        best=new.best,
        batch_mean=jnp.sum(jnp.where(mask, fitness, 0.0)) / jnp.maximum(n, 1),
        diversity=diversity,
        failed=new.num_failed,
        duplicates=new.num_duplicates)
    return new, metrics

  def step(state, t):
    archs, state = ask(state)
    fitness = evaluator.evaluate(evaluation_key(state), archs)
    return tell(state, archs, fitness, t)

  def run_chunk(state, first_step, length):
    """Steps ``first_step .. first_step + length - 1``; those >= ``num_steps`` are no-ops.

    ``first_step`` is the step all seeds are at, passed unbatched (vmap with
    ``in_axes=(0, None, None)``) so that the loop's trip count is one scalar
    and not a select over the whole state. Every chunk has the same length, so
    an interrupted and resumed run executes the same compiled program on the
    same states as an uninterrupted one.
    """
    if not evaluator.jittable:
      raise ValueError(f"evaluator {evaluator.name} is not jittable; drive ask/tell from the host")
    metrics_shape = jax.eval_shape(step, state, first_step)[1]
    # A loop over the live steps only, writing each step's metrics into rows of
    # preallocated buffers in place (dead steps' rows stay zero). A scan with a
    # cond between the step and a no-op made XLA copy the archive (seeds x
    # budget x D) around the conditional at every step.
    live_steps = jnp.clip(num_steps - first_step, 0, length)
    buffers = jax.tree.map(lambda x: jnp.zeros((length,) + x.shape, x.dtype), metrics_shape)

    def body(t, carry):
      s, buffers = carry
      s, metrics = step(s, first_step + t)
      return s, jax.tree.map(lambda b, m: jax.lax.dynamic_update_index_in_dim(b, m, t, 0),
                             buffers, metrics)

    state, metrics = jax.lax.fori_loop(0, live_steps, body, (state, buffers))
    metrics["live"] = jnp.arange(length) < live_steps
    return state, metrics

  return Search(strategy, evaluator, budget, num_steps, init, ask, evaluation_key, tell, step,
                run_chunk)


def results_of(search: Search, state: SearchState) -> dict:
  """Results of one finished search (vmap it for many seeds).

  trajectory: best-so-far fitness per evaluation; best_arch: the fittest
  evaluated architecture (first found on ties); report: the evaluator's
  report for it (e.g. the test accuracy), never seen by the search.
  """
  archive = state.archive
  fitness = archive.masked_fitness()
  best = jnp.argmax(fitness)
  best_arch = search.evaluator.space.from_vector(archive.vectors[best])
  report = search.evaluator.report(jax.tree.map(lambda x: x[None], best_arch))
  return {"trajectory": jax.lax.cummax(fitness)[:search.budget], "best_index": best,
          "best_vector": archive.vectors[best], "best_arch": best_arch,
          "best_score": fitness[best], "report": jax.tree.map(lambda x: x[0], report),
          "num_failed": state.num_failed, "num_duplicates": state.num_duplicates}
