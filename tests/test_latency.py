"""Latency lookup tables (``jaxnas.models.latency``) and the latency objective: the table sum
is the entries of the blocks a network has, inside jit and vmap; a user's latency reaches
NSGA-II; tables round-trip through JSON and are measured on the current backend."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnas
from jaxnas import pareto, runner
from jaxnas.estimators.training import ProxySpec, train_evaluator
from jaxnas.models import latency as lat
from jaxnas.models import mbconv_net
from jaxnas.models.protocol import count_params
from jaxnas.models.registry import mbconv_model
from jaxnas.models.train import TrainConfig
from jaxnas.spaces.mbconv import DEPTHS, STAGES, STEM, mbconv_space
from jaxnas.strategies.nsga2 import nsga2

from byo_model import SPACE as BYO_SPACE
from byo_model import SmallCNN
from conftest import FASHION_MNIST_SUBSET

SHAPE = (28, 28, 1)


@functools.lru_cache(maxsize=None)
def _archs(n, seed=0):
  space = mbconv_space()
  keys = jax.random.split(jax.random.PRNGKey(seed), n)
  return jax.jit(jax.vmap(lambda k: space.from_vector(space.canonical(space.sample_vector(k)))))(
      keys)


def _member(archs, i):
  return jax.tree.map(lambda x: int(np.asarray(x)[i]), archs)


def _keys_present(arch) -> list[str]:
  """The table keys of an MBConv architecture's parts, written out with Python loops."""
  keys, w_in = ["stem"], STEM
  for s in range(1, len(STAGES) + 1):
    a = arch[f"stage{s}"]
    for b in range(1, a["depth"] + 1):
      k, e = a[f"block{b}"]["kernel"], a[f"block{b}"]["expand"]
      keys.append(lat.first_key(s, w_in, a["width"], k, e) if b == 1 else
                  lat.rest_key(s, a["width"], k, e))
    w_in = a["width"]
  return keys + [lat.head_key(w_in)]


def _fake_table(shape=SHAPE, overhead=0.25, seed=0):
  rng = np.random.default_rng(seed)
  keys = lat.mbconv_keys()
  ms = {k: float(v) for k, v in zip(keys, rng.uniform(0.5, 2.0, len(keys)))}
  return lat.LatencyTable("mbconv", shape, ms, overhead, {"backend": jax.default_backend(),
                                                          "layout": lat.mbconv_layout()})


@pytest.mark.parametrize("jit", [True, False])
def test_lut_sum_is_the_entries_of_the_blocks_present(jit):
  table = _fake_table()
  latency = lat.mbconv_latency([table])
  archs = _archs(8)
  batched = jax.vmap(lambda a: latency(a, SHAPE))
  got = (jax.jit(batched) if jit else batched)(archs)
  chex.assert_shape(got, (8,))
  assert got.dtype == jnp.float32
  for i in range(8):
    arch = _member(archs, i)
    keys = _keys_present(arch)
    want = sum(table.ms[k] for k in keys)
    np.testing.assert_allclose(got[i], want, rtol=1e-5)
    assert len(keys) == 2 + sum(arch[f"stage{s}"]["depth"] for s in range(1, 5))
  one = jax.jit(latency, static_argnums=1) if jit else latency  # unbatched: the same
  np.testing.assert_allclose(one(jax.tree.map(lambda x: x[0], archs), SHAPE), got[0], rtol=1e-6)


def test_blocks_past_the_depth_do_not_count():
  latency = jax.jit(lambda a: lat.mbconv_latency([_fake_table()])(a, SHAPE))
  arch = jax.tree.map(lambda x: x[0], _archs(8))
  arch["stage2"]["depth"] = jnp.int32(min(DEPTHS))
  base = latency(arch)
  for k in (3, 7):  # a non-canonical kernel of an absent block changes nothing
    arch["stage2"]["block4"]["kernel"] = jnp.int32(k)
    assert latency(arch) == base
  arch["stage2"]["depth"] = jnp.int32(max(DEPTHS))
  assert latency(arch) != base


def test_parts_are_the_networks_layers():
  """The timed parts are the network's own layers: their parameters add up to its count."""
  parts = lat.mbconv_parts(SHAPE)
  assert list(parts) == lat.mbconv_keys() and len(parts) == 382
  archs = _archs(8)
  want = jax.jit(jax.vmap(lambda a: mbconv_net.cost(a, 10, 1, 28)[0]))(archs)
  for i in range(2):
    params = sum(count_params(lat.part_variables(parts[k]))
                 for k in _keys_present(_member(archs, i)))
    assert params == int(want[i])


def test_unknown_image_shape_and_incomplete_table_are_refused():
  latency = lat.mbconv_latency([_fake_table()])
  with pytest.raises(ValueError, match="no MBConv latency table for 32x32x3"):
    jax.eval_shape(lambda a: latency(a, (32, 32, 3)), jax.tree.map(lambda x: x[0], _archs(8)))
  table = _fake_table()
  del table.ms["stem"]
  with pytest.raises(ValueError, match="no entry for stem"):
    lat.mbconv_latency([table])
  table = _fake_table()
  table.meta["layout"] = {**table.meta["layout"], "head": 1}
  with pytest.raises(ValueError, match="another MBConv layout"):
    lat.mbconv_latency([table])


def test_builtin_table_is_the_mbconv_models_latency():
  model = mbconv_model(TrainConfig(space="mbconv"))
  assert model.latency is not None
  assert model.latency.source["tables"] == "jaxnas/data/mbconv_latency_cpu.json"
  tables = lat.builtin_mbconv_tables()
  assert {t.image_shape for t in tables} == {(28, 28, 1), (32, 32, 3)}
  archs = _archs(8)
  for shape in ((28, 28, 1), (32, 32, 3)):
    got = jax.jit(jax.vmap(lambda a: model.latency(a, shape)))(archs)
    want = jax.jit(jax.vmap(lambda a: lat.mbconv_latency(tables)(a, shape)))(archs)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert np.all(np.asarray(got) > 0)


def _byo_latency(arch, image_shape):
  """A user's latency model: any jittable function of the architecture."""
  del image_shape
  return 0.1 * arch["width"].astype(jnp.float32) + arch["depth"].astype(jnp.float32)


def test_a_users_latency_reaches_nsga2():
  zero = lambda arch, image_shape, num_classes: (jnp.int32(0), jnp.int32(0))
  model = jaxnas.searchable(SmallCNN(classes=10), BYO_SPACE, cost=zero, latency=_byo_latency)
  assert model.latency is _byo_latency
  evaluator = train_evaluator(ProxySpec(data_dir=FASHION_MNIST_SUBSET), model=model)
  archs = jax.vmap(BYO_SPACE.from_vector)(jnp.asarray([[0, 0, 0, 0, 0], [1, 1, 1, 1, 1]]))
  report = evaluator.report(archs)
  np.testing.assert_allclose(report["latency"], [1.4, 2.8], rtol=1e-6)
  costs = pareto.cost_objectives(evaluator, ("params", "latency"))
  np.testing.assert_allclose(jax.jit(costs)(archs)[:, 1], [-1.4, -2.8], rtol=1e-6)

  # NSGA-II on a stand-in accuracy (no training), the user's latency its second objective.
  tiny = jaxnas.Evaluator(name="byo", space=BYO_SPACE, jittable=True,
                          evaluate=lambda key, a: a["width"].astype(jnp.float32),
                          report=lambda a: {"latency": jax.vmap(
                              lambda m: model.latency(m, SHAPE))(a)})
  strategy = nsga2(BYO_SPACE, population_size=4,
                   costs=pareto.cost_objectives(tiny, ("latency",)))
  state = runner.run_search(jaxnas.make_search(strategy, tiny, 12), checkpoint_every=0)["state"]
  survivors = jax.tree.map(lambda x: x[0], state.strategy)
  members = jax.vmap(BYO_SPACE.from_vector)(survivors.vectors)
  np.testing.assert_allclose(survivors.objectives[:, 1],
                             -jax.vmap(lambda a: _byo_latency(a, SHAPE))(members), rtol=1e-6)


def test_objectives_latency_needs_a_latency_model():
  runner.validate(runner.SearchConfig(space="mbconv", evaluator="train",
                                      objectives=("accuracy", "latency")))
  with pytest.raises(runner.UserError, match="--objectives=accuracy,latency: --space=nb201 "
                                             "has no latency model"):
    runner.validate(runner.SearchConfig(evaluator="train", objectives=("accuracy", "latency")))
  for evaluator in runner.MODEL_EVALUATORS:  # every evaluator of the space reports it
    runner.validate(runner.SearchConfig(space="mbconv", evaluator=evaluator,
                                        objectives=("accuracy", "latency")))


def test_measure_save_load_round_trip(tmp_path):
  parts = lat.mbconv_parts(SHAPE)
  keys = [lat.mbconv_keys()[i] for i in (0, 1, 300, -1)]  # stem, two blocks, a head
  table = lat.measure_table("tiny", {k: parts[k] for k in keys}, SHAPE, repeats=3,
                            conv="test")
  assert list(table.ms) == keys
  assert all(v > 0 for v in table.ms.values()) and table.overhead_ms > 0
  assert table.meta["backend"] == jax.default_backend()
  assert table.meta["jax_version"] == jax.__version__
  assert table.meta["batch"] == lat.BATCH and table.meta["conv"] == "test"
  path = str(tmp_path / "t.json")
  lat.save_tables(path, [table, _fake_table((32, 32, 3))])
  loaded = lat.load_tables(path)
  assert loaded == [table, _fake_table((32, 32, 3))]
  (tmp_path / "bad.json").write_text('{"format": "other"}')
  with pytest.raises(ValueError, match="not a jaxnas-latency-table"):
    lat.load_tables(str(tmp_path / "bad.json"))
