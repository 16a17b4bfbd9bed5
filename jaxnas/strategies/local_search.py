"""Local search with random restarts (White, Nolen & Savani, UAI 2021).

The first ``num_init`` evaluations are uniform samples; the best becomes the
centre. Then the one-decision neighbours of the centre are evaluated in a
random order; as soon as one beats the centre the search moves there
(first-improvement hill climbing). A centre none of whose neighbours is better
is a local optimum: the search restarts from a fresh random architecture.
Neighbours that were already evaluated are skipped for free, and if one of
them is better than the centre the search moves to it without spending budget.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxnas.spaces import Space
from jaxnas.strategies.base import (MAX_FALLBACK_TRIES, Strategy, contains, from_vectors,
                                    lookup, permutation, rows_contain, to_vectors)


@struct.dataclass
class LocalState:
  center: jax.Array       # int32[D]
  center_fit: jax.Array   # float32
  has_center: jax.Array   # bool
  perm: jax.Array         # int32[N] order in which neighbours are tried
  ptr: jax.Array          # int32 next position in perm
  phase_start: jax.Array  # int32 archive row where the current (re)start began
  phase_len: jax.Array    # int32 random samples in the current (re)start
  restarts: jax.Array     # int32


def local_search(space: Space, num_init: int = 10, batch_size: int = 1) -> Strategy:
  """Local search; ``batch_size`` neighbours are evaluated per step."""
  n = space.num_neighbours

  def init(key):
    return LocalState(center=jnp.zeros((space.num_decisions,), jnp.int32),
                      center_fit=jnp.full((), -jnp.inf), has_center=jnp.zeros((), bool),
                      perm=permutation(key, n),
                      ptr=jnp.zeros((), jnp.int32), phase_start=jnp.zeros((), jnp.int32),
                      phase_len=jnp.asarray(num_init, jnp.int32),
                      restarts=jnp.zeros((), jnp.int32))

  def move(state, vector, fit, key):
    return state.replace(center=vector, center_fit=fit, has_center=jnp.ones((), bool),
                         perm=permutation(key, n),
                         ptr=jnp.zeros((), jnp.int32))

  def ask(key, state, archive):
    def random_novel(k, pending, i):
      def cond(c):
        t, v, _ = c
        seen = contains(space, archive, v) | rows_contain(pending, i, v)
        return seen & (t < MAX_FALLBACK_TRIES)

      def body(c):
        t, _, _ = c
        return t + 1, space.sample_vector(jax.random.fold_in(k, t)), 0
      _, v, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), space.sample_vector(k), 0))
      return v

    def slot(carry, i):
      state, pending = carry
      k = jax.random.fold_in(key, i)

      # Advance through the neighbourhood past evaluated or pending neighbours,
      # moving the centre for free when an evaluated neighbour is better.
      def cond(c):
        s, _ = c
        nb = space.neighbour_vector(s.center, s.perm[jnp.minimum(s.ptr, n - 1)])
        seen = contains(space, archive, nb) | rows_contain(pending, i, nb)
        return s.has_center & (s.ptr < n) & seen

      def body(c):
        s, t = c
        nb = space.neighbour_vector(s.center, s.perm[s.ptr])
        found, fit = lookup(space, archive, nb)
        better = found & (fit > s.center_fit)
        s = jax.lax.cond(better, lambda: move(s, nb, fit, jax.random.fold_in(k, 1000 + t)),
                         lambda: s.replace(ptr=s.ptr + 1))
        return s, t + 1

      state, _ = jax.lax.while_loop(cond, body, (state, jnp.int32(0)))
      use_nb = state.has_center & (state.ptr < n)
      nb = space.neighbour_vector(state.center, state.perm[jnp.minimum(state.ptr, n - 1)])
      v = jnp.where(use_nb, nb, random_novel(k, pending, i))
      state = state.replace(ptr=state.ptr + use_nb.astype(jnp.int32))
      return (state, pending.at[i].set(v)), v

    pending = jnp.zeros((batch_size, space.num_decisions), jnp.int32)
    (state, _), vectors = jax.lax.scan(slot, (state, pending), jnp.arange(batch_size))
    return from_vectors(space, vectors), state

  def tell(key, archs, fitness, state, archive):
    idx = jnp.arange(archive.capacity)
    # Starting: once the (re)start's random samples are in, the best becomes the centre.
    in_phase = (idx >= state.phase_start) & archive.valid()
    phase_fit = jnp.where(in_phase, archive.fitness, -jnp.inf)
    ready = archive.count - state.phase_start >= state.phase_len
    best = jnp.argmax(phase_fit)
    # Climbing: move to the best of this batch if it beats the centre.
    b = jnp.argmax(fitness)
    improved = fitness[b] > state.center_fit
    # The new centre: the phase's best when starting, the batch's best when climbing (one
    # move, whose new neighbour order is the only random draw).
    moved = move(state, jnp.where(state.has_center, to_vectors(space, archs)[b],
                                  archive.vectors[best]),
                 jnp.where(state.has_center, fitness[b], phase_fit[best]), key)
    exhausted = state.ptr >= n
    restarted = state.replace(has_center=jnp.zeros((), bool), phase_start=archive.count,
                              phase_len=jnp.ones((), jnp.int32), restarts=state.restarts + 1)
    climbing = jax.tree.map(
        lambda m, r, s: jnp.where(improved, m, jnp.where(exhausted, r, s)), moved, restarted, state)
    starting = jax.tree.map(lambda m, s: jnp.where(ready, m, s), moved, state)
    new = jax.tree.map(lambda c, s: jnp.where(state.has_center, c, s), climbing, starting)
    return new, {"center_fitness": new.center_fit, "restarts": new.restarts}

  return Strategy("local", space, batch_size, init, ask, tell)
