"""The searchable-model protocol: a user's model trains under every population plan with the
same results, sharded over devices, with NaN containment; its cost and errors."""

from __future__ import annotations

import os
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas.models import train
from jaxnas.models.protocol import count_params
from jaxnas.models.registry import model_of
from jaxnas.nn import specialised_shapes

from byo_model import MODEL, SPACE, SmallCNN
from conftest import run_child

# The module alone on one core: 38.4 -> 33.0 s (conftest._library_compile_setting).
FAST_LIBRARY_COMPILE = True


def _data():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 255, (256, 8, 8, 1), dtype=np.uint8)
  y = (x.reshape(256, -1).mean(1) > 127).astype(np.int32)  # learnable
  return train.make_data(x[:192], y[:192], x[192:], y[192:], (0.5,), (0.25,))


ARCHS = jax.vmap(SPACE.sample)(jax.random.split(jax.random.PRNGKey(0), 5))
CONFIG = train.TrainConfig(steps=4, batch_size=16, num_classes=2, eval_batch_size=32,
                           model=MODEL)


def test_every_plan_trains_the_same_networks():
  """``map`` and ``vmap`` (arch as data), ``sequential`` and ``sequential_static`` (the
  specialised network of each member, its variables extracted from the elastic init)."""
  scales = np.array([1, 1, 1e30, 1, 1], np.float32)  # member 2 diverges, alone
  out = {plan: train.train_population_metrics(ARCHS, jax.random.PRNGKey(3), _data(),
                                              CONFIG._replace(plan=plan), lr_scales=scales)
         for plan in train.PLANS}
  for plan in train.PLANS:
    assert np.asarray(out[plan]["failed"]).tolist() == [False, False, True, False, False], plan
    chex.assert_trees_all_close(out[plan]["losses"][np.r_[0, 1, 3, 4]],
                                out["map"]["losses"][np.r_[0, 1, 3, 4]], rtol=2e-4, atol=1e-5)
  assert np.isnan(np.asarray(out["map"]["val_accuracy"])[2])


def test_cost_is_the_specialised_networks_and_jittable():
  params, flops = jax.jit(jax.vmap(lambda a: MODEL.cost(a, (8, 8, 1), 2)))(ARCHS)
  for i in range(5):
    static = MODEL.call_arch(MODEL.static(jax.tree.map(lambda a: a[i], ARCHS)))
    shapes = specialised_shapes(SmallCNN(), jnp.zeros((1, 8, 8, 1)), static)
    assert int(params[i]) == count_params(shapes)
    assert int(flops[i]) > 0
  wide = SPACE.decode("width=8,depth=2,kernel.0=5,kernel.1=5,pool=avg")
  narrow = SPACE.decode("width=4,depth=1,kernel.0=3,pool=avg")
  (pw, fw), (pn, fn) = (MODEL.cost(a, (8, 8, 1), 2) for a in (wide, narrow))
  assert int(pw) > int(pn) and int(fw) > int(fn)


def test_population_errors_name_the_expected_structure():
  with pytest.raises(ValueError, match="archs must be a population of byo architectures"):
    train.train_population_metrics(np.zeros((3, 6), np.int32), jax.random.PRNGKey(0), _data(),
                                   CONFIG)
  with pytest.raises(ValueError, match="unknown space 'mine'"):
    model_of(train.TrainConfig(space="mine"))


CHILD = textwrap.dedent(f"""
    import jax, numpy as np, sys, chex
    from unittest import mock
    sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
    from byo_model import MODEL, SPACE
    from jaxnas.models import train
    from jaxnas.models.sharded import train_population_sharded
    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (256, 8, 8, 1), dtype=np.uint8)
    y = (x.reshape(256, -1).mean(1) > 127).astype(np.int32)
    data = train.make_data(x[:192], y[:192], x[192:], y[192:], (0.5,), (0.25,))
    cfg = train.TrainConfig(steps=4, batch_size=16, num_classes=2, eval_batch_size=32,
                            model=MODEL, plan="map")
    archs = jax.vmap(SPACE.sample)(jax.random.split(jax.random.PRNGKey(0), 5))
    key = jax.random.PRNGKey(3)
    a = train.train_population_metrics(archs, key, data, cfg._replace(plan="sequential"))
    b = train_population_sharded(archs, key, data, cfg)
    np.testing.assert_allclose(np.asarray(a["losses"]), np.asarray(b["losses"]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(a["val_accuracy"]), np.asarray(b["val_accuracy"]),
                               atol=1e-6)
    # The specialised members, dealt over the devices (a host thread each), train as they
    # do one after another on one device (the same programs, compiled per device).
    static = cfg._replace(plan="sequential_static")
    shares = train.device_shares(train._op_time(archs, static), 8)
    assert sum(len(s) > 0 for s in shares) == 5, shares
    c = train.train_population_metrics(archs, key, data, static)
    one = jax.local_devices()[:1]
    with mock.patch.object(train.jax, "local_devices", lambda: one):
      d = train.train_population_metrics(archs, key, data, static)
    assert c["losses"].devices() == {{one[0]}}
    chex.assert_trees_all_equal(c, d)
    np.testing.assert_allclose(np.asarray(a["losses"]), np.asarray(c["losses"]), rtol=2e-4,
                               atol=1e-5)
    print("OK")
""")


def test_a_user_model_shards_over_devices():
  assert run_child(CHILD, devices=8, timeout=600).startswith("OK")


def test_relax_builds_one_hot_mixtures_that_compute_the_member():
  """``Space.relax`` puts a ``Mixture`` at every choice of the declared structure; one-hot
  weights compute each member exactly (the relaxed form DARTS trains and zero-cost proxies
  score), and malformed weights are one-line errors."""
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 12, 12, 1))
  net = SmallCNN()
  variables = net.init(jax.random.PRNGKey(0), x, SPACE.from_vector(jnp.ones(5, jnp.int32)))
  vectors = SPACE.canonical(jax.vmap(SPACE.sample_vector)(jax.random.split(
      jax.random.PRNGKey(1), 6)))
  for v in vectors:
    relaxed = SPACE.relax([jax.nn.one_hot(v[d], k) for d, k in enumerate(SPACE.cardinalities)])
    assert relaxed["kernel"][1].values == (3, 5) and relaxed["pool"].values == (0, 1)
    chex.assert_trees_all_close(net.apply(variables, x, relaxed, train=True, mutable="batch_stats"),
                                net.apply(variables, x, SPACE.from_vector(v), train=True,
                                          mutable="batch_stats"), atol=1e-5)
  with pytest.raises(ValueError, match="one weight vector per decision"):
    SPACE.relax([jnp.ones(2)])
  with pytest.raises(ValueError, match="width has 2 candidates"):
    SPACE.relax([jnp.ones(3)] + [jnp.ones(2)] * 4)
