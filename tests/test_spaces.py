"""Search spaces: validity of every operator, string formats, rank/unrank, the nb201 table."""

from __future__ import annotations

import importlib.resources
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import jaxnas
from jaxnas.spaces import SPACES, DartsArch, InvalidArchitecture
from jaxnas.spaces import darts as darts_lib

from conftest import fast_jit

# The box spaces, every vector a distinct network; a conditional space (mbconv) samples and
# mutates canonical vectors instead (tests/test_declared.py, tests/test_mbconv.py).
SPACE_NAMES = sorted(n for n in SPACES if SPACES[n]().active is None)
N = 256  # architectures per property check


def _vectors(space, archs):
  return np.asarray(jax.vmap(space.to_vector)(archs))


def _unbatch(archs, i):
  return jax.tree.map(lambda x: x[i], archs)


def _check_darts_inputs(archs):
  """Every intermediate node i takes two distinct earlier nodes, inputs a < b <= i + 1."""
  for cell in ("normal", "reduce"):
    inputs = np.asarray(getattr(archs, f"{cell}_inputs")).reshape(-1, 4, 2)
    ops = np.asarray(getattr(archs, f"{cell}_ops")).reshape(-1, 4, 2)
    assert ((0 <= ops) & (ops < len(darts_lib.OPS))).all(), ops
    a, b = inputs[..., 0], inputs[..., 1]
    node = np.arange(4)
    ok = (0 <= a) & (a < b) & (b <= node + 1)
    assert ok.all(), (cell, np.argwhere(~ok), inputs[~ok.all(1)])


def _check_valid(space, archs):
  """Every architecture of a batch is valid (decision box, and the DARTS DAG rule)."""
  vectors = _vectors(space, archs)
  for v in vectors:
    space.validate_vector(v)
  for i in range(min(8, vectors.shape[0])):  # the slower host check of whole pytrees
    space.validate(_unbatch(archs, i))
  if space.name == "darts":
    _check_darts_inputs(archs)
  # The vector <-> arch map is a bijection on valid vectors.
  again = fast_jit(jax.vmap(lambda v: space.to_vector(space.from_vector(v))))(vectors)
  np.testing.assert_array_equal(np.asarray(again), vectors)
  return vectors


def _num_changed(a, b):
  return np.sum(np.asarray(a) != np.asarray(b), axis=-1)


class OperatorsTest(chex.TestCase):
  """sample/mutate/crossover stay in the space, with and without jit."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*SPACE_NAMES)
  def test_sample_is_valid_and_covers_every_choice(self, name):
    space = SPACES[name]()
    sample = self.variant(jax.vmap(space.sample))
    archs = sample(jax.random.split(jax.random.PRNGKey(0), 2000))
    vectors = _check_valid(space, archs)
    for d, k in enumerate(space.cardinalities):
      counts = np.bincount(vectors[:, d], minlength=k)
      assert counts.shape == (k,), (d, counts)
      # Uniform: each of the k values gets about 2000/k draws.
      assert counts.min() > 0.5 * 2000 / k, (d, counts)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*SPACE_NAMES)
  def test_mutate_changes_exactly_one_decision(self, name):
    space = SPACES[name]()
    keys = jax.random.split(jax.random.PRNGKey(1), 2 * N)
    parents = jax.vmap(space.sample)(keys[:N])
    mutate = self.variant(jax.vmap(space.mutate))
    children = mutate(keys[N:], parents)
    before = _vectors(space, parents)
    after = _check_valid(space, children)
    np.testing.assert_array_equal(_num_changed(before, after), 1)

  @parameterized.parameters(*SPACE_NAMES)
  def test_mutate_reaches_every_decision(self, name):
    space = SPACES[name]()
    parent = space.sample(jax.random.PRNGKey(2))
    keys = jax.random.split(jax.random.PRNGKey(3), 3000)
    children = _vectors(space, fast_jit(jax.vmap(lambda k: space.mutate(k, parent)))(keys))
    changed = np.nonzero(children != np.asarray(space.to_vector(parent)))[1]
    mutable = {d for d, k in enumerate(space.cardinalities) if k > 1}
    assert set(changed.tolist()) == mutable

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*SPACE_NAMES)
  def test_crossover_takes_each_decision_from_a_parent(self, name):
    space = SPACES[name]()
    keys = jax.random.split(jax.random.PRNGKey(4), 3 * N)
    a = jax.vmap(space.sample)(keys[:N])
    b = jax.vmap(space.sample)(keys[N:2 * N])
    cross = self.variant(jax.vmap(space.crossover))
    children = _check_valid(space, cross(keys[2 * N:], a, b))
    va, vb = _vectors(space, a), _vectors(space, b)
    assert ((children == va) | (children == vb)).all()
    # Both parents contribute (uniform crossover, not a copy of one parent).
    differ = va != vb
    from_a = (children == va) & differ
    from_b = (children == vb) & differ
    assert 0.4 < from_a.sum() / differ.sum() < 0.6
    assert 0.4 < from_b.sum() / differ.sum() < 0.6


@pytest.mark.parametrize("name", SPACE_NAMES)
def test_neighbours_are_all_one_decision_changes(name):
  space = SPACES[name]()
  arch = space.sample(jax.random.PRNGKey(5))
  v = np.asarray(space.to_vector(arch))
  nbs = space.neighbours(arch)
  vectors = _check_valid(space, nbs)
  assert vectors.shape == (space.num_neighbours, space.num_decisions)
  assert space.num_neighbours == sum(k - 1 for k in space.cardinalities)
  np.testing.assert_array_equal(_num_changed(vectors, v), 1)
  assert len({tuple(row) for row in vectors.tolist()}) == space.num_neighbours
  # Exactly the set of one-decision changes, built independently.
  expected = set()
  for d, k in enumerate(space.cardinalities):
    for value in range(k):
      if value != v[d]:
        w = v.copy()
        w[d] = value
        expected.add(tuple(w.tolist()))
  assert {tuple(row) for row in vectors.tolist()} == expected


@pytest.mark.parametrize("name", SPACE_NAMES)
def test_validate_vector_rejects_out_of_range(name):
  space = SPACES[name]()
  cards = np.asarray(space.cardinalities)
  good = np.zeros(space.num_decisions, np.int32)
  space.validate_vector(good)
  space.validate_vector(cards - 1)
  for d in (0, space.num_decisions - 1):
    for bad_value in (-1, int(cards[d])):
      bad = good.copy()
      bad[d] = bad_value
      with pytest.raises(InvalidArchitecture, match=f"decision {d}"):
        space.validate_vector(bad)
  with pytest.raises(InvalidArchitecture):
    space.validate_vector(good[:-1])
  with pytest.raises(InvalidArchitecture):
    space.validate_vector(good.astype(np.float32))
  with pytest.raises(InvalidArchitecture):
    space.validate_vector(np.stack([good, good]))


# ----------------------------------------------------------------- NB201
def _raw_table():
  path = importlib.resources.files("jaxnas.data").joinpath("nb201_12epoch.npz")
  with importlib.resources.as_file(path) as p, np.load(p) as raw:
    return {k: raw[k] for k in raw.files}


def _nb201_string(ops, v):
  o = [str(ops[i]) for i in v]
  return f"|{o[0]}~0|+|{o[1]}~0|{o[2]}~1|+|{o[3]}~0|{o[4]}~1|{o[5]}~2|"


def test_nb201_encode_decode_all_cells():
  space = jaxnas.nb201_space()
  ops = _raw_table()["ops"]
  archs = np.asarray(space.enumerate())
  assert archs.shape == (15625, 6)
  # enumerate is rank order: the first decision is the most significant.
  np.testing.assert_array_equal(archs, np.asarray(list(itertools.product(range(5), repeat=6))))
  strings = set()
  for v in archs:
    s = space.encode(v)
    assert s == _nb201_string(ops, v)
    np.testing.assert_array_equal(np.asarray(space.decode(s)), v)
    strings.add(s)
  assert len(strings) == 15625


def test_nb201_decode_accepts_surrounding_whitespace():
  space = jaxnas.nb201_space()
  s = "|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|"
  np.testing.assert_array_equal(np.asarray(space.decode(f"  {s}\n")), [3, 3, 3, 1, 3, 3])


def test_nb201_rank_unrank_bijection():
  space = jaxnas.nb201_space()
  idx = jnp.arange(space.size)
  vectors = space.unrank(idx)
  np.testing.assert_array_equal(np.asarray(jax.vmap(space.rank)(vectors)), np.arange(15625))
  assert len(np.unique(np.asarray(vectors), axis=0)) == 15625
  # Independent mixed-radix check on random vectors.
  v = np.asarray(jax.vmap(space.sample_vector)(jax.random.split(jax.random.PRNGKey(6), 100)))
  expected = (v * 5 ** np.arange(5, -1, -1)).sum(1)
  np.testing.assert_array_equal(np.asarray(jax.vmap(space.rank)(jnp.asarray(v))), expected)
  np.testing.assert_array_equal(np.asarray(space.unrank(jnp.asarray(expected))), v)


NB201_GOOD = "|none~0|+|skip_connect~0|nor_conv_1x1~1|+|nor_conv_3x3~0|avg_pool_3x3~1|none~2|"
NB201_BAD = [
    ("|none~0|+|none~0|none~1|", "node groups"),  # 2 node groups
    ("|none~0|+|none~0|none~1|+|none~0|none~1|none~2|+|none~0|", "node groups"),
    ("|none~0|+|none~0|+|none~0|none~1|none~2|", "inputs"),  # node 2 has one input
    ("|none~0|+|none~0|conv_5x5~1|+|none~0|none~1|none~2|", "conv_5x5"),
    ("|none~0|+|none~0|none~2|+|none~0|none~1|none~2|", "none~2"),  # wrong input index
    ("|none~1|+|none~0|none~1|+|none~0|none~1|none~2|", "none~1"),
    ("|none|+|none~0|none~1|+|none~0|none~1|none~2|", "none"),  # no ~i
    ("none~0+|none~0|none~1|+|none~0|none~1|none~2|", "none~0"),  # missing bars
    ("", "node groups"),
]


@pytest.mark.parametrize("string,mention", NB201_BAD)
def test_nb201_decode_rejects_malformed(string, mention):
  space = jaxnas.nb201_space()
  space.decode(NB201_GOOD)
  with pytest.raises(InvalidArchitecture) as e:
    space.decode(string)
  message = str(e.value)
  assert message.startswith("nb201")
  assert mention in message
  assert "\n" not in message


@pytest.mark.parametrize("name", SPACE_NAMES)
@pytest.mark.parametrize("value", [None, 123, b"|none~0|", ["|none~0|"]])
def test_decode_rejects_non_strings(name, value):
  with pytest.raises(InvalidArchitecture, match="string"):
    SPACES[name]().decode(value)


def test_nb201_encode_rejects_invalid_arrays():
  space = jaxnas.nb201_space()
  for bad in ([0, 0, 0, 0, 0, 5], [-1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0]):
    with pytest.raises(InvalidArchitecture):
      space.encode(np.asarray(bad))


@pytest.mark.parametrize("dataset", jaxnas.estimators.NB201_DATASETS)
def test_nb201_evaluator_matches_raw_table(dataset):
  raw = _raw_table()
  column = [str(d).lower() for d in raw["datasets"]].index(dataset.lower())
  evaluator = jaxnas.nb201_evaluator(dataset)
  space = evaluator.space
  archs = jax.vmap(space.sample)(jax.random.split(jax.random.PRNGKey(7), 64))
  fitness = np.asarray(evaluator.evaluate(jax.random.PRNGKey(0), archs))
  fitness_jit = np.asarray(fast_jit(evaluator.evaluate)(jax.random.PRNGKey(0), archs))
  # vmap over single architectures (a batch of batches of one).
  fitness_vmap = np.asarray(jax.vmap(
      lambda a: evaluator.evaluate(jax.random.PRNGKey(0), a[None])[0])(archs))
  report = fast_jit(evaluator.report)(archs)
  table_arch = raw["arch"].astype(np.int64)
  for i, v in enumerate(np.asarray(archs)):
    rows = np.nonzero((table_arch == v).all(1))[0]
    assert rows.shape == (1,), (v, rows)
    row = rows[0]
    assert fitness[i] == raw["val12"][row, column]
    assert fitness_jit[i] == raw["val12"][row, column]
    assert fitness_vmap[i] == raw["val12"][row, column]
    assert float(report["test_accuracy"][i]) == raw["test12"][row, column]
    assert float(report["val_accuracy"][i]) == raw["val12"][row, column]


def test_nb201_datasets_differ():
  """Guards against every dataset reading the same table column."""
  archs = jaxnas.nb201_space().enumerate()
  cols = [np.asarray(jaxnas.nb201_evaluator(d).evaluate(None, archs))
          for d in jaxnas.estimators.NB201_DATASETS]
  for a, b in itertools.combinations(cols, 2):
    assert not np.allclose(a, b)


def test_nb201_evaluator_rejects_unknown_dataset():
  with pytest.raises(ValueError, match="mnist"):
    jaxnas.nb201_evaluator("mnist")


# ----------------------------------------------------------------- DARTS
DARTS_V2 = (
    "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), "
    "('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), "
    "('dil_conv_3x3', 2)], normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), "
    "('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), ('max_pool_3x3', 0), "
    "('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)], reduce_concat=[2, 3, 4, 5])")
DARTS_V2_CELLS = {
    "normal": [("sep_conv_3x3", 0), ("sep_conv_3x3", 1), ("sep_conv_3x3", 0), ("sep_conv_3x3", 1),
               ("sep_conv_3x3", 1), ("skip_connect", 0), ("skip_connect", 0), ("dil_conv_3x3", 2)],
    "reduce": [("max_pool_3x3", 0), ("max_pool_3x3", 1), ("skip_connect", 2), ("max_pool_3x3", 1),
               ("max_pool_3x3", 0), ("skip_connect", 2), ("skip_connect", 2), ("max_pool_3x3", 1)],
}


def _cell_edges(arch, cell):
  ops = np.asarray(getattr(arch, f"{cell}_ops"))
  inputs = np.asarray(getattr(arch, f"{cell}_inputs"))
  return [{(darts_lib.OPS[ops[2 * n + j]], int(inputs[2 * n + j])) for j in range(2)}
          for n in range(4)]


@pytest.mark.parametrize("concat", ["[2, 3, 4, 5]", "range(2, 6)"])
def test_darts_v2_parses(concat):
  space = jaxnas.darts_space()
  arch = space.decode(DARTS_V2.replace("[2, 3, 4, 5]", concat))
  assert isinstance(arch, DartsArch)
  _check_darts_inputs(arch)
  space.validate(arch)
  for cell, edges in DARTS_V2_CELLS.items():
    expected = [set(edges[2 * n: 2 * n + 2]) for n in range(4)]
    assert _cell_edges(arch, cell) == expected
  again = space.decode(space.encode(arch))
  chex.assert_trees_all_equal(again, arch)


def test_darts_encode_decode_round_trip_batch():
  space = jaxnas.darts_space()
  archs = jax.vmap(space.sample)(jax.random.split(jax.random.PRNGKey(8), 200))
  strings = set()
  for i in range(200):
    arch = _unbatch(archs, i)
    s = space.encode(arch)
    assert s.startswith("Genotype(normal=[")
    strings.add(s)
    chex.assert_trees_all_equal(space.decode(s), arch)
  assert len(strings) == 200


def _darts_with(normal):
  return DARTS_V2.replace(
      "normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), "
      "('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), "
      "('dil_conv_3x3', 2)]", f"normal={normal}")


DARTS_EDGES_OK = ("('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), "
                  "('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)")
DARTS_BAD = [
    (_darts_with("[('sep_conv_3x3', 0), ('sep_conv_3x3', 0), ('sep_conv_3x3', 0), "
                 "('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('skip_connect', 0), "
                 "('skip_connect', 0), ('dil_conv_3x3', 2)]"), "twice"),  # repeated input
    (_darts_with("[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), "
                 "('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('skip_connect', 0), "
                 "('skip_connect', 0), ('dil_conv_3x3', 5)]"), "input 5"),  # node 5 takes 5
    (_darts_with("[('sep_conv_3x3', 0), ('sep_conv_3x3', 2), ('sep_conv_3x3', 0), "
                 "('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('skip_connect', 0), "
                 "('skip_connect', 0), ('dil_conv_3x3', 2)]"), "input 2"),  # node 2 takes itself
    (_darts_with("[('conv_7x7', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), "
                 "('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('skip_connect', 0), "
                 "('skip_connect', 0), ('dil_conv_3x3', 2)]"), "conv_7x7"),
    (_darts_with("[('sep_conv_3x3', 0), ('sep_conv_3x3', 1)]"), "8"),  # wrong node count
    (_darts_with(f"[{DARTS_EDGES_OK}, ('sep_conv_3x3', 0), ('sep_conv_3x3', 1)]"), "8"),
    (_darts_with("[('sep_conv_3x3', -1), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), "
                 "('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('skip_connect', 0), "
                 "('skip_connect', 0), ('dil_conv_3x3', 2)]"), "-1"),
    (DARTS_V2.replace("normal_concat=[2, 3, 4, 5]", "normal_concat=[2, 3]"), "concat"),
    (DARTS_V2.replace("reduce=", "reduction="), "reduce"),
    ("Genotype(normal=[('sep_conv_3x3', 0)", "Genotype"),  # truncated
    ("", "Genotype"),
    ("Genotype(normal=[(", "Genotype"),
    ("|none~0|+|none~0|none~1|+|none~0|none~1|none~2|", "Genotype"),  # an nb201 string
]


@pytest.mark.parametrize("string,mention", DARTS_BAD)
def test_darts_decode_rejects_malformed(string, mention):
  space = jaxnas.darts_space()
  with pytest.raises(InvalidArchitecture) as e:
    space.decode(string)
  message = str(e.value)
  assert message.startswith("darts")
  assert mention.lower() in message.lower(), message
  assert "\n" not in message


def test_darts_validate_rejects_bad_inputs():
  space = jaxnas.darts_space()
  arch = space.decode(DARTS_V2)
  for inputs in ([1, 0, 0, 1, 0, 1, 0, 2],   # a > b (not canonical)
                 [0, 0, 0, 1, 0, 1, 0, 2],   # repeated input
                 [0, 2, 0, 1, 0, 1, 0, 2]):  # node 2 takes node 2
    bad = arch._replace(normal_inputs=jnp.asarray(inputs, jnp.int32))
    with pytest.raises(InvalidArchitecture):
      space.validate(bad)
    with pytest.raises(InvalidArchitecture):
      space.encode(bad)
  with pytest.raises(InvalidArchitecture):
    space.validate(arch._replace(reduce_ops=jnp.full((8,), 8, jnp.int32)))
