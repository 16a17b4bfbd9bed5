"""Regularized (aging) evolution (Real, Aggarwal, Huang & Le, AAAI 2019).

A population of ``population_size`` architectures is kept in a ring buffer in
order of birth. Until it is full, candidates are uniform random samples; then
each child is a one-decision mutation of the best of ``tournament_size``
members drawn uniformly (with replacement, as in the NAS-Bench-201 reference
code), and every new child replaces the oldest member, so good architectures
must keep being rediscovered to survive.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxnas.spaces import Space
from jaxnas.strategies.base import Strategy, from_vectors, propose_batch, to_vectors


@struct.dataclass
class EvolutionState:
  vectors: jax.Array   # int32[P, D] population, ring buffer in birth order
  fitness: jax.Array   # float32[P]
  size: jax.Array      # int32, members so far (<= P)
  oldest: jax.Array    # int32, ring position of the oldest member


def evolution(space: Space, population_size: int = 10, tournament_size: int = 3,
              batch_size: int = 1) -> Strategy:
  """Regularized evolution; ``batch_size`` children are bred per step from one population."""
  if not 1 <= tournament_size <= population_size:
    raise ValueError(f"tournament_size must be in [1, population_size={population_size}]")
  if not 1 <= batch_size <= population_size:
    raise ValueError(f"batch_size must be in [1, population_size={population_size}]")
  p = population_size

  def init(key):
    del key
    return EvolutionState(vectors=jnp.zeros((p, space.num_decisions), jnp.int32),
                          fitness=jnp.full((p,), -jnp.inf, jnp.float32),
                          size=jnp.zeros((), jnp.int32), oldest=jnp.zeros((), jnp.int32))

  def propose(state, key, i):
    # One RNG call per proposal: threefry dominates the cost of a step on CPU.
    u = jax.random.uniform(key, (tournament_size + 2 + space.num_decisions,))
    # Members are filled at ring positions 0..size-1 while the population grows.
    filling = state.size + i < p
    size = jnp.maximum(state.size, 1)
    contenders = jnp.minimum(jnp.floor(u[:tournament_size] * size).astype(jnp.int32), size - 1)
    parent = state.vectors[contenders[jnp.argmax(state.fitness[contenders])]]
    child = space.mutate_from_uniform(parent, u[tournament_size:tournament_size + 2])
    return jnp.where(filling, space.sample_from_uniform(u[tournament_size + 2:]), child)

  def ask(key, state, archive):
    vectors, _ = propose_batch(key, space, archive, batch_size,
                               lambda k, i, t: propose(state, k, i))
    return from_vectors(space, vectors), state

  def tell(key, archs, fitness, state, archive):
    del key, archive
    vectors = to_vectors(space, archs)
    pos = (state.oldest + jnp.arange(batch_size)) % p
    new = state.replace(vectors=state.vectors.at[pos].set(vectors),
                        fitness=state.fitness.at[pos].set(fitness),
                        size=jnp.minimum(state.size + batch_size, p),
                        oldest=(state.oldest + batch_size) % p)
    alive = jnp.arange(p) < new.size
    mean = jnp.sum(jnp.where(alive, new.fitness, 0.0)) / jnp.maximum(new.size, 1)
    return new, {"population_mean": mean}

  return Strategy("evolution", space, batch_size, init, ask, tell)
