"""Categorical search spaces.

Every jaxnas space factorises an architecture into a fixed-length vector of
categorical decisions, decision ``d`` taking values in ``[0, cardinalities[d])``,
such that *every* vector in that box is a valid architecture. The architecture
itself is a pytree of int32 arrays (a plain ``int32[6]`` array for
NAS-Bench-201, a small NamedTuple for the DARTS cell) and ``to_vector`` /
``from_vector`` are a jittable bijection between the two.

Because the box is always valid, sampling, one-decision mutation, uniform
crossover and neighbourhood enumeration are written once here, as pure
functions of a PRNG key, and hold for every space: they can never leave the
space. Strategies work on decision vectors; evaluators see architectures.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Arch = Any  # a pytree of int32 arrays
PRNGKey = jax.Array


class InvalidArchitecture(ValueError):
  """A user-supplied architecture (string or arrays) is not in the space."""


class Space(NamedTuple):
  """A categorical search space (see module docstring).

  Fields are the space-specific parts; the methods derive everything else.
  A Space is hashable, so it can be closed over or passed as a static argument.
  """

  name: str
  cardinalities: tuple[int, ...]
  to_vector: Callable[[Arch], jax.Array]  # arch -> int32[D] (jittable)
  from_vector: Callable[[jax.Array], Arch]  # int32[D] -> arch (jittable)
  encode: Callable[[Arch], str]  # host: arch -> canonical string
  decode: Callable[[str], Arch]  # host: string -> arch, raises InvalidArchitecture
  # Optional jittable int32[D] -> float32[F] encoding for predictors (e.g. the
  # BANANAS path encoding); the one-hot of the decisions when None.
  features: Callable[[jax.Array], jax.Array] | None = None
  # Optional jittable int32[D] -> bool[D]: which decisions exist for this vector (a
  # conditional space, ``spaces.declared``); None: all, always. Inactive decisions are
  # fixed to 0 in the canonical vector, so equal networks have equal vectors.
  active: Callable[[jax.Array], jax.Array] | None = None
  # Optional jittable ``[float[K_d] for each decision d] -> arch`` with a
  # ``spaces.declared.Mixture`` (candidate values and their weights) at every choice: the
  # continuous relaxation that DARTS-style search and the one-hot scoring of zero-cost
  # proxies feed to a ``jaxnas.nn`` model (declared spaces); None: not relaxable.
  relax: Callable[[Any], Arch] | None = None
  # Optional name of each decision (a declared space's dotted paths, as ``encode`` writes
  # them, e.g. ``stage1.block2.kernel``); None: unnamed.
  labels: tuple[str, ...] | None = None

  # ------------------------------------------------------------------ sizes
  @property
  def num_decisions(self) -> int:
    return len(self.cardinalities)

  @property
  def size(self) -> int:
    """Number of distinct architectures (an exact Python int)."""
    return math.prod(self.cardinalities)

  def num_networks(self) -> int | None:
    """Distinct networks: ``size`` in an unconditional space; in a conditional one the
    number of canonical vectors, counted by enumeration (None above 2**22 vectors)."""
    if self.active is None:
      return self.size
    if self.size > 2**22:
      return None
    vectors = jax.jit(jax.vmap(lambda i: self.canonical(self.unrank(i))))(jnp.arange(self.size))
    return int(np.unique(np.asarray(self.rank(vectors))).size)

  @property
  def max_cardinality(self) -> int:
    return max(self.cardinalities)

  @property
  def num_neighbours(self) -> int:
    """Architectures that differ from a given one in exactly one decision."""
    return sum(k - 1 for k in self.cardinalities)

  @property
  def one_hot_size(self) -> int:
    return sum(self.cardinalities)

  def _cards(self) -> jax.Array:
    return jnp.asarray(self.cardinalities, jnp.int32)

  def canonical(self, vector: jax.Array) -> jax.Array:
    """``vector`` with its inactive decisions set to 0 (itself in an unconditional space)."""
    if self.active is None:
      return vector
    return jnp.where(self.active(vector), vector, 0).astype(vector.dtype)

  # ------------------------------------------------------ vector operations
  def sample_vector(self, key: PRNGKey) -> jax.Array:
    """Uniform sample of a decision vector."""
    return self.sample_from_uniform(jax.random.uniform(key, (self.num_decisions,)))

  def sample_from_uniform(self, u: jax.Array) -> jax.Array:
    """Decision vector from D uniforms in [0, 1) (lets callers batch their RNG draws)."""
    v = jnp.floor(u * self._cards()).astype(jnp.int32)
    return self.canonical(jnp.minimum(v, self._cards() - 1))

  def mutate_vector(self, key: PRNGKey, vector: jax.Array) -> jax.Array:
    """Change exactly one decision to a different value, uniformly at random.

    The decision is drawn uniformly among those with more than one choice, and
    its new value uniformly among the other choices (the one-edge mutation of
    Real et al. 2019 / Dong & Yang 2020 for NAS-Bench-201). In a conditional space
    only active decisions are drawn, and the result is canonical.
    """
    return self.mutate_from_uniform(vector, jax.random.uniform(key, (2,)))

  def mutate_from_uniform(self, vector: jax.Array, u: jax.Array) -> jax.Array:
    """``mutate_vector`` driven by two uniforms ``u`` in [0, 1)."""
    if self.active is None:
      mutable = np.nonzero(np.asarray(self.cardinalities) > 1)[0].astype(np.int32)
      j = jnp.minimum(jnp.floor(u[0] * len(mutable)).astype(jnp.int32), len(mutable) - 1)
      d = jnp.asarray(mutable)[j]
    else:  # the j-th active decision with more than one choice
      mutable = self.active(vector) & (self._cards() > 1)
      n = jnp.sum(mutable, dtype=jnp.int32)
      j = jnp.minimum(jnp.floor(u[0] * n).astype(jnp.int32), n - 1)
      d = jnp.argmax(jnp.cumsum(mutable.astype(jnp.int32)) > j).astype(jnp.int32)
    k = self._cards()[d]
    shift = jnp.minimum(1 + jnp.floor(u[1] * (k - 1)).astype(jnp.int32), k - 1)
    return self.canonical(vector.at[d].set((vector[d] + shift) % k))

  def key_of(self, vector: jax.Array) -> jax.Array:
    """int32 identity of a decision vector, for cheap membership tests.

    The exact rank when the space has fewer than 2^31 architectures; otherwise a
    32-bit hash, so equal keys mean "probably equal" and callers that need
    certainty compare the vectors as well. Computed on the canonical vector, so two
    vectors of one network share a key.
    """
    vector = self.canonical(vector)
    if self.size < 2**31:
      return self.rank(vector)
    h = jnp.uint32(2166136261)
    for d in range(self.num_decisions):  # FNV-1a over the decisions
      h = (h ^ vector[..., d].astype(jnp.uint32)) * jnp.uint32(16777619)
    return jax.lax.bitcast_convert_type(h, jnp.int32)

  def crossover_vector(self, key: PRNGKey, a: jax.Array, b: jax.Array) -> jax.Array:
    """Uniform crossover: each decision taken from ``a`` or ``b`` with p=1/2."""
    take_a = jax.random.bernoulli(key, 0.5, (self.num_decisions,))
    return self.canonical(jnp.where(take_a, a, b))

  def neighbour_table(self) -> tuple[np.ndarray, np.ndarray]:
    """Static (decision, shift) pairs enumerating the one-decision neighbourhood."""
    dims, shifts = [], []
    for d, k in enumerate(self.cardinalities):
      for s in range(1, k):
        dims.append(d)
        shifts.append(s)
    return np.asarray(dims, np.int32), np.asarray(shifts, np.int32)

  def neighbour_vector(self, vector: jax.Array, j: jax.Array) -> jax.Array:
    """The ``j``-th one-decision neighbour of ``vector`` (0 <= j < num_neighbours)."""
    dims, shifts = (jnp.asarray(t) for t in self.neighbour_table())
    d, s = dims[j], shifts[j]
    return self.canonical(vector.at[d].set((vector[d] + s) % self._cards()[d]))

  def neighbour_vectors(self, vector: jax.Array) -> jax.Array:
    """All one-decision neighbours, int32[num_neighbours, D]."""
    return jax.vmap(lambda j: self.neighbour_vector(vector, j))(
        jnp.arange(self.num_neighbours))

  def one_hot(self, vector: jax.Array) -> jax.Array:
    """Concatenated one-hot encoding of the decisions, float32[sum(cardinalities)]."""
    offsets = np.concatenate([[0], np.cumsum(self.cardinalities)[:-1]]).astype(np.int32)
    out = jnp.zeros((self.one_hot_size,), jnp.float32)
    return out.at[jnp.asarray(offsets) + vector].set(1.0)

  def featurize(self, vector: jax.Array) -> jax.Array:
    """Predictor input for a decision vector: ``features`` if given, else ``one_hot``."""
    if self.features is None:
      return self.one_hot(vector)
    return self.features(vector)

  def rank(self, vector: jax.Array) -> jax.Array:
    """Mixed-radix index of a vector in [0, size); first decision most significant."""
    if self.size >= 2**31:
      raise ValueError(f"space {self.name!r} has {self.size} architectures: too many to rank in int32")
    weights = np.ones(self.num_decisions, np.int64)
    for d in range(self.num_decisions - 2, -1, -1):
      weights[d] = weights[d + 1] * self.cardinalities[d + 1]
    return jnp.sum(vector.astype(jnp.int32) * jnp.asarray(weights, jnp.int32), axis=-1)

  def unrank(self, index: jax.Array) -> jax.Array:
    """Inverse of ``rank``."""
    out = []
    index = jnp.asarray(index, jnp.int32)
    for k in reversed(self.cardinalities):
      out.append(index % k)
      index = index // k
    return jnp.stack(out[::-1], axis=-1).astype(jnp.int32)

  # -------------------------------------------------- architecture operations
  def sample(self, key: PRNGKey) -> Arch:
    """A uniformly random architecture."""
    return self.from_vector(self.sample_vector(key))

  def mutate(self, key: PRNGKey, arch: Arch) -> Arch:
    """``arch`` with exactly one decision changed (always valid)."""
    return self.from_vector(self.mutate_vector(key, self.to_vector(arch)))

  def crossover(self, key: PRNGKey, a: Arch, b: Arch) -> Arch:
    """Uniform crossover of two architectures (always valid)."""
    return self.from_vector(self.crossover_vector(key, self.to_vector(a), self.to_vector(b)))

  def neighbours(self, arch: Arch) -> Arch:
    """All one-decision neighbours as a batched architecture pytree."""
    return jax.vmap(self.from_vector)(self.neighbour_vectors(self.to_vector(arch)))

  def enumerate(self) -> Arch:
    """Every architecture, as one batched pytree in rank order (small spaces only)."""
    if self.size > 10_000_000:
      raise ValueError(f"space {self.name!r} has {self.size} architectures: too many to enumerate")
    return jax.vmap(self.from_vector)(self.unrank(jnp.arange(self.size)))

  def validate_vector(self, vector) -> np.ndarray:
    """Host check that ``vector`` is a valid decision vector; returns it as numpy."""
    v = np.asarray(vector)
    if v.shape != (self.num_decisions,):
      raise InvalidArchitecture(
          f"{self.name}: expected {self.num_decisions} decisions, got shape {v.shape}")
    if not np.issubdtype(v.dtype, np.integer):
      raise InvalidArchitecture(f"{self.name}: decisions must be integers, got {v.dtype}")
    cards = np.asarray(self.cardinalities)
    bad = np.nonzero((v < 0) | (v >= cards))[0]
    if bad.size:
      d = int(bad[0])
      raise InvalidArchitecture(
          f"{self.name}: decision {d} is {int(v[d])}, must be in [0, {int(cards[d])})")
    return v.astype(np.int32)

  def validate(self, arch: Arch) -> Arch:
    """Host check of an architecture pytree; raises InvalidArchitecture."""
    try:
      vector = self.to_vector(jax.tree.map(np.asarray, arch))
    except Exception as e:  # wrong structure or shape
      raise InvalidArchitecture(f"{self.name}: not an architecture of this space ({e})") from None
    self.validate_vector(vector)
    return arch
