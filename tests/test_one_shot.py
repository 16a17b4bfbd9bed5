"""One-shot weight sharing (SPOS, ``--evaluator=supernet``): training, scoring, resume, CLI.

A tiny supernet (C=4, one cell per stage) trains for six epochs on the search
split of the tests' Fashion-MNIST subset (2700 images, as many as 5 % of the
full set's), once per module (its many steps run 5x faster compiled normally);
the short scoring programs and the test-only ones are compiled at XLA
optimisation level 0 (``compiler_options``). The user model of ``byo_model.py``
(with a 10-class head) trains as a supernet too, uniformly and sandwiched.
"""

from __future__ import annotations

import json
import os
import shutil

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxnas
from jaxnas import nn as jnn
from jaxnas import ops, runner
from jaxnas.datasets import make_preprocess
from jaxnas.estimators import one_shot
from jaxnas.estimators.training import search_split
from jaxnas.models import make_optimizer, nb201_net
from jaxnas.spaces import nb201_space

from byo_model import SPACE as BYO_SPACE
from byo_model import SmallCNN
from conftest import FAST_COMPILE, FASHION_MNIST_SUBSET, run_child, run_python

CONFIG = one_shot.SupernetConfig(data_dir=FASHION_MNIST_SUBSET, channels=4, cells=1,
                                 batch_size=64, train_fraction=1.0, epochs=6.0, bn_batches=2)
SPACE = nb201_space()
CONNECTED = np.array([  # connected cells of each op mix (a disconnected one scores chance)
    [3, 3, 3, 3, 3, 3],
    [2, 1, 3, 4, 0, 3],
    [1, 3, 0, 2, 3, 1],
    [3, 0, 0, 1, 4, 2],
    [4, 2, 2, 0, 3, 3],
    [2, 2, 2, 2, 2, 2],
], np.int32)


def _compile(f, *args):
  return jax.jit(f).lower(*args).compile(compiler_options=FAST_COMPILE)


def _random_cells(n, seed):
  return np.asarray(jax.vmap(SPACE.sample)(jax.random.split(jax.random.PRNGKey(seed), n)))


@pytest.fixture(scope="module")
def data():
  ds, d = search_split(one_shot.proxy_spec(CONFIG))
  return ds.num_classes, d


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
  """(evaluator, final SPOS state, workdir) of CONFIG; the evaluator loads the trained supernet."""
  num_classes, d = data
  workdir = tmp_path_factory.mktemp("supernet") / "w"
  state = one_shot.train_supernet(CONFIG, d, num_classes, str(workdir))
  evaluator = one_shot.supernet_evaluator(CONFIG, str(workdir), compiler_options=FAST_COMPILE)
  return evaluator, state, workdir


def test_spos_training_scores_sampled_paths_well_above_chance(trained, data):
  evaluator, state, _ = trained
  num_classes, d = data
  spos = one_shot.make_spos(CONFIG, num_classes, d.train_images.shape[1:],
                            d.train_labels.shape[0])
  assert int(state.step) == spos.total_steps == 6 * spos.steps_per_epoch
  cells = np.concatenate([CONNECTED, _random_cells(10, 1)])
  scores = np.asarray(evaluator.evaluate(jax.random.PRNGKey(0), cells))
  assert scores.shape == (len(cells),) and scores.dtype == np.float32
  assert np.all(np.isfinite(scores)) and np.all((0 <= scores) & (scores <= 100))
  # 10 classes: chance is 10 %. Six short epochs put connected cells far above (measured:
  # medians ~49 % for CONNECTED and ~48 % for all; the untrained supernet scores ~11 %).
  assert np.median(scores[:len(CONNECTED)]) > 35.0, scores
  assert np.median(scores) > 30.0, scores
  # The same scorer on the untrained supernet is near chance: training is what helps.
  key = jax.random.PRNGKey(CONFIG.supernet_seed)
  untrained = _compile(spos.init, key)(key)
  untrained = {"params": untrained.params, "batch_stats": untrained.batch_stats}
  calib = one_shot.calibration_batches(CONFIG, d)
  before = np.asarray(_compile(one_shot.make_scorer(CONFIG, num_classes), untrained, CONNECTED,
                               calib, d)(untrained, CONNECTED, calib, d))
  assert np.median(scores[:len(CONNECTED)]) > np.median(before) + 20.0, (before, scores)


def test_scores_are_fixed_per_cell_whatever_the_key_and_population(trained):
  evaluator, _, _ = trained
  cells = _random_cells(6, 2)
  first = np.asarray(evaluator.evaluate(jax.random.PRNGKey(0), cells))
  order = np.array([3, 0, 5, 1, 4, 2])
  # Another key, another order, other cells around them, a duplicate.
  mixed = np.concatenate([CONNECTED[:2], cells[order], cells[:1]])
  again = np.asarray(evaluator.evaluate(jax.random.PRNGKey(7), mixed))
  np.testing.assert_array_equal(again[2:8], first[order])
  assert again[8] == first[0]
  assert len(set(first.tolist())) > 1  # not a constant


def test_map_and_vmap_plans_agree(trained, data):
  _, state, _ = trained
  num_classes, d = data
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  calib = one_shot.calibration_batches(CONFIG, d)
  cells = CONNECTED[:4]
  by_map = _compile(one_shot.make_scorer(CONFIG, num_classes, plan="map"), variables, cells,
                    calib, d)(variables, cells, calib, d)
  by_vmap = _compile(one_shot.make_scorer(CONFIG, num_classes, plan="vmap"), variables, cells,
                     calib, d)(variables, cells, calib, d)
  # Float differences between switch and kernel ops may flip an argmax; allow one image.
  one_image = 100.0 / d.val_labels.shape[0]
  np.testing.assert_allclose(np.asarray(by_vmap), np.asarray(by_map), atol=1.01 * one_image)


def test_bn_recalibration_is_the_exact_batch_average_and_beats_stale_statistics(trained, data):
  _, state, _ = trained
  num_classes, d = data
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  calib = one_shot.calibration_batches(CONFIG, d)
  assert calib.shape == (2, 64, 28, 28, 1)
  arch = CONNECTED[1]
  recal = _compile(one_shot.make_recalibrate(CONFIG, num_classes), state.params,
                   state.batch_stats, arch, calib, d)(state.params, state.batch_stats, arch,
                                                      calib, d)
  # The stem BN sees conv(images): its statistics are the mean over the two batches of
  # each batch's mean and biased variance (not the variance of the union, not a momentum).
  x = (np.asarray(calib, np.float32) / 255.0 - np.asarray(d.mean)) / np.asarray(d.std)
  y = np.stack([np.asarray(ops.conv2d(jnp.asarray(b), state.params["stem"])) for b in x])
  y = y.astype(np.float64)
  means, variances = y.mean(axis=(1, 2, 3)), y.var(axis=(1, 2, 3))  # per batch and channel
  stem = recal["stem_bn"]["bn"]
  tol = dict(rtol=1e-3, atol=1e-4)  # float32 sums over 50k pixels
  np.testing.assert_allclose(stem["mean"], means.mean(0), **tol)
  np.testing.assert_allclose(stem["var"], variances.mean(0), **tol)
  # Both batches count: not the last one alone (as momentum 0 would leave), nor the first.
  for b in range(2):
    assert np.max(np.abs(stem["mean"] - means[b])) > 10 * tol["atol"], (stem["mean"], means)

  stale = _compile(one_shot.make_scorer(CONFIG._replace(bn_batches=0), num_classes), variables,
                   CONNECTED, calib[:0], d)(variables, CONNECTED, calib[:0], d)
  fresh = _compile(one_shot.make_scorer(CONFIG, num_classes), variables, CONNECTED, calib,
                   d)(variables, CONNECTED, calib, d)
  stale, fresh = np.asarray(stale), np.asarray(fresh)
  assert np.all(np.isfinite(stale)) and np.all(np.isfinite(fresh))
  # The supernet's running statistics mix all paths; each cell's own are much better
  # (measured: mean 20 % stale vs 49 % recalibrated).
  assert fresh.mean() > stale.mean() + 15.0, (stale, fresh)


def test_one_spos_step_updates_only_the_sampled_path(data):
  num_classes, d = data
  # 1/E of an epoch: exactly one live step, then dead steps that change nothing.
  spe = d.train_labels.shape[0] // CONFIG.batch_size
  config = CONFIG._replace(epochs=1.0 / spe)
  spos = one_shot.make_spos(config, num_classes, d.train_images.shape[1:],
                            d.train_labels.shape[0])
  assert spos.total_steps == 1 and spos.num_epochs == 1
  key = jax.random.PRNGKey(3)
  state = _compile(spos.init, key)(key)
  new, metrics = _compile(spos.run_epoch, state, d)(state, d)
  assert int(new.step) == 1
  assert np.asarray(metrics["live"]).tolist() == [True] + [False] * (spe - 1)
  arch = np.asarray(SPACE.sample(jax.random.fold_in(jax.random.fold_in(state.key, 0), 0)))
  trace_new, trace_old = new.opt_state[1][0].trace, state.opt_state[1][0].trace
  conv_ops = {"nor_conv_1x1": nb201_net.CONV1, "nor_conv_3x3": nb201_net.CONV3}
  checked = 0
  for stage_cell, cell in new.params.items():
    if not stage_cell.startswith("cell"):
      continue
    for edge, sub in cell.items():
      for op, code in conv_ops.items():
        on_path = arch[int(edge[4:])] == code
        leaves = zip(jax.tree.leaves(sub[op]), jax.tree.leaves(state.params[stage_cell][edge][op]),
                     jax.tree.leaves(trace_new[stage_cell][edge][op]),
                     jax.tree.leaves(trace_old[stage_cell][edge][op]))
        for p_new, p_old, t_new, t_old in leaves:
          checked += 1
          assert np.array_equal(p_new, p_old) != on_path, (stage_cell, edge, op, arch)
          assert np.array_equal(t_new, t_old) != on_path
  assert checked == 3 * 6 * 2 * 3  # 3 cells x 6 edges x 2 conv ops x (kernel, scale, bias)
  # The stem is on every path.
  assert not np.array_equal(new.params["stem"], state.params["stem"])


def test_supernet_resume_ends_identical_and_other_settings_are_refused(tmp_path, trained, data):
  _, full, trained_dir = trained
  num_classes, d = data
  assert sorted(os.listdir(trained_dir / "supernet")) == ["4", "5", "6"]  # keeps 3
  lines = [json.loads(x) for x in (trained_dir / "supernet_metrics.jsonl").read_text().splitlines()]
  assert [x["epoch"] for x in lines] == list(range(1, 7)) and lines[-1]["loss"] < lines[0]["loss"]
  # Killed after epoch 4 (its log already one line further).
  w = tmp_path / "w"
  shutil.copytree(trained_dir, w)
  shutil.rmtree(w / "supernet" / "6")
  shutil.rmtree(w / "supernet" / "5")
  resumed = one_shot.train_supernet(CONFIG, d, num_classes, str(w))
  assert sorted(os.listdir(w / "supernet")) == ["4", "5", "6"]
  for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed), strict=True):
    np.testing.assert_array_equal(a, b)
  assert len((w / "supernet_metrics.jsonl").read_text().splitlines()) == 6
  with pytest.raises(ValueError, match="other settings"):
    one_shot.train_supernet(CONFIG._replace(epochs=4.0), d, num_classes, str(w), FAST_COMPILE)
  # Scoring settings do not change the supernet: it is loaded, not retrained.
  loaded = one_shot.train_supernet(CONFIG._replace(bn_batches=3), d, num_classes, str(w),
                                   FAST_COMPILE)
  np.testing.assert_array_equal(loaded.params["stem"], full.params["stem"])


# The user model of byo_model.py with a head for Fashion-MNIST's 10 classes. Its space:
# width 4|8, depth 1|2, a kernel 3|5 per block that exists (kernel.1 only at depth 2), pool.
BYO = jaxnas.searchable(SmallCNN(classes=10), BYO_SPACE)
BYO_CONFIG = CONFIG._replace(epochs=3.0)


def _byo_vector(**choices):
  vector = np.zeros(BYO_SPACE.num_decisions, np.int32)
  for d, name in enumerate(("width", "depth", "kernel.0", "kernel.1", "pool")):
    vector[d] = choices.get(name, 0)
  return vector


@pytest.fixture(scope="module")
def byo_trained(tmp_path_factory):
  """(evaluator, final SPOS state, workdir) of the user model's supernet."""
  workdir = tmp_path_factory.mktemp("byo") / "w"
  # Trained compiled normally (126 steps: 1 s an epoch, against 3.5 s at -O0), then loaded.
  _, d = search_split(one_shot.proxy_spec(BYO_CONFIG))
  state = one_shot.train_supernet(BYO_CONFIG, d, 10, str(workdir), model=BYO)
  evaluator = one_shot.supernet_evaluator(BYO_CONFIG, str(workdir), model=BYO,
                                          compiler_options=FAST_COMPILE)
  return evaluator, state, workdir


def test_spos_trains_a_user_model_and_scores_its_networks(byo_trained):
  evaluator, state, workdir = byo_trained
  assert evaluator.name == "supernet/fashion_mnist/byo" and evaluator.space is BYO_SPACE
  lines = [json.loads(x) for x in (workdir / "supernet_metrics.jsonl").read_text().splitlines()]
  assert [x["epoch"] for x in lines] == [1, 2, 3] and int(state.step) == 3 * 42
  assert lines[-1]["loss"] < lines[0]["loss"] - 0.1, lines
  # Every distinct network of the space (24 of the 32 vectors), each scored once.
  vectors = np.unique(np.asarray(jax.vmap(BYO_SPACE.canonical)(
      BYO_SPACE.unrank(jnp.arange(BYO_SPACE.size)))), axis=0)
  assert len(vectors) == BYO_SPACE.num_networks() == 24
  archs = jax.vmap(BYO_SPACE.from_vector)(jnp.asarray(vectors))
  scores = np.asarray(evaluator.evaluate(jax.random.PRNGKey(0), archs))
  assert scores.shape == (24,) and np.all(np.isfinite(scores))
  assert np.all((0 <= scores) & (scores <= 100)) and len(set(scores.tolist())) > 1
  # Chance is 10 %; three short epochs of this tiny CNN put every member far above
  # (measured: 41 % to 51 %, median 49 %).
  assert np.min(scores) > 25.0 and np.median(scores) > 40.0, scores
  cost = evaluator.report(jax.tree.map(lambda a: a[:2], archs))
  assert np.all(np.asarray(cost["params"]) > 0) and np.all(np.asarray(cost["flops"]) > 0)
  # Two vectors of one network (kernel.1 does not exist at depth 1) score the same.
  pair = np.stack([_byo_vector(width=1), _byo_vector(width=1, **{"kernel.1": 1})])
  a, b = np.asarray(evaluator.evaluate(None, jax.vmap(BYO_SPACE.from_vector)(pair)))
  assert a == b


def test_a_user_models_score_is_its_specialised_networks_with_inherited_weights(byo_trained,
                                                                                 data):
  _, state, _ = byo_trained
  num_classes, d = data
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  calib = one_shot.calibration_batches(BYO_CONFIG, d)
  archs = jax.vmap(BYO_SPACE.from_vector)(jnp.asarray(np.stack([
      _byo_vector(width=1, depth=1, **{"kernel.0": 1, "kernel.1": 0}),
      _byo_vector(width=0, depth=0, **{"kernel.0": 0, "pool": 1})])))
  score = one_shot.make_scorer(BYO_CONFIG, num_classes, plan="map", model=BYO)
  by_supernet = np.asarray(_compile(score, variables, archs, calib, d)(variables, archs, calib, d))
  recalibrate_supernet = jax.jit(one_shot.make_recalibrate(BYO_CONFIG, num_classes, model=BYO))
  images = jnp.zeros((1,) + d.train_images.shape[1:], jnp.float32)
  for i, supernet_score in enumerate(by_supernet):
    member = jax.tree.map(lambda a: a[i], archs)
    static = BYO.static(member)
    net, arch = BYO.network(static), BYO.call_arch(static)
    own = BYO.specialise_variables(variables, static, images)  # inherited, then recalibrated
    recalibrate = one_shot.recalibration(net, BYO_CONFIG.bn_batches)
    stats = jax.jit(lambda p, s, c, d: recalibrate(p, s, arch, c, d))(
        own["params"], own["batch_stats"], calib, d)
    # Its own statistics are the supernet's recalibrated for the member, cut.
    cut = BYO.specialise_variables(
        {"params": state.params,
         "batch_stats": recalibrate_supernet(state.params, state.batch_stats, member, calib, d)},
        static, images)["batch_stats"]
    chex.assert_trees_all_close(stats, cut, rtol=1e-4, atol=1e-5)
    accuracy = float(jax.jit(lambda v, d: one_shot.accuracy(net, v, arch, d))(
        {"params": own["params"], "batch_stats": stats}, d))
    # Masked (elastic) and sliced (specialised) convs differ in float rounding: allow an image.
    assert abs(accuracy - supernet_score) <= 1.01 * 100.0 / d.val_labels.shape[0], (i, accuracy,
                                                                                    supernet_score)


def test_parameter_use_rules_match_the_specialised_networks_of_every_member():
  """SPOS updates exactly the parameters a step's members use: the in-program rules agree
  with each member's specialised network (the host's answer), all 32 vectors."""
  key = jax.random.PRNGKey(0)
  images = jnp.zeros((1, 28, 28, 1), jnp.float32)
  variables = jax.eval_shape(lambda k: BYO.network(None).init(
      k, images, BYO_SPACE.sample(k), train=False), key)
  uses = one_shot.make_uses(BYO, variables, images)
  assert not uses.unruled  # every leaf: always, or one decision (the depth for block 1)
  keys = [".".join(k) for k in one_shot._leaf_keys(variables["params"])]
  assert {k for k, r in zip(keys, uses.rules) if r is not True} == {
      "Block_1.BatchNorm_0.bias", "Block_1.BatchNorm_0.scale", "Block_1.ElasticConv_0.kernel"}
  for v in np.asarray(jax.vmap(BYO_SPACE.canonical)(BYO_SPACE.unrank(jnp.arange(32)))):
    in_program = np.asarray(uses.mask([jnp.asarray(v)]))
    np.testing.assert_array_equal(in_program, uses.used(tuple(int(x) for x in v)), str(v))
  # NB201: exactly the chosen conv ops of the edges are optional.
  nb201 = one_shot.supernet_model(CONFIG, 10)
  variables = jax.eval_shape(lambda k: nb201.network(None).init(
      k, images, jnp.zeros(6, jnp.int32), train=False), key)
  rules = one_shot.make_uses(nb201, variables, images).rules
  optional = {".".join(k): r for k, r in zip(one_shot._leaf_keys(variables["params"]), rules)
              if r is not True}
  assert len(optional) == 3 * 6 * 2 * 3  # 3 cells x 6 edges x 2 conv ops x (kernel, scale, bias)
  for name, (d, values) in optional.items():
    edge, op = name.split(".")[1:3]
    assert d == int(edge[4:]) and values == ((nb201_net.CONV1,) if op == "nor_conv_1x1" else
                                             (nb201_net.CONV3,)), name


class _Conv(nn.Module):
  @nn.compact
  def __call__(self, x):
    return jnn.ElasticConv(4, 3)(x)


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x, op):
    return x + jnn.OpChoice([_Conv(), lambda x: nn.avg_pool(x, (3, 3), (1, 1), "SAME")])(x, op)


class _JointNet(nn.Module):
  """Block 1's conv exists only at depth 2 with op "conv": two decisions decide its use."""

  @nn.compact
  def __call__(self, x, arch, train=False):
    x = jnn.ElasticConv(4, 3)(x)
    x = jnn.ElasticDepth([_Block() for _ in range(2)], min_depth=1)(x, arch["depth"],
                                                                    [arch["op"]] * 2)
    return nn.Dense(10)(jnp.mean(x, (1, 2)))


def test_parameters_whose_use_two_decisions_decide_are_looked_up_on_the_host(data):
  space = jaxnas.declare({"depth": jaxnas.choice(1, 2), "op": jaxnas.choice("conv", "pool")},
                         name="joint")
  model = jaxnas.searchable(_JointNet(), space)
  num_classes, d = data
  shape, n = d.train_images.shape[1:], d.train_labels.shape[0]
  images = jnp.zeros((1,) + shape, jnp.float32)
  variables = jax.eval_shape(lambda k: model.network(None).init(
      k, images, space.sample(k), train=False), jax.random.PRNGKey(0))
  uses = one_shot.make_uses(model, variables, images)
  keys = [".".join(k) for k in one_shot._leaf_keys(variables["params"])]
  assert [keys[j] for j in uses.unruled] == ["_Block_1._Conv_0.ElasticConv_0.kernel"]
  assert dict(zip(keys, uses.rules))["_Block_0._Conv_0.ElasticConv_0.kernel"] == (1, (0,))
  vectors = np.asarray(space.unrank(jnp.arange(4)))
  np.testing.assert_array_equal(uses.host(vectors[:, None]),
                                [[False], [False], [True], [False]])  # depth 2, conv only
  # In the program, through a callback: one step trains block 1's conv iff its member has it.
  spos = one_shot.make_spos(CONFIG._replace(epochs=1.0 / (n // CONFIG.batch_size)), num_classes,
                            shape, n, model=model)
  init = _compile(spos.init, jax.random.PRNGKey(0))
  state = init(jax.random.PRNGKey(0))
  run_epoch = _compile(spos.run_epoch, state, d)
  seen = set()
  for seed in range(12):
    state = init(jax.random.PRNGKey(seed))
    member = np.asarray(space.sample_vector(jax.random.fold_in(jax.random.fold_in(state.key, 0),
                                                               0)))
    new, _ = run_epoch(state, d)
    kernel = lambda s: s.params["_Block_1"]["_Conv_0"]["ElasticConv_0"]["kernel"]
    has = bool(member[0] == 1 and member[1] == 0)
    assert np.array_equal(kernel(new), kernel(state)) != has, member
    seen.add(has)
  assert seen == {True, False}


def test_sandwich_sampling_trains_largest_smallest_and_a_random_member(data):
  """BigNAS's sandwich rule: one step's update is the optimizer's for the sum of the
  largest, the smallest and the uniform member's gradients on the same minibatch."""
  num_classes, d = data
  shape, n = d.train_images.shape[1:], d.train_labels.shape[0]
  spe = n // CONFIG.batch_size
  config = BYO_CONFIG._replace(epochs=1.0 / spe, sampling="sandwich")
  largest, smallest = (np.asarray(v) for v in one_shot.extremes(BYO_SPACE))
  np.testing.assert_array_equal(largest, [1, 1, 1, 1, 1])  # width 8, depth 2, 5x5, 5x5, max
  np.testing.assert_array_equal(smallest, [0, 0, 0, 0, 0])  # width 4, depth 1, 3x3, avg
  # A key whose uniform member has depth 1: block 1 is then the largest member's alone.
  spos = one_shot.make_spos(config, num_classes, shape, n, model=BYO)
  init = _compile(spos.init, jax.random.PRNGKey(0))
  for seed in range(20):
    state = init(jax.random.PRNGKey(seed))
    k_arch = jax.random.fold_in(state.key, 0)
    random = np.asarray(BYO_SPACE.sample_vector(jax.random.fold_in(k_arch, 0)))
    if random[1] == 0:  # depth 1
      break
  new, metrics = _compile(spos.run_epoch, state, d)(state, d)
  assert np.asarray(metrics["live"]).sum() == 1 and bool(metrics["ok"][0])
  # Block 1 is the largest member's alone (the others have depth 1): trained.
  for before, after in zip(jax.tree.leaves(state.params["Block_1"]),
                           jax.tree.leaves(new.params["Block_1"])):
    assert not np.array_equal(before, after)

  # The update, recomputed: the optimizer's step for the sum of the three gradients.
  idx = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(state.key, 2), 0),
                               n)[:CONFIG.batch_size]
  x = make_preprocess(d.mean, d.std, augment=False)(None, d.train_images[idx])
  y = d.train_labels[idx]

  def loss(params, vector):
    logits, _ = BYO.network(None).apply({"params": params, "batch_stats": state.batch_stats}, x,
                                        BYO_SPACE.from_vector(vector), train=True,
                                        mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  grad = jax.jit(jax.grad(loss))
  grads = [grad(state.params, jnp.asarray(v)) for v in (largest, smallest, random)]
  tx = make_optimizer(one_shot.train_config(config, num_classes, n, BYO))

  def stepped(gs):
    updates, _ = tx.update(jax.tree.map(lambda *g: sum(g), *gs), tx.init(state.params),
                           state.params)
    return optax.apply_updates(state.params, updates)

  # Float32 conv gradients compiled otherwise differ by ~1e-4 (a step moves them 1e-5);
  # leaving out a member moves some leaf by > 5e-3.
  tol = dict(rtol=1e-3, atol=2e-4)
  chex.assert_trees_all_close(new.params, stepped(grads), **tol)
  # Each member counts: without the smallest (or the largest) the step is another.
  for drop in (0, 1):
    other = stepped([g for k, g in enumerate(grads) if k != drop])
    assert not all(np.allclose(a, b, **tol) for a, b in zip(jax.tree.leaves(new.params),
                                                            jax.tree.leaves(other)))


DATA_PARALLEL_CHILD = """
import json, os, shutil, sys
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxnas import distributed, runner
from jaxnas.estimators import one_shot
from jaxnas.estimators.training import search_split
from jaxnas.spaces import nb201_space
workdir, data_dir = sys.argv[1:3]
mesh = distributed.mesh("data", jax.devices())
assert mesh.size == 4, mesh
config = one_shot.SupernetConfig(data_dir=data_dir, channels=4, cells=1, batch_size=32,
                                 train_fraction=0.05, epochs=2.0, bn_batches=1)
ds, data = search_split(one_shot.proxy_spec(config))
shape, n = tuple(data.train_images.shape[1:]), int(data.train_labels.shape[0])
calib = one_shot.calibration_batches(config, data)
archs = np.asarray(jax.vmap(nb201_space().sample)(jax.random.split(jax.random.PRNGKey(1), 5)))
out, states = {}, {}
for name, m in (("one", None), ("four", mesh)):
  c = one_shot.for_mesh(config, m)
  c = c._replace(execution=c.execution.resolve())
  spos, init, run_epoch, score = one_shot._programs(c, ds.num_classes, shape, n, (), None, m)
  state, metrics = run_epoch(init(np.asarray(jax.random.PRNGKey(0))),
                             distributed.replicate(data, m))
  states[name] = jax.device_get(state)
  # Both score the single-device supernet: the members' scores, padded over 4 devices.
  variables = distributed.replicate({"params": states["one"].params,
                                   "batch_stats": states["one"].batch_stats}, m)
  scores = one_shot.score_members(score, m, variables, archs,
                                  *distributed.replicate((calib, data), m))
  out[name] = {"conv": c.execution.conv, "loss": distributed.host(metrics["loss"]).tolist(),
               "scores": np.asarray(scores).tolist()}
out["param_diff"] = max(float(np.max(np.abs(a - b))) for a, b in zip(
    jax.tree.leaves(states["one"].params), jax.tree.leaves(states["four"].params)))
# Two epochs checkpointed, the second lost: the resumed supernet is the uninterrupted one,
# replicated on the mesh.
full = one_shot.train_supernet(config, data, ds.num_classes, workdir, mesh=mesh)
shutil.rmtree(os.path.join(workdir, "supernet", "2"))
resumed = one_shot.train_supernet(config, data, ds.num_classes, workdir, mesh=mesh)
out["resumed_equal"] = all(np.array_equal(a, b) for a, b in zip(
    jax.tree.leaves(full), jax.tree.leaves(resumed), strict=True))
whole = NamedSharding(mesh, P())
out["resumed_replicated"] = all(x.sharding.is_equivalent_to(whole, x.ndim)
                                for x in jax.tree.leaves(resumed))
try:
  one_shot.make_spos(config._replace(batch_size=30), ds.num_classes, shape, n, mesh=mesh)
except ValueError as e:
  out["error"] = str(e)
search = runner.SearchConfig(evaluator="supernet", dataset="fashion_mnist", budget=2,
                             num_seeds=1, evaluator_args=(("batch_size", 30),
                                                          ("data_dir", data_dir)))
try:
  runner.run(search, os.path.join(workdir, "cli"))
except runner.UserError as e:
  out["cli_error"] = str(e)
out["cli_wrote"] = os.path.exists(os.path.join(workdir, "cli", "config.json"))
print(json.dumps(out))
"""


def test_data_parallel_spos_on_4_devices_trains_and_scores_as_one_device(tmp_path):
  """One process with 4 host devices: SPOS steps with the minibatch split over them
  (gradients and BN moments all-reduced) give the single-device losses and weights up to
  float summation order, members scored sharded (5 padded to 8) the single-device scores,
  and a supernet resumed on the mesh is the uninterrupted one, replicated. A batch that
  does not split over the devices is a one-line error, in the CLI a UserError."""
  stdout = run_child(DATA_PARALLEL_CHILD, tmp_path / "w", FASHION_MNIST_SUBSET, devices=4)
  out = json.loads(stdout.strip().splitlines()[-1])
  assert out["four"]["conv"] == "im2col"  # "auto" under a mesh: partitionable
  assert len(out["one"]["loss"]) == 4  # 135 images: 4 steps of 32 an epoch
  # Measured: losses within 3e-7, weights within 1e-6 after 4 steps.
  np.testing.assert_allclose(out["four"]["loss"], out["one"]["loss"], rtol=1e-5)
  assert out["param_diff"] < 1e-4
  assert out["four"]["scores"] == out["one"]["scores"]
  assert out["resumed_equal"] and out["resumed_replicated"]
  message = "batch_size 30 does not split over 4 devices; use a multiple of 4"
  assert out["error"] == message and out["cli_error"] == message
  assert not out["cli_wrote"]


def test_bad_sampling_is_a_one_line_error():
  with pytest.raises(ValueError, match="^sampling 'ladder' is not a supernet sampling rule; "
                                       "choose one of uniform, sandwich$") as raised:
    one_shot.validate_config(CONFIG._replace(sampling="ladder"))
  assert "\n" not in str(raised.value)
  with pytest.raises(ValueError, match="^space 'nope' is not a built-in space"):
    one_shot.make_spos(CONFIG._replace(space="nope"), 10, (28, 28, 1), 2700)


@pytest.mark.parametrize("args,message", [
    ((("bn_batches", -1),), "bn_batches must be >= 0"),
    ((("plan", "sequential"),), "does not apply to the supernet"),
    ((("epochs", 0.0),), "epochs must be > 0"),
    ((("bn_batches", 100),), "exceeds the"),
    ((("proxy", "naswot"),), "--proxy does not apply to --evaluator=supernet"),
    ((("sampling", "ladder"),), "--sampling 'ladder' is not a supernet sampling rule; choose "
                                "one of uniform, sandwich$"),
])
def test_bad_supernet_settings_are_user_errors(tmp_path, args, message):
  config = runner.SearchConfig(evaluator="supernet", dataset="fashion_mnist", budget=2,
                               num_seeds=1, evaluator_args=(("data_dir", FASHION_MNIST_SUBSET),
                                                            ("train_fraction", 1.0)) + args)
  with pytest.raises(runner.UserError, match=message) as raised:
    runner.run(config, str(tmp_path / "w"))
  assert "\n" not in str(raised.value)
  assert not (tmp_path / "w" / "config.json").exists()
  hyperband = runner.SearchConfig(evaluator="supernet", dataset="fashion_mnist",
                                  strategy="hyperband")
  with pytest.raises(runner.UserError, match="needs --evaluator=train"):
    runner.validate(hyperband)


CLI_FLAGS = ("--evaluator=supernet", "--strategy=evolution", "--budget=6", "--num_seeds=2",
             "--population=2", "--channels=4", "--cells=1", "--batch_size=32", "--epochs=2",
             f"--data_dir={FASHION_MNIST_SUBSET}", "--train_fraction=0.4", "--bn_batches=2")


def _cli(cwd, *flags):
  proc = run_python(["-m", "jaxnas.main", *CLI_FLAGS, *flags], cwd=cwd, timeout=240)
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  return proc


@pytest.fixture(scope="module")
def cli_search(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli")
  return root, _cli(root, "--workdir=w")


def test_cli_supernet_search_writes_results_and_a_rerun_is_finished(cli_search):
  root, proc = cli_search
  w = root / "w"
  results = json.loads((w / "results.json").read_text())
  assert results["config"]["evaluator"] == "supernet"
  assert results["config"]["checkpoint_every"] == 1  # the default for supernet
  assert results["config"]["evaluator_args"]["bn_batches"] == 2
  assert len(results["runs"]) == 2
  for r in results["runs"]:
    assert len(r["trajectory"]) == 6 and r["failed_evaluations"] == 0
    assert r["duplicate_evaluations"] == 0
    assert 15.0 < r["best_score"] <= 100.0
    assert r["params"] > 0 and r["flops"] > 0 and r["best_arch"].count("~") == 6
  assert "--mode=retrain" in results["summary"]["retrain_command"]
  assert "supernet (inherited-weight) validation accuracy" in proc.stdout
  assert sorted(os.listdir(w / "supernet")) == ["1", "2"]
  # The supernet's training counts against --max_hours: it is part of the search's wall time.
  timing = json.loads((w / "timing.json").read_text())
  assert 0.0 < timing["setup_s"] < timing["wall_s"]
  again = _cli(root, "--workdir=w")
  assert "already finished" in again.stdout
  assert "supernet epoch" not in again.stderr  # nothing trained, not even loaded


def test_cli_supernet_search_resumes_to_identical_results(cli_search):
  root, _ = cli_search
  w, cut = root / "w", root / "cut"
  shutil.copytree(w, cut)
  os.remove(cut / "results.json")
  os.remove(cut / "timing.json")
  for sub, keep in (("checkpoints", 1), ("supernet", 1)):
    for step in os.listdir(cut / sub):
      if step.isdigit() and int(step) > keep:
        shutil.rmtree(cut / sub / step)
  proc = _cli(root, "--workdir=cut")
  assert "supernet: resuming from checkpoint at epoch 1" in proc.stderr
  assert "resuming from checkpoint at step 1" in proc.stderr
  assert (cut / "results.json").read_bytes() == (w / "results.json").read_bytes()
  assert (cut / "metrics.jsonl").read_bytes() == (w / "metrics.jsonl").read_bytes()
