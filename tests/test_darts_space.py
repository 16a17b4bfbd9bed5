"""The DARTS-space networks: ops, arch-as-data == specialised, supernet, discretisation, CLI."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas import retrain, runner
from jaxnas.models.darts_net import (DartsNetwork, MixedCell, OpSet, ReLUConvBN, darts_weights,
                                     derive_darts, edge_index, fixed_genotype,
                                     specialise_variables)
from jaxnas.ops import (Execution, avg_pool_3x3, depthwise_reference, depthwise_taps,
                        max_pool_3x3, max_pool_reference)
from jaxnas.spaces import darts_space

from conftest import FAST_COMPILE, FASHION_MNIST_SUBSET


def _compile(f, *args):
  return jax.jit(f).lower(*args).compile(compiler_options=FAST_COMPILE)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("k,dilation", [(3, 1), (5, 1), (3, 2), (5, 2)])
def test_depthwise_matches_grouped_conv_to_second_order(stride, k, dilation):
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 9, 9, 5))  # odd size: asymmetric windows
  w = jax.random.normal(jax.random.PRNGKey(1), (k, k, 1, 5))
  np.testing.assert_allclose(depthwise_taps(x, w, stride, dilation),
                             depthwise_reference(x, w, stride, dilation), rtol=1e-5, atol=1e-5)

  def grads(fn):
    return jax.grad(lambda x, w: jnp.sum(jnp.sin(fn(x, w, stride, dilation))), (0, 1))(x, w)

  for a, b in zip(grads(depthwise_taps), grads(depthwise_reference)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)

  def second(fn):  # reverse over the hand-written VJP, as DARTS' exact HVP does
    inner = lambda w: jax.grad(lambda x: jnp.sum(jnp.sin(fn(x, w, stride, dilation))))(x)
    return jax.grad(lambda w: jnp.sum(jnp.cos(inner(w))))(w)

  a, b = second(depthwise_taps), second(depthwise_reference)
  np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("shape", [(2, 7, 7, 3), (2, 8, 8, 3), (2, 5, 6, 2)])
@pytest.mark.parametrize("stride", [1, 2])
def test_max_pool_and_its_gradient_match_reduce_window(shape, stride):
  x = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
  loss = lambda f: jax.jit(jax.value_and_grad(lambda x: jnp.sum(jnp.sin(f(x, stride)))))
  (la, ga), (lb, gb) = loss(max_pool_3x3)(x), loss(max_pool_reference)(x)
  np.testing.assert_allclose(max_pool_3x3(x, stride), max_pool_reference(x, stride))
  np.testing.assert_allclose(la, lb, rtol=1e-6)
  np.testing.assert_allclose(ga, gb, rtol=1e-6, atol=1e-6)
  assert float(jnp.abs(ga).sum()) > 0


@pytest.mark.parametrize("impl", ["sum", "window"])
@pytest.mark.parametrize("size", [7, 8])
def test_avg_pool_excludes_padding(size, impl):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, size, size, 3))
  for stride in (1, 2):
    ref = lambda x: nn.avg_pool(x, (3, 3), (stride, stride), ((1, 1), (1, 1)),
                                count_include_pad=False)
    ours = lambda x: avg_pool_3x3(x, stride, impl=impl)
    (y, vjp), (y_ref, vjp_ref) = (jax.vjp(f, x) for f in (ours, ref))
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    g = jax.random.normal(jax.random.PRNGKey(1), y.shape)
    np.testing.assert_allclose(vjp(g)[0], vjp_ref(g)[0], rtol=1e-6, atol=1e-6)


def test_arch_as_data_network_equals_the_specialised_network():
  space = darts_space()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 1)), jnp.float32)
  net = DartsNetwork(channels=2, layers=3, num_classes=3)
  key = jax.random.PRNGKey(1)
  arch0 = space.sample(jax.random.PRNGKey(0))
  variables = _compile(lambda k, x, a: net.init(k, x, a, False), key, x, arch0)(key, x, arch0)
  apply = _compile(lambda v, x, a: net.apply(v, x, a, True, mutable=["batch_stats"])[0],
                   variables, x, arch0)
  for seed in range(2):
    arch = space.sample(jax.random.PRNGKey(seed))
    fixed = DartsNetwork(channels=2, layers=3, num_classes=3, fixed_arch=fixed_genotype(arch))
    pruned = specialise_variables(variables, arch, 3)
    own = jax.eval_shape(lambda k, x: fixed.init(k, x, None, False), key, x)
    assert jax.tree.structure(own) == jax.tree.structure(pruned)
    assert jax.tree.map(lambda a: a.shape, own) == jax.tree.map(lambda a: a.shape, pruned)
    y_fixed = _compile(lambda v, x: fixed.apply(v, x, None, True, mutable=["batch_stats"])[0],
                       pruned, x)(pruned, x)
    np.testing.assert_allclose(apply(variables, x, arch), y_fixed, rtol=1e-5, atol=1e-5)
    n_fixed = sum(p.size for p in jax.tree.leaves(pruned["params"]))
    assert n_fixed < sum(p.size for p in jax.tree.leaves(variables["params"]))


def test_supernet_with_one_hot_weights_runs_and_derive_picks_the_strongest_edges():
  net = DartsNetwork(channels=2, layers=2, num_classes=3, cell="mixed", affine=False)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 1)), jnp.float32)
  w = {"normal": jnp.full((14, 8), 1 / 8), "reduce": jnp.full((14, 8), 1 / 8)}
  key = jax.random.PRNGKey(1)
  variables = _compile(lambda k, x, w: net.init(k, x, w, False), key, x, w)(key, x, w)
  # Both cells of a 2-cell network reduce. Edge 5 of theirs (node 2 from input 0, strided)
  # weighing a sep_conv_3x3 only must change the output.
  one_hot = {"normal": w["normal"], "reduce": w["reduce"].at[5].set(jax.nn.one_hot(4, 8))}
  apply = _compile(lambda v, x, w: net.apply(v, x, w, False), variables, x, w)
  y, y1 = apply(variables, x, w), apply(variables, x, one_hot)
  assert y.shape == (2, 3) and bool(jnp.all(jnp.isfinite(y))) and not np.allclose(y, y1)

  alpha = {"normal": jnp.zeros((14, 8)), "reduce": jnp.zeros((14, 8))}
  # Node 3 (edges 9..13 from inputs 0..4): make inputs 4 (sep_conv_5x5) and 1 (max_pool)
  # strongest; "none" (op 0) is ignored however large.
  alpha["normal"] = (alpha["normal"].at[13, 5].set(5.0).at[10, 1].set(4.0)
                     .at[11, 0].set(50.0))
  arch = derive_darts(alpha)
  space = darts_space()
  string = space.encode(arch)
  assert string.startswith("Genotype(") and space.decode(string).normal_ops.tolist() == \
      arch.normal_ops.tolist()
  assert arch.normal_inputs[6:].tolist() == [1, 4]
  assert arch.normal_ops[6:].tolist() == [1, 5]
  # darts_weights: the one-hot op weights of a cell (how a DARTS run scores its derived
  # cell), two edges per node, and derive() reads the cell back from them.
  for k in jax.random.split(jax.random.PRNGKey(2), 5):
    arch = space.sample(k)  # derive() never picks "none" (op 0), so none are sampled here
    arch = arch._replace(normal_ops=jnp.maximum(arch.normal_ops, 1),
                         reduce_ops=jnp.maximum(arch.reduce_ops, 1))
    w = darts_weights(arch)
    assert float(w["normal"].sum()) == float(w["reduce"].sum()) == 8.0
    again = derive_darts(jax.tree.map(lambda a: 10.0 * a, w))
    assert all(np.array_equal(a, b) for a, b in zip(again, arch)), (again, arch)


def test_darts_space_needs_the_darts_strategy_or_training():
  with pytest.raises(runner.UserError, match="--space=darts"):
    runner.validate(runner.SearchConfig(space="darts", strategy="evolution"))
  with pytest.raises(runner.UserError, match="--space=darts"):
    runner.validate(runner.SearchConfig(space="darts", strategy="random", evaluator="zero_cost",
                                        dataset="fashion_mnist"))
  for strategy in runner.DARTS_SPACE_STRATEGIES:
    runner.validate(runner.SearchConfig(space="darts", strategy=strategy, evaluator="train",
                                        dataset="fashion_mnist"))


def test_evolution_with_real_training_in_the_darts_space(tmp_path):
  """--space=darts --evaluator=train --strategy=evolution: DARTS-space populations trained as
  one program per generation; results name Genotype cells with their exact cost."""
  config = runner.SearchConfig(
      evaluator="train", dataset="fashion_mnist", strategy="evolution", space="darts",
      budget=4, num_seeds=1, checkpoint_every=1,
      strategy_args=(("batch_size", 2), ("population_size", 2), ("tournament_size", 2)),
      # One cell (a reduction cell) keeps the compile short (393 s -> 148 s under load).
      # 216 training, 24 validation images of the subset's 2700 / 300.
      evaluator_args=(("batch_size", 16), ("cells", 1), ("channels", 2),
                      ("data_dir", FASHION_MNIST_SUBSET), ("epochs", 0.2),
                      ("train_fraction", 0.08)))
  results = runner.run(config, str(tmp_path / "search"))
  best = results["summary"]["best_arch"]
  arch = darts_space().decode(best)
  # A few SGD steps: scores are valid accuracies, not yet far from chance.
  assert best.startswith("Genotype(") and 0.0 < results["summary"]["best_score_mean"] <= 100.0
  assert len(results["runs"][0]["trajectory"]) == 4
  from jaxnas.models.darts_net import darts_cost
  run = results["runs"][0]
  assert run["params"] == int(darts_cost(arch, 2, 1, 10, 1, 28)[0])
  assert "--cells=1" in results["summary"]["retrain_command"]


def test_darts_space_search_then_retrain_its_cell(tmp_path):
  config = runner.SearchConfig(
      evaluator="train", dataset="fashion_mnist", strategy="darts", num_seeds=2,
      checkpoint_every=1, space="darts",
      # 60 training, 60 validation images of the subset's 1500 / 1500 (DARTS halves it).
      evaluator_args=(("batch_size", 16), ("cells", 1), ("channels", 2),
                      ("data_dir", FASHION_MNIST_SUBSET), ("epochs", 1.0),
                      ("train_fraction", 0.04)))
  runner.validate(config)
  results = runner.run(config, str(tmp_path / "search"))
  space = darts_space()
  for r in results["runs"]:
    arch = space.decode(r["best_arch"])  # a valid genotype
    assert set(r["alphas"]) == {"normal", "reduce"}
    assert np.allclose(np.sum(r["alphas"]["normal"], 1), 1.0, atol=1e-4)
    assert r["skip_count"] == int(np.sum(np.asarray(arch.normal_ops) == 3))
  command = results["summary"]["retrain_command"]
  assert "--cells=1" in command and "Genotype(" in command

  c = retrain.RetrainConfig(arch=results["summary"]["best_arch"], data_dir=FASHION_MNIST_SUBSET,
                            epochs=0.4, channels=2, cells=1, batch_size=32)  # 38 steps
  out = retrain.retrain(c, str(tmp_path / "retrain"))
  assert 0.0 <= out["test_accuracy"] <= 100.0 and out["params"] > 0 and out["flops"] > 0
  with open(tmp_path / "retrain" / "arch.json") as f:
    arch_json = json.load(f)
  net = retrain.network_of(arch_json)
  variables = retrain.load_variables(str(tmp_path / "retrain"))
  logits = net.apply(variables, jnp.zeros((1, 28, 28, 1)), None, train=False)
  assert logits.shape == (1, 10) and bool(jnp.all(jnp.isfinite(logits)))


def test_late_remat_supernet_equals_the_stored_one():
  """remat=True recomputes each edge group behind a barrier with the cotangent: same values,
  same gradients (w.r.t. weights and op weights), same new BN statistics."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 1)), jnp.float32)
  rng = np.random.default_rng(1)
  w = {k: jax.nn.softmax(jnp.asarray(rng.normal(size=(14, 8)), jnp.float32))
       for k in ("normal", "reduce")}
  plain = DartsNetwork(channels=2, layers=1, num_classes=3, cell="mixed", affine=False)
  remat = plain.clone(remat=True)
  key = jax.random.PRNGKey(1)
  v = _compile(lambda k, x, w: plain.init(k, x, w, False), key, x, w)(key, x, w)
  assert jax.tree.structure(v) == jax.tree.structure(jax.eval_shape(
      lambda k: remat.init(k, x, w, False), key))

  def loss(net):
    def f(params, stats, w):
      y, new = net.apply({"params": params, "batch_stats": stats}, x, w, True,
                         mutable=["batch_stats"])
      return jnp.sum(jnp.sin(y)), new
    return jax.value_and_grad(f, argnums=(0, 2), has_aux=True)

  (l0, s0), (gp0, gw0) = _compile(loss(plain), v["params"], v["batch_stats"], w)(
      v["params"], v["batch_stats"], w)
  (l1, s1), (gp1, gw1) = _compile(loss(remat), v["params"], v["batch_stats"], w)(
      v["params"], v["batch_stats"], w)
  np.testing.assert_allclose(l0, l1, rtol=1e-6)
  for a, b in ((gp0, gp1), (gw0, gw1), (s0["batch_stats"], s1["batch_stats"])):
    jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-6), a, b)
  assert float(jnp.abs(gw0["reduce"]).max()) > 0


@pytest.mark.parametrize("reduction", [False, True])
def test_grouped_mixed_cell_equals_edge_by_edge(reduction):
  """MixedCell runs the edges leaving each state as one vmap (the two inputs' together); the
  same cell written edge by edge in DARTS' order (node i = sum over inputs j of
  MixedOp_(i,j)) gives the same output and the same new BN statistics."""
  rng = np.random.default_rng(2)
  s0 = jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32)
  s1 = jnp.asarray(rng.normal(size=(4, 8, 8, 3)), jnp.float32)
  w = jax.nn.softmax(jnp.asarray(rng.normal(size=(14, 8)), jnp.float32))
  cell = MixedCell(2, reduction, False, affine=False)
  key = jax.random.PRNGKey(3)
  v = _compile(lambda k: cell.init(k, s0, s1, w, False), key)(key)
  out, new = _compile(lambda v: cell.apply(v, s0, s1, w, True, mutable=["batch_stats"]), v)(v)

  def reference(v):
    pre = lambda name, x: ReLUConvBN(2, False).apply(
        {c: tree[name] for c, tree in v.items()}, x, True, mutable=["batch_stats"])[0]
    h0, h1 = pre("pre0", s0), pre("pre1", s1)
    states, stats = [h0, h1], {}
    for i in range(4):
      node = 0
      for j, h in enumerate(states):
        stride = 2 if reduction and j < 2 else 1
        k = i - max(0, j - 1)
        take = lambda tree: jax.tree.map(lambda a: a[k], group(tree, j))
        edge = OpSet(2, (stride,), False, True)
        y, upd = edge.apply({"params": take(v["params"]), "batch_stats": take(v["batch_stats"])},
                            h, w[edge_index(i, j)], stride, True, mutable=["batch_stats"])
        stats[(i, j)] = upd["batch_stats"]
        node = node + y
      states.append(node)
    return jnp.concatenate(states[2:], axis=-1), stats

  def group(tree, j):  # the variables of the edges leaving state j, [edges, ...]
    return (jax.tree.map(lambda a: a[j], tree["inputs"]["ops"]) if j < 2 else
            tree[f"src{j}"]["ops"])

  ref, ref_stats = _compile(reference, v)(v)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  for (i, j), st in ref_stats.items():
    k = i - max(0, j - 1)
    got = jax.tree.map(lambda a: a[k], group(new["batch_stats"], j))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, st)


def test_mixed_cell_kernels_are_drawn_like_the_ops_own_initialisers():
  """A supernet group's kernels come from one draw (remat.fan_in_uniform) with the same tree,
  shapes and distribution as the ops' own initialisers: U(+-1/sqrt(fan_in)) per kernel,
  a fresh draw per copy; anything but a conv kernel is refused."""
  from jaxnas.models.remat import PureEdges, fan_in_uniform
  x = jnp.zeros((2, 8, 8, 16), jnp.float32)
  w = jnp.full((4, 8), 1 / 8, jnp.float32)
  op = OpSet(16, (2,), False, True)  # strided: FactorizedReduce's kernels too
  make = lambda init: PureEdges(op, (2, False), 4, False, False, init)
  key = jax.random.PRNGKey(0)
  ours = make(fan_in_uniform).init(key, x, w)["params"]
  flax_own = jax.eval_shape(lambda k: make(None).init(k, x, w), key)["params"]
  assert jax.tree.structure(ours) == jax.tree.structure(flax_own)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(flax_own)):
    assert a.shape == b.shape and a.dtype == b.dtype, path
    bound = 1 / np.sqrt(np.prod(a.shape[1:-1]))  # a: [copies, H, W, I, O]
    a = np.asarray(a)
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound, path
    assert abs(a.std() / (bound / np.sqrt(3)) - 1) < 0.25, path  # uniform's std
    assert not np.allclose(a[0], a[1]), path  # copies drawn independently
  with pytest.raises(ValueError, match="conv kernels"):
    fan_in_uniform(key, {"bias": jax.ShapeDtypeStruct((16,), jnp.float32)})


def _conv_macs(jaxpr) -> int:
  """Multiply-accumulates of every convolution and matmul in a jaxpr (sub-jaxprs included)."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      rhs, dn = eqn.invars[1].aval, eqn.params["dimension_numbers"]
      per_out = np.prod([rhs.shape[i] for i in dn.rhs_spec[2:]]) * rhs.shape[dn.rhs_spec[1]]
      total += int(np.prod(eqn.outvars[0].aval.shape)) * int(per_out)
    elif eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      depth = np.prod([eqn.invars[0].aval.shape[i] for i in contract])
      total += int(np.prod(eqn.outvars[0].aval.shape)) * int(depth)
    for p in eqn.params.values():
      for sub in p if isinstance(p, (list, tuple)) else [p]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          total += _conv_macs(inner)
  return total


@pytest.mark.parametrize("layers,image", [(5, 28), (8, 32), (3, 9)])
def test_darts_cost_is_exact(layers, image, monkeypatch):
  """darts_cost's parameters equal the specialised network's tree; its FLOPs equal the
  multiply-accumulates of every conv and matmul in the network's forward jaxpr (depthwise
  as XLA's grouped conv, and the stem as XLA's conv, so that each one is a conv primitive)."""
  from jaxnas.models import darts_net
  monkeypatch.setattr(darts_net, "depthwise",
                      lambda x, kernel, stride, dilation=1, impl=None:
                      depthwise_reference(x, kernel, stride, dilation))
  space = darts_space()
  for seed in range(3):
    arch = space.sample(jax.random.PRNGKey(seed))
    net = DartsNetwork(channels=4, layers=layers, num_classes=10,
                       fixed_arch=fixed_genotype(arch), execution=Execution(conv="xla"))
    x = jnp.zeros((1, image, image, 1))
    v = jax.eval_shape(lambda: net.init(jax.random.PRNGKey(0), x, None, False))
    params, flops = jax.jit(darts_net.darts_cost, static_argnums=range(1, 6))(
        arch, 4, layers, 10, 1, image)
    assert int(params) == sum(int(np.prod(p.shape)) for p in jax.tree.leaves(v["params"]))
    jaxpr = jax.make_jaxpr(lambda v, x: net.apply(v, x, None, train=False))(v, x).jaxpr
    assert int(flops) == _conv_macs(jaxpr)


def test_darts_space_population_trains_as_one_program():
  """A DartsArch population trains with the map plan (one program, only each member's ops)
  exactly as member by member, and scores come back per member."""
  from jaxnas.models import TrainConfig, make_data, train_population_metrics
  rng = np.random.default_rng(0)
  x = rng.integers(0, 255, (96, 8, 8, 1), dtype=np.uint8)
  y = (x.reshape(96, -1).mean(1) > 127).astype(np.int32)
  data = make_data(x[:64], y[:64], x[64:], y[64:], (0.5,), (0.25,))
  space = darts_space()
  archs = jax.vmap(space.sample)(jax.random.split(jax.random.PRNGKey(5), 2))
  # One (reduction) cell: with three cells the two compilations took 899 s of a CI run.
  # Normal cells' forward pass is pinned by test_arch_as_data_network_equals_the_specialised_network,
  # their ops' gradients by the op tests above.
  config = TrainConfig(steps=3, batch_size=8, channels=2, cells=1, num_classes=2,
                       eval_batch_size=32, plan="map", space="darts")
  key = jax.random.PRNGKey(1)
  a = train_population_metrics(archs, key, data, config)
  b = train_population_metrics(archs, key, data, config._replace(plan="sequential"))
  assert a["val_accuracy"].shape == (2,) and not bool(jnp.any(a["failed"]))
  np.testing.assert_allclose(np.asarray(a["losses"]), np.asarray(b["losses"]), rtol=1e-4)
  np.testing.assert_allclose(np.asarray(a["val_accuracy"]), np.asarray(b["val_accuracy"]))
  with pytest.raises(ValueError, match="DartsArch"):
    train_population_metrics(jnp.zeros((2, 6), jnp.int32), key, data, config)
