"""Declared spaces (``jaxnas.declare``): conditions, the canonical form, the string form, and
every strategy counting distinct networks."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnas
from jaxnas.search import make_search
from jaxnas.spaces import InvalidArchitecture, choice, declare
from jaxnas.spaces.declared import to_python
from jaxnas.strategies import STRATEGIES

from conftest import fast_jit


def toy_space():
  """Depth 1-3; each block's kernel and op exist only where the depth reaches the block:
  2 * (4 + 16 + 64) = 168 networks in a box of 384 vectors."""
  return declare({
      "depth": choice(1, 2, 3), "width": choice(16, 32),
      "blocks": [{"kernel": choice(3, 5, when=lambda a, i=i: a["depth"] > i),
                  "op": choice("conv", "pool", when=lambda a, i=i: a["depth"] > i)}
                 for i in range(3)]}, name="toy")


SPACE = toy_space()


def _vectors(n, key=0):
  return jax.vmap(SPACE.sample_vector)(jax.random.split(jax.random.PRNGKey(key), n))


def _brute_force_networks():
  """Distinct (depth, width, active block choices) tuples, counted by hand."""
  seen = set()
  for depth in (1, 2, 3):
    for width in (16, 32):
      for blocks in np.ndindex(*([2, 2] * depth)):
        seen.add((depth, width, blocks))
  return len(seen)


def test_sizes():
  assert SPACE.cardinalities == (3, 2, 2, 2, 2, 2, 2, 2) and SPACE.size == 384
  assert SPACE.num_networks() == _brute_force_networks() == 168


def test_arch_is_the_declared_structure_of_values():
  arch = SPACE.from_vector(jnp.asarray([2, 1, 1, 0, 0, 1, 1, 0]))
  assert int(arch["depth"]) == 3 and int(arch["width"]) == 32
  assert [int(b["kernel"]) for b in arch["blocks"]] == [5, 3, 5]
  assert [int(b["op"]) for b in arch["blocks"]] == [0, 1, 0]  # named choices: the index
  assert to_python(arch)["blocks"][1] == {"kernel": 3, "op": 1}
  np.testing.assert_array_equal(SPACE.to_vector(arch), [2, 1, 1, 0, 0, 1, 1, 0])


def test_operators_give_canonical_vectors_and_mutation_changes_the_network():
  v = _vectors(2000)
  canon = jax.vmap(SPACE.canonical)
  np.testing.assert_array_equal(canon(v), v)
  m = jax.vmap(SPACE.mutate_vector)(jax.random.split(jax.random.PRNGKey(1), 2000), v)
  np.testing.assert_array_equal(canon(m), m)
  assert np.all(np.asarray(jax.vmap(SPACE.key_of)(m)) != np.asarray(jax.vmap(SPACE.key_of)(v)))
  c = jax.vmap(SPACE.crossover_vector)(jax.random.split(jax.random.PRNGKey(2), 1999), v[1:],
                                       v[:-1])
  np.testing.assert_array_equal(canon(c), c)
  n = jax.vmap(SPACE.neighbour_vectors)(v[:50])
  np.testing.assert_array_equal(jax.vmap(canon)(n), n)
  # Inactive decisions are 0 where the depth stops: depth 1 keeps only block 0.
  depth1 = np.asarray(v)[np.asarray(v)[:, 0] == 0]
  assert len(depth1) and (depth1[:, 4:] == 0).all()


def test_vectors_of_one_network_share_a_key():
  a = jnp.asarray([0, 1, 1, 1, 0, 0, 0, 0])
  b = jnp.asarray([0, 1, 1, 1, 1, 1, 0, 1])  # same depth-1 network, junk in blocks 1-2
  assert int(SPACE.key_of(a)) == int(SPACE.key_of(b))
  np.testing.assert_array_equal(SPACE.canonical(b), a)


def test_string_form_round_trips_and_omits_inactive_choices():
  v = np.asarray(_vectors(500))
  for row in v:
    text = SPACE.encode(SPACE.from_vector(row))
    np.testing.assert_array_equal(SPACE.to_vector(SPACE.decode(text)), row)
  text = SPACE.encode(SPACE.from_vector(jnp.asarray([0, 0, 1, 1, 0, 0, 0, 0])))
  assert text == "depth=1,width=16,blocks.0.kernel=5,blocks.0.op=pool"
  assert SPACE.encode(SPACE.decode(" blocks.0.op=pool, depth=1,width=16,blocks.0.kernel=5")) \
      == text


@pytest.mark.parametrize("text,mention", [
    ("depth=4,width=16,blocks.0.kernel=3,blocks.0.op=conv", "depth=4 is not one of 1, 2, 3"),
    ("depth=1,width=16", "blocks.0.kernel is missing"),
    ("depth=1,width=16,blocks.0.kernel=3,blocks.0.op=conv,blocks.1.op=pool",
     "blocks.1.op does not exist"),
    ("depth=1,depth=1", "given twice"),
    ("colour=red", "not a choice=value"),
    ("depth", "not a choice=value"),
])
def test_decode_rejects_bad_strings(text, mention):
  with pytest.raises(InvalidArchitecture, match=mention):
    SPACE.decode(text)


@pytest.mark.parametrize("structure,mention", [
    ({}, "at least one"),
    ({"a": 3}, "is int"),
    ({"a.b": choice(1, 2)}, "may not contain"),
])
def test_declare_rejects_bad_structures(structure, mention):
  with pytest.raises(ValueError, match=mention):
    declare(structure)


def test_choice_rejects_bad_values():
  for values in [(), (1, "a"), (1, 1), (True, False)]:
    with pytest.raises(ValueError):
      choice(*values)


def _evaluator(space):
  """A jittable fitness: a fixed random score per (decision, value), active ones only."""
  w = jax.random.uniform(jax.random.PRNGKey(7), (space.num_decisions, space.max_cardinality))

  def evaluate(key, archs):
    del key
    v = jax.vmap(space.to_vector)(archs)
    on = jax.vmap(space.active)(v)
    return 100.0 * jnp.sum(jnp.where(on, jnp.take_along_axis(w[None], v[..., None], -1)[..., 0],
                                     0.0), -1) / space.num_decisions

  return jaxnas.Evaluator(name=space.name, space=space, evaluate=evaluate,
                          report=lambda archs: {}, jittable=True)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_evaluates_distinct_networks(name):
  """Scanned, vmapped over seeds, on the conditional space: no network twice."""
  kwargs = {"predictor": {"train_steps": 20, "ensemble_size": 2, "hidden": 8,
                          "num_candidates": 40, "num_init": 4}}.get(name, {})
  search = make_search(STRATEGIES[name](SPACE, **kwargs), _evaluator(SPACE), 40)
  run = fast_jit(jax.vmap(lambda k: search.run_chunk(search.init(k), jnp.int32(0),
                                                    search.num_steps)[0]))
  state = run(jax.vmap(jax.random.PRNGKey)(jnp.arange(3)))
  assert (np.asarray(state.num_duplicates) == 0).all()
  vectors = np.asarray(state.archive.vectors)[:, :40]
  keys = np.asarray(jax.vmap(jax.vmap(SPACE.key_of))(jnp.asarray(vectors)))
  for i in range(3):
    assert len(np.unique(keys[i])) == 40, f"seed {i}: a network evaluated twice"


def test_budget_beyond_the_networks_is_refused():
  with pytest.raises(ValueError, match="exceeds the 168 architectures"):
    make_search(STRATEGIES["random"](SPACE), _evaluator(SPACE), 169)
