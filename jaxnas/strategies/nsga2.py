"""NSGA-II (Deb, Pratap, Agarwal & Meyarivan, IEEE TEC 2002): multi-objective evolution.

A population of ``population_size`` architectures is bred one generation per
step: the first generation is uniform random samples; each later child is a
one-decision mutation of the winner of a binary tournament (lower
non-dominated rank wins, then larger crowding distance). Parents and children
are then merged and the best ``population_size`` survive, by rank and then by
crowding distance within a front (elitist, unlike regularized evolution's
aging). Every generation is one population-parallel evaluation.

The objectives are the search's fitness (accuracy, maximised) and, where
``costs`` is given, ``costs(archs) -> float32[B, K]``: further objectives, also
maximised (the runner passes ``pareto.cost_objectives``, the negated parameter
count and/or FLOPs from the evaluator's report, to every strategy with a
``costs`` parameter, for ``--objectives=accuracy,params``). Without ``costs`` it
is a (mu + lambda) genetic algorithm on accuracy alone.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import struct

from jaxnas.pareto import crowding_distance, non_dominated_rank
from jaxnas.spaces import Space
from jaxnas.strategies.base import Strategy, from_vectors, propose_batch, to_vectors


@struct.dataclass
class NSGA2State:
  vectors: jax.Array     # int32[P, D] the surviving population
  objectives: jax.Array  # float32[P, M] its objectives, all maximised
  valid: jax.Array       # bool[P]; False only before the first generation is told
  rank: jax.Array        # int32[P] non-dominated front index (0: Pareto front)
  crowding: jax.Array    # float32[P] crowding distance within its front (boundary: inf)


def front_crowding(objectives: jax.Array, rank: jax.Array, valid: jax.Array) -> jax.Array:
  """float32[N]: each valid row's crowding distance within its own front (others 0)."""
  n = objectives.shape[0]
  per_front = jax.vmap(lambda r: crowding_distance(objectives, valid & (rank == r)))(
      jnp.arange(n))
  return jnp.where(valid, per_front[jnp.clip(rank, 0, n - 1), jnp.arange(n)], 0.0)


def survivors(objectives: jax.Array, valid: jax.Array, k: int) -> tuple[jax.Array, ...]:
  """``(indices int32[k], rank, crowding)``: NSGA-II's environmental selection of ``k``
  rows, by front and then by crowding distance (invalid rows last, index breaks ties)."""
  rank = non_dominated_rank(objectives, valid)
  crowding = front_crowding(objectives, rank, valid)
  order = jnp.lexsort((-crowding, rank))  # last key sorts first: rank, then -crowding
  keep = order[:k]
  return keep, rank[keep], crowding[keep]


def nsga2(space: Space, population_size: int = 10,
          costs: Callable[[object], jax.Array] | None = None) -> Strategy:
  """NSGA-II breeding ``population_size`` children per step (see module docstring);
  ``costs(archs) -> float32[B, K]`` adds K objectives per architecture, maximised."""
  if population_size < 2:
    raise ValueError(f"population_size must be >= 2, got {population_size}")
  p = population_size
  m = 1
  if costs is not None:
    example = from_vectors(space, jnp.zeros((p, space.num_decisions), jnp.int32))
    shape = jax.eval_shape(costs, example).shape
    if len(shape) != 2 or shape[0] != p:
      raise ValueError(f"costs must map {p} architectures to float32[{p}, K], gave {shape}")
    m += shape[1]

  def init(key):
    del key
    return NSGA2State(vectors=jnp.zeros((p, space.num_decisions), jnp.int32),
                      objectives=jnp.zeros((p, m), jnp.float32),
                      valid=jnp.zeros((p,), bool), rank=jnp.zeros((p,), jnp.int32),
                      crowding=jnp.zeros((p,), jnp.float32))

  def propose(state, key):
    # One RNG call per proposal: two contenders, a mutation, a sample for generation 0.
    u = jax.random.uniform(key, (4 + space.num_decisions,))
    a, b = jnp.minimum(jnp.floor(u[:2] * p).astype(jnp.int32), p - 1)
    a_wins = (state.rank[a] < state.rank[b]) | (
        (state.rank[a] == state.rank[b]) & (state.crowding[a] >= state.crowding[b]))
    parent = state.vectors[jnp.where(a_wins, a, b)]
    child = space.mutate_from_uniform(parent, u[2:4])
    first = ~jnp.any(state.valid)
    return jnp.where(first, space.sample_from_uniform(u[4:]), child)

  def ask(key, state, archive):
    vectors, _ = propose_batch(key, space, archive, p, lambda k, i, t: propose(state, k))
    return from_vectors(space, vectors), state

  def objectives_of(archs, fitness):
    cols = fitness[:, None].astype(jnp.float32)
    if costs is None:
      return cols
    return jnp.concatenate([cols, jnp.asarray(costs(archs), jnp.float32)], -1)

  def tell(key, archs, fitness, state, archive):
    del key, archive
    vectors = jnp.concatenate([state.vectors, to_vectors(space, archs)])
    objectives = jnp.concatenate([state.objectives, objectives_of(archs, fitness)])
    valid = jnp.concatenate([state.valid, jnp.ones((p,), bool)])
    keep, rank, crowding = survivors(objectives, valid, p)
    new = NSGA2State(vectors=vectors[keep], objectives=objectives[keep], valid=valid[keep],
                     rank=rank, crowding=crowding)
    return new, {"population_mean": jnp.mean(new.objectives[:, 0]),
                 "front_size": jnp.sum(new.rank == 0)}

  return Strategy("nsga2", space, p, init, ask, tell)
