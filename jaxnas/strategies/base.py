"""The strategy protocol and the evaluation archive every strategy reads.

A strategy is a NamedTuple of pure functions built by a factory whose closure
holds the hyperparameters (optax style), speaking one key-first protocol
(evosax style):

  init(key) -> state
  ask(key, state, archive) -> (archs, state)          # archs: batch of `batch_size`
  tell(key, archs, fitness, state, archive) -> (state, metrics)

``archive`` is the search loop's record of every architecture evaluated so far
(decision vectors and fitness, fixed capacity = budget). The loop owns it so
that budget accounting lives in one place: a strategy proposes *novel*
architectures (never in the archive, never twice in one batch) with
``propose_batch``, so no architecture is counted twice against the budget.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from jaxnas.spaces import Space

# Proposal attempts before falling back to uniform samples, and uniform
# samples before giving up (the loop counts a give-up as a duplicate).
MAX_TRIES = 64
MAX_FALLBACK_TRIES = 512


@struct.dataclass
class Archive:
  """Every evaluated architecture, in evaluation order.

  vectors: int32[capacity, D] decision vectors (rows >= count are zero).
  keys: int32[capacity] ``space.key_of`` of each row, for O(capacity) scalar
    membership tests instead of O(capacity * D) (rows >= count are -1 and
    never matched, since validity is checked separately).
  fitness: float32[capacity] (rows >= count are -inf).
  count: int32 scalar, number of valid rows.
  """
  vectors: jax.Array
  keys: jax.Array
  fitness: jax.Array
  count: jax.Array

  @property
  def capacity(self) -> int:
    return self.vectors.shape[-2]

  def valid(self) -> jax.Array:
    return jnp.arange(self.capacity) < self.count

  def masked_fitness(self) -> jax.Array:
    return jnp.where(self.valid(), self.fitness, -jnp.inf)


def archive_init(capacity: int, num_decisions: int) -> Archive:
  return Archive(vectors=jnp.zeros((capacity, num_decisions), jnp.int32),
                 keys=jnp.full((capacity,), -1, jnp.int32),
                 fitness=jnp.full((capacity,), -jnp.inf, jnp.float32),
                 count=jnp.zeros((), jnp.int32))


def archive_add(archive: Archive, vectors: jax.Array, keys: jax.Array, fitness: jax.Array,
                start: jax.Array, num_valid: jax.Array) -> Archive:
  """Writes a batch at rows ``start..`` (= ``count``) and counts its first ``num_valid`` rows.

  A dynamic_update_slice rather than a scatter: with ``start`` shared by all
  seeds it updates the archive in place under vmap and scan (a batched
  scatter copied the whole archive every step).
  """
  def put(buf, rows):
    return jax.lax.dynamic_update_slice_in_dim(buf, rows.astype(buf.dtype), start, axis=0)
  return Archive(vectors=put(archive.vectors, vectors), keys=put(archive.keys, keys),
                 fitness=put(archive.fitness, fitness),
                 count=archive.count + jnp.asarray(num_valid, jnp.int32))


def rows_contain(rows: jax.Array, num_valid: jax.Array, vector: jax.Array) -> jax.Array:
  """Whether ``vector`` equals one of the first ``num_valid`` rows of ``rows``."""
  hit = jnp.all(rows == vector, axis=-1) & (jnp.arange(rows.shape[0]) < num_valid)
  return _any(hit)


def _hits(space: Space, archive: Archive, vector: jax.Array) -> jax.Array:
  """bool[capacity]: the counted archive rows that hold ``vector`` (keys first, then, for
  spaces too large for exact keys, the vectors)."""
  key = space.key_of(vector)
  if space.size < 2**31:  # keys are exact ranks (>= 0), so -1 marks the rows not counted
    return jnp.where(archive.valid(), archive.keys, -1) == key
  return (archive.keys == key) & archive.valid() & jnp.all(archive.vectors == vector, axis=-1)


def _any(hit: jax.Array) -> jax.Array:
  # An int8 max rather than a boolean any: XLA:CPU lowers the latter as a reduce-window
  # at twice the time, and membership tests are a large part of a search step.
  return jnp.max(hit.astype(jnp.int8)) > 0


def contains(space: Space, archive: Archive, vector: jax.Array) -> jax.Array:
  """Whether ``vector`` is in the archive."""
  return _any(_hits(space, archive, vector))


def lookup(space: Space, archive: Archive, vector: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(found, fitness) of ``vector`` in the archive."""
  hit = _hits(space, archive, vector)
  return _any(hit), jnp.max(jnp.where(hit, archive.fitness, -jnp.inf))


def permutation(key: jax.Array, n: int) -> jax.Array:
  """int32[n]: ``jax.random.permutation(key, n)``, the same permutation, without a sort.

  JAX shuffles by a stable sort of ``jax.random.bits`` (one round for n < ~1600); here
  each element's place is its rank among those bits (ties by index), found by pairwise
  comparison: O(n^2) element-wise work, which under vmap over thousands of seeds costs
  XLA:CPU a fraction of its sort (local search draws one per move, inside its loops).
  tests/test_strategies.py checks the equality with ``jax.random.permutation``.
  """
  if n > 256:  # (n^2 work; JAX also sorts in more rounds from n ~ 1600)
    return jax.random.permutation(key, n).astype(jnp.int32)
  _, sub = jax.random.split(key)
  bits = jax.random.bits(sub, (n,), jnp.uint32)
  idx = jnp.arange(n, dtype=jnp.int32)
  before = (bits[None, :] < bits[:, None]) | (
      (bits[None, :] == bits[:, None]) & (idx[None, :] < idx[:, None]))
  place = jnp.sum(before, axis=1, dtype=jnp.int32)  # where element i goes
  return jnp.sum(jnp.where(place[None, :] == idx[:, None], idx[None, :], 0), axis=1,
                 dtype=jnp.int32)


def propose_batch(key: jax.Array, space: Space, archive: Archive, batch_size: int,
                  propose: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
                  ) -> tuple[jax.Array, jax.Array]:
  """``batch_size`` novel decision vectors from ``propose(key, i, attempt) -> int32[D]``.

  Slot ``i`` is re-proposed (fresh key, next ``attempt``) until its vector is
  neither in the archive nor earlier in the batch; after MAX_TRIES attempts it
  falls back to uniform samples.
  Returns (vectors int32[B, D], novel bool[B]); ``novel`` is False only if even
  MAX_FALLBACK_TRIES uniform samples were all seen (a nearly exhausted space).
  """
  d = space.num_decisions

  def seen(v, pending, i):
    return contains(space, archive, v) | rows_contain(pending, i, v)

  def one(pending, i):
    k = jax.random.fold_in(key, i)

    def retry(draw, last):
      def cond(c):
        t, v = c
        return seen(v, pending, i) & (t < last)

      def body(c):
        t, _ = c
        return t + 1, draw(jax.random.fold_in(k, t), t)

      return cond, body

    # Attempt t draws from fold_in(k, t): proposals for t < MAX_TRIES, then uniform
    # samples. Two loops rather than one with a select, because under vmap a loop's
    # body runs for every seed while any seed needs another attempt: the fallback's
    # draws would be paid on every proposal (its loop almost never runs at all).
    # (Measured: trying 2 or 8 attempts per iteration is slower at budget 100.)
    v = propose(jax.random.fold_in(k, 0), i, jnp.int32(0))
    t, v = jax.lax.while_loop(*retry(lambda kt, t: propose(kt, i, t), MAX_TRIES),
                              (jnp.int32(1), v))
    _, v = jax.lax.while_loop(*retry(lambda kt, t: space.sample_vector(kt),
                                     MAX_TRIES + MAX_FALLBACK_TRIES), (t, v))
    return pending.at[i].set(v), (v, ~seen(v, pending, i))

  pending = jnp.zeros((batch_size, d), jnp.int32)
  _, (vectors, novel) = jax.lax.scan(one, pending, jnp.arange(batch_size))
  return vectors, novel


class Strategy(NamedTuple):
  """A search strategy (see module docstring)."""
  name: str
  space: Space
  batch_size: int
  init: Callable[[jax.Array], Any]
  ask: Callable[[jax.Array, Any, Archive], tuple[Any, Any]]
  tell: Callable[[jax.Array, Any, jax.Array, Any, Archive], tuple[Any, dict]]


ACQUISITIONS = ("its", "ucb", "mean")


def check_acquisition(acquisition: str) -> str:
  if acquisition not in ACQUISITIONS:
    raise ValueError(f"acquisition must be 'its', 'ucb' or 'mean', got {acquisition!r}")
  return acquisition


def acquire(acquisition: str, key: jax.Array, mu: jax.Array, sigma: jax.Array) -> jax.Array:
  """A surrogate's candidate scores from its mean ``mu`` and spread ``sigma``: ``"its"``
  one independent Thompson draw per candidate (BANANAS' ITS, White et al. 2021),
  ``"ucb"`` ``mu + sigma``, ``"mean"`` ``mu``."""
  if acquisition == "its":
    return mu + sigma * jax.random.normal(key, mu.shape)
  if acquisition == "ucb":
    return mu + sigma
  return mu


def to_vectors(space: Space, archs) -> jax.Array:
  return jax.vmap(space.to_vector)(archs)


def from_vectors(space: Space, vectors: jax.Array):
  return jax.vmap(space.from_vector)(vectors)


def top_k_rows(archive: Archive, k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The ``k`` fittest archive rows: (vectors, fitness, valid)."""
  fit, idx = jax.lax.top_k(archive.masked_fitness(), k)
  return archive.vectors[idx], fit, jnp.isfinite(fit) | (idx < archive.count)
