"""Zero-cost proxies: vmapped == per-member, reference formulas, degenerate cells, evaluator, prefilter.

Everything runs on a tiny network (C=4, 8x8 images, batch 8) and each program
is compiled once per module at XLA optimisation level 0: compiling the whole
proxy program dominates, running it takes well under a second.
"""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas import datasets
from jaxnas.estimators import zero_cost as zc
from jaxnas.models import nb201_net

from conftest import FAST_COMPILE, FASHION_MNIST_SUBSET, tiny_evaluator, tiny_space

C, B, NUM_CLASSES = 4, 8, 10
ARCHS = np.array([
    [3, 1, 2, 4, 0, 3],  # mixed
    [0, 0, 0, 0, 0, 0],  # all none: disconnected
    [1, 1, 1, 1, 1, 1],  # all skip
    [3, 3, 3, 3, 3, 3],  # all 3x3 conv
    [2, 0, 0, 0, 0, 4],  # conv into node 1, but node 1 and 2 never reach 3: disconnected
], np.int32)
CONNECTED = np.array([True, False, True, True, False])


def _compile(f, *args):
  return jax.jit(f).lower(*args).compile(compiler_options=FAST_COMPILE)


@pytest.fixture(scope="module")
def batch():
  """B real Fashion-MNIST images (the tests' subset) cropped to 24x24 and average-pooled to 8x8."""
  ds = datasets.load_fashion_mnist(FASHION_MNIST_SUBSET)
  x = np.asarray(datasets.normalize(ds.train_images[:B], ds.mean, ds.std))
  x = x[:, 2:26, 2:26].reshape(B, 8, 3, 8, 3, 1).mean((2, 4))
  y = ds.train_labels[:B].astype(np.int32)
  return jnp.asarray(x, jnp.float32), jnp.asarray(y)


@pytest.fixture(scope="module")
def population(batch):
  """(scores, compiled scorer) of ARCHS: one vmapped call over the population."""
  x, y = batch
  score = _compile(zc.make_scorer(channels=C, num_classes=NUM_CLASSES), ARCHS,
                   jax.random.PRNGKey(0), x, y)
  return score(ARCHS, jax.random.PRNGKey(0), x, y), score


def test_vmapped_equals_per_member(batch, population):
  x, y = batch
  scores, _ = population
  net = nb201_net.NB201Network(channels=C, cells=1, num_classes=NUM_CLASSES, op_impl="onehot")
  rbg = jax.random.wrap_key_data(jax.random.bits(jax.random.PRNGKey(0), (4,), jnp.uint32),
                                 impl="rbg")
  v = net.init(rbg, x[:1], jnp.zeros(6, jnp.int32))

  one = _compile(lambda a: (zc.member_scores(net, v, a, x, y), _direct_synflow(net, v, a, x)),
                 ARCHS[0])
  codes = _compile(lambda a: zc.naswot_kernel(net, v, a, x), ARCHS[0])
  for p, arch in enumerate(ARCHS):
    if not CONNECTED[p]:
      continue
    member, direct = one(arch)
    for name in zc.PROXIES:
      np.testing.assert_allclose(scores[name][p], member[name], rtol=2e-4, atol=1e-4,
                                 err_msg=f"{name} of {arch}")
    # Synflow's rescaled two-pass computation equals the direct one where that cannot overflow.
    np.testing.assert_allclose(member["synflow"], np.log(direct), rtol=1e-5)
    # NASWOT: K counts agreeing units (diagonal: all ReLU units of the specialised
    # net), and the proxy is its log|det| as float64 numpy computes it.
    kernel, units = codes(arch)
    kernel = np.asarray(kernel, np.float64)
    assert float(units) == _relu_units(arch)
    np.testing.assert_array_equal(np.diag(kernel), np.full(B, float(units)))
    assert np.all(kernel == np.round(kernel)) and np.allclose(kernel, kernel.T)
    np.testing.assert_allclose(member["naswot"], np.linalg.slogdet(kernel)[1], rtol=1e-5)


def _relu_units(arch, hw=8):
  """ReLU inputs of the specialised net: conv edges, both convs of each reduction, after last BN."""
  convs = int(np.sum((arch == nb201_net.CONV1) | (arch == nb201_net.CONV3)))
  sizes = [hw * hw * C, (hw // 2) ** 2 * 2 * C, (hw // 4) ** 2 * 4 * C]
  reductions = sizes[0] + sizes[1] + sizes[1] + sizes[2]  # conv_a sees the input, conv_b the output
  return convs * sum(sizes) + reductions + sizes[2]


def _direct_synflow(net, v, arch, x):
  """Synflow as Abdelfattah et al. compute it: |params|, ones input, sum |theta * dR/dtheta|."""
  params = jax.tree_util.tree_map(jnp.abs, v["params"])
  r = lambda p: net.apply({"params": p, "batch_stats": v["batch_stats"]},
                          jnp.ones((1,) + x.shape[1:]), arch, train=False).sum()
  grads = jax.grad(r)(params)
  return sum(jnp.sum(jnp.abs(w * g)) for w, g in zip(zc._weights(params), zc._weights(grads)))


def test_finite_and_disconnected_cells_are_worst(population):
  scores, _ = population
  for name, s in scores.items():
    s = np.asarray(s)
    chex.assert_shape(s, (len(ARCHS),))
    assert np.all(np.isfinite(s[CONNECTED])), name
    # No path from input to output: the worst score, never NaN.
    assert np.all(s[~CONNECTED] == -np.inf), name
  np.testing.assert_array_equal(np.asarray(zc.is_connected(ARCHS)), CONNECTED)


def test_deterministic_and_key_dependent(batch, population):
  x, y = batch
  scores, score = population
  again = score(ARCHS, jax.random.PRNGKey(0), x, y)
  chex.assert_trees_all_equal(scores, again)
  other = score(ARCHS, jax.random.PRNGKey(1), x, y)
  assert not np.allclose(other["naswot"][CONNECTED], scores["naswot"][CONNECTED])
  np.testing.assert_array_equal(other["params"], scores["params"])  # weights do not matter


def test_known_orderings(population):
  """Only what holds for any weights: more and wider paths mean more units and more flow."""
  s = {k: np.asarray(v) for k, v in population[0].items()}
  skip, conv = 2, 3
  # All-3x3 has strictly more parameters, FLOPs and ReLU units than all-skip.
  for name in ("params", "flops", "naswot", "synflow"):
    assert s[name][conv] > s[name][skip], name
  # Every connected cell beats every disconnected one in every proxy, and the
  # evaluator's finite floor (what disconnected cells get there).
  for name, v in s.items():
    assert v[CONNECTED].min() > v[~CONNECTED].max(), name
    assert v[CONNECTED].min() >= zc.floor(name, B), name
  # Params and FLOPs agree with the exact cost model.
  params, flops = jax.vmap(lambda a: nb201_net.cost(a, C, 1, NUM_CLASSES, 1, 8))(ARCHS)
  np.testing.assert_array_equal(s["params"][CONNECTED], np.asarray(params)[CONNECTED])
  np.testing.assert_array_equal(s["flops"][CONNECTED], np.asarray(flops)[CONNECTED])


def test_bad_inputs():
  with pytest.raises(ValueError, match="unknown zero-cost proxy"):
    zc.make_scorer(("nawsot",))
  with pytest.raises(ValueError, match="op_impl"):
    zc.make_scorer(op_impl="switch")
  with pytest.raises(ValueError, match="keep"):
    zc.prefilter(tiny_space(), lambda a: a[:, 0], jax.random.PRNGKey(0), 4, 5)


@pytest.mark.parametrize("jit", [False, True])
def test_prefilter_keeps_the_best_distinct(jit):
  space = tiny_space((5, 5))
  score = lambda a: tiny_evaluator(space).evaluate(None, a)
  f = lambda k: zc.prefilter(space, score, k, 20, 6)
  archs, kept = (jax.jit(f) if jit else f)(jax.random.PRNGKey(3))
  chex.assert_shape(archs, (6, 2))
  np.testing.assert_array_equal(kept, score(archs))
  assert len({tuple(a) for a in np.asarray(archs)}) == 6  # no duplicates
  # Exactly the top 6 distinct of the 20 samples the same key draws.
  drawn = jax.vmap(space.sample_vector)(jax.random.split(jax.random.PRNGKey(3), 20))
  best = np.sort(np.unique(np.asarray(score(drawn))))[::-1][:6]
  np.testing.assert_array_equal(np.asarray(kept), best)


def test_evaluator_params_proxy_is_a_fixed_function_of_the_cell():
  """The cheap proxy exercises the evaluator's plumbing; real proxies are in the slow test."""
  ev = zc.zero_cost_evaluator("params", data_dir=FASHION_MNIST_SUBSET, batch_size=4, channels=C)
  assert ev.jittable and ev.name == "zero_cost/params/fashion_mnist"
  archs = jnp.asarray(ARCHS)
  a = jax.jit(ev.evaluate)(jax.random.PRNGKey(0), archs)
  b = jax.jit(ev.evaluate)(jax.random.PRNGKey(1), archs)
  np.testing.assert_array_equal(a, b)
  params, _ = jax.vmap(lambda x: nb201_net.cost(x, C, 1, 10, 1, 28))(archs)
  # Disconnected cells get the finite floor, so the search loop never counts them as failed.
  np.testing.assert_array_equal(a, np.where(CONNECTED, params, zc.floor("params", 4)))


# The evaluator inside the scanned, seed-vectorised search: tests/test_accelerator_path.py.


def test_prefiltered_strategy_keeps_the_best_inner_proposals():
  from jaxnas.search import make_search
  from jaxnas.strategies import archive_init, random_search
  from jaxnas.strategies.prefilter import prefiltered
  space = tiny_space((5, 5))
  ev = tiny_evaluator(space)
  score = lambda a: ev.evaluate(None, a)
  inner = random_search(space, batch_size=3)
  strategy = prefiltered(inner, score, factor=4)
  state = strategy.init(jax.random.PRNGKey(0))
  archive = archive_init(25, 2)
  key = jax.random.PRNGKey(5)
  archs, _ = jax.jit(strategy.ask)(key, state, archive)
  proposed = np.concatenate([np.asarray(inner.ask(k, state, archive)[0])
                             for k in jax.random.split(key, 4)])
  best = np.sort(np.unique(np.asarray(score(proposed))))[::-1][:3]
  np.testing.assert_array_equal(np.sort(np.asarray(score(archs)))[::-1], best)
  # In the scanned search loop: every evaluation novel, and the best cell found within budget.
  search = make_search(strategy, ev, budget=12)
  final, _ = jax.jit(search.run_chunk, static_argnums=2)(search.init(jax.random.PRNGKey(1)), 0,
                                                         search.num_steps)
  assert int(final.num_duplicates) == 0 and int(final.archive.count) == 12
  assert float(final.best) == space.size - 1
