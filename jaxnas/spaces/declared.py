"""Spaces declared from a nested structure of choices, some active only under conditions.

``declare({"depth": choice(1, 2, 3), "blocks": [{"kernel": choice(3, 5, when=...)}, ...]})``
gives a ``Space`` whose architecture is the same nested structure (dicts, lists,
tuples) with an int32 array at every choice: the chosen *value* for numeric
candidates (a width, a kernel size), the chosen *index* for named ones (an op
among ``("conv", "skip", "pool")``). A model built from ``jaxnas.nn`` reads it
directly: ``ElasticConv(...)(x, width=arch["width"])``. As in PyGlove's
``pg.oneof`` and NNI's ``nni.choice``, the user declares choices by name and the
framework derives the decision vector.

``when`` makes a choice conditional: a function of the architecture (values as
above, jnp arrays) that is true where the choice exists, e.g. a block's kernel
only when the depth reaches that block: ``when=lambda a: a["depth"] > 1``. A
condition may read any choice declared before it. Inactive decisions are fixed
to their first candidate in the canonical vector (``Space.canonical``), so
sampling, mutation, novelty and the budget count distinct networks, and the
string form (``encode``: ``"depth=2,blocks.0.kernel=5,..."``, inactive choices
omitted) round-trips through ``decode`` and ``--arch``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxnas.spaces.base import InvalidArchitecture, Space


class Choice(NamedTuple):
  """One decision: its candidate ``values`` and, optionally, when it is active."""
  values: tuple
  when: Callable[[Any], Any] | None = None

  @property
  def named(self) -> bool:
    return isinstance(self.values[0], str)


@flax.struct.dataclass
class Mixture:
  """A relaxed choice: candidate ``values`` (static) weighted by ``weights`` (float[K]).

  ``jaxnas.nn`` blocks given a Mixture compute the weighted sum of what each
  candidate computes (DARTS, Liu et al. 2019, for op choices; FBNetV2's
  mask mixtures, Wan et al. 2020, for width, and likewise for kernel and depth).
  A one-hot Mixture computes exactly the chosen candidate, with every candidate's
  work done (the batched form). Named candidates are their indices.
  """
  weights: jax.Array
  values: tuple = flax.struct.field(pytree_node=False)

  def expect(self, f):
    """``sum_k weights[k] * f(values[k])``."""
    return sum(self.weights[k] * f(v) for k, v in enumerate(self.values))

  def __mul__(self, other):
    """The product's Mixture (with a number, or with an independent Mixture: every pair of
    candidates, weighted by the product of their weights), e.g. an expansion ratio times a
    width."""
    if isinstance(other, Mixture):
      w = (self.weights[:, None] * other.weights[None, :]).reshape(-1)
      return Mixture(w, tuple(a * b for a in self.values for b in other.values))
    if isinstance(other, (int, float, np.integer, np.floating)):
      return Mixture(self.weights, tuple(v * other for v in self.values))
    return NotImplemented

  __rmul__ = __mul__


def choice(*values, when: Callable[[Any], Any] | None = None) -> Choice:
  """A decision among ``values`` (all numbers, or all names); ``when(arch)`` -> bool:
  whether it exists."""
  if not values:
    raise ValueError("choice() needs at least one value")
  named = [isinstance(v, str) for v in values]
  if any(named) and not all(named):
    raise ValueError(f"choice values must be all numbers or all names, got {values}")
  if not any(named) and not all(isinstance(v, (int, float, np.integer, np.floating))
                                and not isinstance(v, bool) for v in values):
    raise ValueError(f"choice values must be numbers or names, got {values}")
  if len(set(values)) != len(values):
    raise ValueError(f"choice values must be distinct, got {values}")
  return Choice(tuple(values), when)


def _flatten(structure, path=()):
  """``[(path, Choice)]`` in declaration order (dict insertion order, list order)."""
  if isinstance(structure, Choice):
    return [(path, structure)]
  if isinstance(structure, dict):
    items = structure.items()
  elif isinstance(structure, (list, tuple)):
    items = enumerate(structure)
  else:
    raise ValueError(f"a declared space holds dicts, lists, tuples and choice()s; "
                     f"{'.'.join(map(str, path)) or 'the root'} is {type(structure).__name__}")
  out = []
  for k, sub in items:
    if isinstance(k, str) and ("," in k or "=" in k or "." in k):
      raise ValueError(f"choice name {k!r} may not contain ',', '=' or '.'")
    out.extend(_flatten(sub, path + (k,)))
  return out


def _build(structure, leaves, path=()):
  """The structure with each choice replaced by ``leaves[path]``."""
  if isinstance(structure, Choice):
    return leaves[path]
  if isinstance(structure, dict):
    return {k: _build(v, leaves, path + (k,)) for k, v in structure.items()}
  seq = [_build(v, leaves, path + (i,)) for i, v in enumerate(structure)]
  return tuple(seq) if isinstance(structure, tuple) else seq


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def declare(structure, name: str = "declared") -> Space:
  """The ``Space`` of ``structure`` (see the module docstring)."""
  decisions = _flatten(structure)
  if not decisions:
    raise ValueError("a declared space needs at least one choice()")
  paths = [p for p, _ in decisions]
  labels = [".".join(map(str, p)) for p in paths]
  choices = [c for _, c in decisions]
  tables = [np.arange(len(c.values), dtype=np.int32) if c.named else
            np.asarray(c.values, np.float32 if any(isinstance(v, (float, np.floating))
                                                   for v in c.values) else np.int32)
            for c in choices]
  conditional = [d for d, c in enumerate(choices) if c.when is not None]

  def from_vector(vector):
    vector = jnp.asarray(vector, jnp.int32)
    leaves = {p: jnp.asarray(t)[vector[..., d]] for d, (p, t) in enumerate(zip(paths, tables))}
    return _build(structure, leaves)

  def relax(weights):
    if len(weights) != len(choices):
      raise ValueError(f"{name}: relax needs one weight vector per decision ({len(choices)}), "
                       f"got {len(weights)}")
    leaves = {}
    for d, (p, c, w) in enumerate(zip(paths, choices, weights)):
      if jnp.shape(w)[-1:] != (len(c.values),):
        raise ValueError(f"{name}: {labels[d]} has {len(c.values)} candidates, weights have "
                         f"shape {jnp.shape(w)}")
      values = tuple(range(len(c.values))) if c.named else tuple(c.values)
      leaves[p] = Mixture(jnp.asarray(w), values)
    return _build(structure, leaves)

  def to_vector(arch):
    cols = []
    for p, t in zip(paths, tables):
      leaf = jnp.asarray(_get(arch, p))
      cols.append(jnp.argmax(leaf[..., None] == jnp.asarray(t), axis=-1).astype(jnp.int32))
    return jnp.stack(cols, axis=-1)

  def canonical(vector):
    for d in conditional:
      on = jnp.asarray(choices[d].when(from_vector(vector)), bool)
      vector = vector.at[..., d].set(jnp.where(on, vector[..., d], 0))
    return vector

  def active(vector):
    if not conditional:
      return jnp.ones(vector.shape, bool)
    arch = from_vector(canonical(jnp.asarray(vector, jnp.int32)))
    return jnp.stack([jnp.ones(vector.shape[:-1], bool) if c.when is None else
                      jnp.broadcast_to(jnp.asarray(c.when(arch), bool), vector.shape[:-1])
                      for c in choices], axis=-1)

  def show(c: Choice, index: int) -> str:
    v = c.values[index]
    return v if c.named else repr(v) if isinstance(v, str) else str(v)

  def encode(arch) -> str:
    v = np.asarray(to_vector(jax.tree.map(np.asarray, arch)))
    on = np.asarray(active(v))
    return ",".join(f"{labels[d]}={show(choices[d], int(v[d]))}"
                    for d in range(len(choices)) if on[d])

  def decode(text: str):
    given = {}
    for part in filter(None, (s.strip() for s in str(text).split(","))):
      label, eq, value = part.partition("=")
      label, value = label.strip(), value.strip()
      if not eq or label not in labels:
        raise InvalidArchitecture(f"{name}: {part!r} is not a choice=value of this space "
                                  f"(choices: {', '.join(labels)})")
      if label in given:
        raise InvalidArchitecture(f"{name}: {label} is given twice")
      c = choices[labels.index(label)]
      shown = [show(c, i) for i in range(len(c.values))]
      if value not in shown:
        raise InvalidArchitecture(f"{name}: {label}={value} is not one of {', '.join(shown)}")
      given[label] = shown.index(value)
    vector = np.zeros(len(choices), np.int32)
    for label, index in given.items():
      vector[labels.index(label)] = index
    on = np.asarray(active(vector))
    for d, label in enumerate(labels):
      if on[d] and label not in given:
        raise InvalidArchitecture(f"{name}: {label} is missing")
      if not on[d] and label in given:
        raise InvalidArchitecture(f"{name}: {label} does not exist in this architecture")
    return jax.tree.map(np.asarray, from_vector(vector))

  return Space(name=name, cardinalities=tuple(len(c.values) for c in choices),
               to_vector=to_vector, from_vector=from_vector, encode=encode, decode=decode,
               active=active if conditional else None, relax=relax,
               labels=tuple(labels))


def to_python(arch):
  """One architecture with Python numbers at its leaves: the static form that builds the
  specialised network (``jaxnas.nn``)."""
  return jax.tree.map(lambda x: np.asarray(x).item(), arch)
