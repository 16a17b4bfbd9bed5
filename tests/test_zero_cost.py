"""Zero-cost proxies: vmapped == per-member, reference formulas, degenerate cells, evaluator, prefilter.

Everything runs on a tiny network (C=4, 8x8 images, batch 8) and each program
is compiled once per module at XLA optimisation level 0: compiling the whole
proxy program dominates, running it takes well under a second. The second half
scores a user's ``jaxnas.searchable`` models (tests/byo_model.py, and ``TinyOps``
here): NASWOT of a member is its specialised network's, degenerate members are
the worst, and the evaluator runs in a jitted search.
"""


import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxnas
from jaxnas import datasets
from jaxnas import nn as jnn
from jaxnas.estimators import zero_cost as zc
from jaxnas.models import nb201_net
from jaxnas.spaces.declared import to_python

from byo_model import MODEL, SPACE, SmallCNN
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
  assert ev.jittable and ev.name == "zero_cost/params/fashion_mnist/nb201"
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


# ---------------------------------------------------------------- any searchable model

# width, depth, kernel.0, kernel.1, pool. Members 2 and 3 are one network (kernel.1 is
# inactive at depth 1), member 1 runs both blocks, members 0, 2, 4 skip the second.
BYO = np.array([[0, 0, 0, 0, 0], [1, 1, 1, 0, 1], [0, 0, 1, 1, 1], [0, 0, 1, 0, 1],
                [1, 0, 0, 1, 0]], np.int32)


class _ConvBN(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return jnn.BatchNorm()(jnn.ElasticConv(4, 3)(nn.relu(x)), train)


class TinyOps(nn.Module):
  """An elastic stem, then one op among a conv-BN block (a BN inside a candidate), skip
  and zero (a member with nothing from its input)."""

  @nn.compact
  def __call__(self, x, arch, train=False):
    w = arch["width"]
    x = jnn.BatchNorm()(jnn.ElasticConv(4, 3)(x, width=w), train, width=w)
    x = jnn.OpChoice([_ConvBN(), jnn.identity, jnn.zero])(x, arch["op"], train=train)
    return nn.Dense(2)(jnp.mean(x, (1, 2)))


OPS_SPACE = jaxnas.declare({"width": jaxnas.choice(2, 4),
                            "op": jaxnas.choice("conv", "skip", "zero")}, name="tiny_ops")
OPS_MODEL = jaxnas.searchable(TinyOps(), OPS_SPACE)
OPS = np.array([[0, 0], [1, 0], [1, 1], [1, 2], [0, 2]], np.int32)  # width, op
OPS_CONNECTED = np.array([True, True, True, False, False])


def _rbg_init(model, x):
  """The scorer's shared initialisation from ``PRNGKey(0)`` (``make_scorer``'s ``init``)."""
  key = jax.random.PRNGKey(0)
  rbg = jax.random.wrap_key_data(jax.random.bits(key, (4,), jnp.uint32), impl="rbg")
  first = model.space.from_vector(jnp.zeros(model.space.num_decisions, jnp.int32))
  return model.init(model.network(None), rbg, x[:1], first)


def _scores(model, vectors, x, y):
  archs = jax.vmap(model.space.from_vector)(vectors)
  score = _compile(zc.make_scorer(model=model), archs, jax.random.PRNGKey(0), x, y)
  return {k: np.asarray(v) for k, v in score(archs, jax.random.PRNGKey(0), x, y).items()}


@pytest.fixture(scope="module")
def byo_scores(batch):
  x, y = batch
  return _scores(MODEL, BYO, x, y % 2)


def test_user_model_proxies_are_finite_canonical_and_costed(batch, byo_scores):
  s = byo_scores
  assert set(s) == set(zc.PROXIES)
  for name, v in s.items():
    chex.assert_shape(v, (len(BYO),))
    assert np.all(np.isfinite(v)), name
    assert v[2] == v[3], name  # one canonical form, one score (bit for bit)
  assert len(np.unique(s["naswot"][[0, 1, 2, 4]])) == 4
  # Params and FLOPs are the model's cost of each member.
  params, flops = jax.vmap(lambda a: MODEL.cost(a, batch[0].shape[1:], 2))(
      jax.vmap(SPACE.from_vector)(BYO))
  np.testing.assert_array_equal(s["params"], np.asarray(params, np.float32))
  np.testing.assert_array_equal(s["flops"], np.asarray(flops, np.float32))


def _specialised_codes(model, module, variables, vector, x):
  """NASWOT's kernel of the member's specialised network (Python ints), BN-output codes."""
  arch = model.space.from_vector(vector)
  v = model.specialise_variables(variables, model.static(arch), x)
  return zc.naswot_kernel(module, v, to_python(arch), x, probe=zc.output_probe())


@pytest.mark.parametrize("which", ["byo", "tiny_ops"])
def test_naswot_of_a_member_is_its_specialised_networks(batch, which):
  """The one-hot relaxation counts only the chosen network: a block past the depth
  (byo members 0, 2, 4) or a conv-BN candidate not chosen (tiny_ops' skip) would add its
  BN's units and codes; inactive channels of the elastic widths count for nothing."""
  x, _ = batch
  model, module, vectors = ((MODEL, SmallCNN(), BYO[[0, 1, 2, 4]]) if which == "byo"
                            else (OPS_MODEL, TinyOps(), OPS[OPS_CONNECTED]))
  variables = _rbg_init(model, x)
  net = model.network(None)
  relaxed = _compile(lambda a: zc.naswot_kernel(net, variables, a, x, model=model),
                     model.space.from_vector(vectors[0]))
  for vector in vectors:
    kernel, units = relaxed(model.space.from_vector(vector))
    want_kernel, want_units = _specialised_codes(model, module, variables, vector, x)
    assert float(units) == float(want_units), vector
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(want_kernel), err_msg=vector)
  if which == "tiny_ops":  # the skip member: the stem's 8 * 8 * 4 units, nothing of the conv
    assert float(relaxed(OPS_SPACE.from_vector(OPS[2]))[1]) == 8 * 8 * 4


def test_user_model_scores_use_its_specialised_codes_and_degenerate_members_are_worst(batch):
  x, y = batch
  y = y % 2
  s = _scores(OPS_MODEL, OPS, x, y)
  for name, v in s.items():
    assert np.all(np.isfinite(v[OPS_CONNECTED])), name
    assert np.all(v[~OPS_CONNECTED] == -np.inf), name  # output independent of the input
  # The population's naswot is each member's specialised network's, same weights.
  variables = _rbg_init(OPS_MODEL, x)
  for p in np.nonzero(OPS_CONNECTED)[0]:
    kernel, units = _specialised_codes(OPS_MODEL, TinyOps(), variables, OPS[p], x)
    np.testing.assert_allclose(s["naswot"][p], np.linalg.slogdet(np.asarray(kernel,
                                                                              np.float64))[1],
                               rtol=1e-5)
  # A model that neither probes nor relaxes has every proxy but naswot.
  frozen = OPS_MODEL._replace(space=OPS_SPACE._replace(relax=None))
  with pytest.raises(ValueError, match="naswot needs the ReLU inputs of model 'tiny_ops'"):
    zc.make_scorer(("naswot",), model=frozen)
  zc.make_scorer(("synflow", "params"), model=frozen)


def test_user_model_evaluator_inside_a_jitted_search():
  from jaxnas.search import make_search
  from jaxnas.strategies import random_search
  with pytest.raises(ValueError, match=r"gives 2 logits per 28x28x1 image, but fashion_mnist has 10"):
    zc.zero_cost_evaluator("params", data_dir=FASHION_MNIST_SUBSET, batch_size=4, model=MODEL)
  model = jaxnas.searchable(SmallCNN(classes=10), SPACE)
  ev = zc.zero_cost_evaluator("naswot", data_dir=FASHION_MNIST_SUBSET, batch_size=4,
                              model=model)
  assert ev.jittable and ev.name == "zero_cost/naswot/fashion_mnist/byo" and ev.space is SPACE
  search = make_search(random_search(SPACE, batch_size=2), ev, budget=4)
  state = search.init(jax.random.PRNGKey(0))
  run = _compile(lambda s: search.run_chunk(s, 0, search.num_steps), state)
  final, _ = run(state)
  assert int(final.archive.count) == 4 and int(final.num_failed) == 0
  assert np.all(np.isfinite(np.asarray(final.archive.fitness)[:4]))


class Relu6Net(nn.Module):
  """Three elastic conv-BN layers with ``jnn.relu6`` (or ReLU): SynFlow's bounded case."""
  relu: bool = False

  @nn.compact
  def __call__(self, x, arch, train=False):
    w = arch["width"]
    for _ in range(3):
      x = jnn.BatchNorm()(jnn.ElasticConv(8, 3)(x, width=w), train, width=w)
      x = nn.relu(x) if self.relu else jnn.relu6(x)
    return nn.Dense(NUM_CLASSES)(jnp.mean(x, (1, 2)))


def test_synflow_scores_relu6_as_its_linear_network(batch, monkeypatch):
  """SynFlow traces under ``jnn.linearized()``: a model with ``jnn.relu6`` scores exactly as
  the same model with ReLU (the linear network SynFlow assumes), so its widths rank by
  their paths; with ReLU6 clipping (the linearization switched off) they would tie."""
  x, y = batch
  space = jaxnas.declare({"width": jaxnas.choice(2, 4, 8)})
  relu6, relu = Relu6Net(), Relu6Net(relu=True)
  v = relu.init(jax.random.PRNGKey(0), x, space.from_vector(jnp.zeros(1, jnp.int32)))
  v = {**v, "params": jax.tree.map(lambda p: 8 * p, v["params"])}  # activations well past 6

  def scores(net):
    model = jaxnas.searchable(net, space)
    f = jax.jit(lambda a: zc.member_scores(net, v, space.from_vector(a), x, y, ("synflow",),
                                           model=model, num_classes=NUM_CLASSES)["synflow"])
    return np.asarray([f(jnp.asarray([w], jnp.int32)) for w in range(3)])

  linear = scores(relu)
  np.testing.assert_allclose(scores(relu6), linear, rtol=1e-5)
  assert np.all(np.diff(linear) > 1.0), linear  # wider: many more paths
  monkeypatch.setattr(jnn.activations, "is_linearized", lambda: False)
  clipped = scores(relu6)
  assert np.all(np.abs(clipped - linear) > 0.1), (clipped, linear)
