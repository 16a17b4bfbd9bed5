"""NB201 network with the architecture as data, its cost model, and population training."""

import functools

import chex
import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxnas import datasets, native, ops
from jaxnas.models import nb201_net as net_lib
from jaxnas.models import train as train_lib

from conftest import FAST_COMPILE, FASHION_MNIST_SUBSET, skip_unless_onednn

# The module alone on one core: 145.1 -> 118.6 s (conftest._library_compile_setting).
FAST_LIBRARY_COMPILE = True

ARCHS = [(3, 1, 2, 4, 0, 3), (0, 0, 0, 0, 0, 0), (1, 4, 2, 1, 3, 4)]


def _compile(f, *args, static_argnums=()):
  return jax.jit(f, static_argnums=static_argnums).lower(*args).compile(
      compiler_options=FAST_COMPILE)


def _net(**kw):
  return net_lib.NB201Network(channels=4, cells=1, num_classes=7, **kw)


@pytest.mark.parametrize("op_impl", net_lib.OP_IMPLS)
def test_arch_as_data_equals_specialised(op_impl):
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 2))
  net = _net(op_impl=op_impl)
  # One variable tree serves every cell: the arch-as-data net holds all ops.
  init_args = (jax.random.PRNGKey(1), x, jnp.zeros(6, jnp.int32))
  v = _compile(net.init, *init_args)(*init_args)
  f = lambda v, a, train: net.apply(v, x, a, train=train, mutable=["batch_stats"])
  compiled = {train: _compile(f, v, init_args[2], train, static_argnums=2)
              for train in (True, False)}
  apply = lambda v, a, train: compiled[train](v, a)
  for arch in ARCHS:
    a = jnp.asarray(arch, jnp.int32)
    spec = net_lib.specialise(net, arch)
    vs = net_lib.specialise_variables(v, arch)
    assert (jax.tree_util.tree_structure(vs) ==
            jax.tree_util.tree_structure(spec.init(jax.random.PRNGKey(1), x)))
    for train in (True, False):
      y, new = apply(v, a, train)
      ys, new_s = spec.apply(vs, x, train=train, mutable=["batch_stats"])
      chex.assert_shape(y, (3, 7))
      chex.assert_trees_all_close(y, ys, atol=1e-5, rtol=1e-5)
      # The running statistics of the ops the cell uses are updated identically.
      chex.assert_trees_all_close(net_lib.specialise_variables(new, arch)["batch_stats"],
                                  new_s["batch_stats"], atol=1e-5, rtol=1e-5)


def test_scanned_cells_compute_the_unrolled_network():
  """``scan_cells``: a stage's cells as one ``nn.scan`` over stacked variables compute the
  unrolled network's function (outputs, BN updates, gradients), ``init_variables`` draws
  every stacked kernel on its own, and a population trains with it."""
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 2))
  net = net_lib.NB201Network(channels=4, cells=2, num_classes=7)
  scanned = net.clone(scan_cells=True)
  a0 = jnp.zeros(6, jnp.int32)
  v = net.init(jax.random.PRNGKey(1), x, a0)
  sv = net_lib.stack_cells(v, 2)
  assert "cells1" in sv["params"] and "cell1_0" not in sv["params"]
  assert (jax.tree.structure(sv) ==
          jax.tree.structure(jax.eval_shape(lambda: scanned.init(jax.random.PRNGKey(1), x, a0))))

  def run(net, v, a):
    def loss(p):
      y, new = net.apply({**v, "params": p}, x, a, train=True, mutable=["batch_stats"])
      return jnp.sum(jnp.sin(y)), new
    (l, new), g = jax.value_and_grad(loss, has_aux=True)(v["params"])
    return l, new, g, net.apply(v, x, a, train=False)

  unrolled = _compile(lambda v, a: run(net, v, a), v, a0)
  stacked = _compile(lambda v, a: run(scanned, v, a), sv, a0)
  for arch in ARCHS:
    a = jnp.asarray(arch, jnp.int32)
    l, new, g, y = unrolled(v, a)
    ls, new_s, gs, ys = stacked(sv, a)
    np.testing.assert_allclose(ls, l, rtol=1e-5)
    chex.assert_trees_all_close(ys, y, atol=1e-5)
    chex.assert_trees_all_close(new_s, net_lib.stack_cells(new, 2), atol=1e-5)
    chex.assert_trees_all_close(gs, net_lib.stack_cells({"params": g}, 2)["params"],
                                atol=1e-4, rtol=1e-4)
  drawn = train_lib.init_variables(scanned, jax.random.PRNGKey(2), x, a0, train=False)
  k = np.asarray(drawn["params"]["cells0"]["cell"]["edge0"]["nor_conv_3x3"]["kernel"])
  assert k.shape == (2, 3, 3, 4, 4) and not np.allclose(k[0], k[1])
  bound = 1 / np.sqrt(3 * 3 * 4)
  assert bound >= np.abs(k).max() > 0.5 * bound
  config = train_lib.TrainConfig(steps=4, batch_size=16, channels=4, cells=2, plan="map",
                                 eval_batch_size=64, scan_cells=True)
  metrics = train_lib.train_population_metrics(
      jnp.asarray(ARCHS[:2], jnp.int32), jax.random.PRNGKey(0), _data(), config)
  assert np.all(np.isfinite(np.asarray(metrics["val_accuracy"])))


def test_switch_edge_gradients_equal_specialised():
  # The training-mode switch edge has a custom VJP (one residual set, a backward switch):
  # its parameter gradients must be autodiff's of the specialised network, and zero for
  # the ops a cell does not use.
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 2))
  net = _net()
  v = net.init(jax.random.PRNGKey(1), x, jnp.zeros(6, jnp.int32))

  def loss(p, a, net, stats):
    y, _ = net.apply({"params": p, "batch_stats": stats}, x, a, train=True,
                     mutable=["batch_stats"])
    return jnp.sum(jnp.sin(y))

  grad = _compile(jax.grad(loss), v["params"], jnp.zeros(6, jnp.int32), net,
                  v["batch_stats"], static_argnums=2)
  for arch in ARCHS + [(3, 3, 3, 3, 3, 3)]:
    g = grad(v["params"], jnp.asarray(arch, jnp.int32), v["batch_stats"])
    spec, vs = net_lib.specialise(net, arch), net_lib.specialise_variables(v, arch)
    expected = jax.grad(loss)(vs["params"], None, spec, vs["batch_stats"])
    got = net_lib.specialise_variables({"params": g, "batch_stats": v["batch_stats"]},
                                       arch)["params"]
    # Float32 BN gradients (|g| up to ~5) computed by two differently fused programs.
    chex.assert_trees_all_close(got, expected, atol=2e-4, rtol=1e-4)
    total = lambda t: sum(float(jnp.abs(leaf).sum()) for leaf in jax.tree.leaves(t))
    np.testing.assert_allclose(total(g), total(expected), rtol=1e-4)


def test_balanced_order():
  work = [5.0, 1.0, 1.0, 4.0, 0.0, 3.0]
  order = train_lib.balanced_order(work, 2)
  assert sorted(order.tolist()) == list(range(6))
  loads = [sum(work[i] for i in order[:3]), sum(work[i] for i in order[3:])]
  assert loads == [7.0, 7.0]
  # Unknown work (zeros) deals round robin.
  np.testing.assert_array_equal(train_lib.balanced_order(np.zeros(4), 2), [0, 2, 1, 3])
  # Without a per-device limit the shares' sizes follow the work.
  assert train_lib.device_shares([9.0, 1.0, 2.0, 3.0, 2.0], 2) == [[0], [1, 2, 3, 4]]
  assert train_lib.device_shares(np.zeros(5), 3) == [[0, 3], [1, 4], [2]]


@pytest.mark.parametrize("impl", ops.CONV_IMPLS)
def test_conv_vjp_matches_autodiff(impl):
  skip_unless_onednn(impl)
  # Covers the forward of tiny convs as one im2col matmul (k*k*cin <= 64, <= 16 channels)
  # and each kernel-gradient form of "taps": im2col (k*k*cin <= 64), per-tap
  # matmuls (batch 2), and per-tap matmuls over batch chunks (batch 8); odd sizes too, and
  # the sub-pixel input gradient of strided convs (strides 2 and 3, kernels 1, 2, 3, 5), and
  # a 16 -> 16 conv (forward and input gradient with a 17th zero channel on CPU).
  cases = [(2, 3, 8, 3, 1), (2, 3, 8, 1, 1), (2, 3, 8, 3, 2), (2, 3, 7, 3, 2), (2, 4, 9, 3, 2),
           (2, 4, 8, 3, 3), (2, 4, 9, 5, 2), (2, 4, 7, 2, 2), (2, 8, 8, 3, 1), (8, 8, 8, 3, 1),
           (8, 8, 7, 3, 2), (8, 8, 6, 1, 2)]
  for n, cin, h, k, stride, cout in [c + (5,) for c in cases] + [(2, 16, 6, 3, 1, 16)]:
    # numpy draws: jax.random.normal would compile a sampler per shape (~1 s each).
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, h, h + 1, cin), np.float32)
    w = rng.standard_normal((k, k, cin, cout), np.float32)
    p = k // 2
    ref = lambda x, w: jax.lax.conv_general_dilated(x, w, (stride, stride), ((p, p), (p, p)),
                                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
    ours = lambda x, w: ops.conv2d(x, w, stride, impl=impl)
    g = rng.standard_normal(jax.eval_shape(ref, x, w).shape, np.float32)
    expected, got = (_compile(functools.partial(_value_and_vjp, conv), x, w, g)(x, w, g)
                     for conv in (ref, ours))
    chex.assert_trees_all_close(got, expected, atol=1e-4, rtol=1e-5)


def test_data_parallel_darts_builds_im2col_convs_unless_a_conv_is_set():
  from jaxnas.distributed import mesh
  from jaxnas.strategies.darts import DATA_AXIS, DartsConfig, make_darts
  c = DartsConfig(channels=2, batch_size=8)
  default = ops.Execution().resolve()
  assert make_darts(c).config.execution == default
  assert make_darts(c, mesh(DATA_AXIS)).config.execution == default._replace(conv="im2col")
  assert make_darts(c, mesh(DATA_AXIS)).supernet.net.execution.conv == "im2col"
  gemm = c._replace(execution=ops.Execution(conv="gemm"))
  assert make_darts(gemm, mesh(DATA_AXIS)).config.execution.conv == "gemm"


def test_data_parallel_supernets_leave_no_unpartitionable_conv():
  """Under a mesh every conv of the DARTS-space and MBConv supernets, depthwise ones
  included, takes a form XLA's partitioner can split over the batch: no oneDNN call
  (which it can only run whole, all-gathering the batch onto every device)."""
  from jaxnas.distributed import mesh
  from jaxnas.estimators import one_shot
  from jaxnas.models import TrainData
  from jaxnas.strategies.darts import DATA_AXIS, DartsConfig, make_darts
  if not native.onednn_available():
    pytest.skip("the oneDNN convs are not built here")
  images, labels = np.zeros((8, 32, 32, 3), np.uint8), np.zeros(8, np.int32)
  data = TrainData(images, labels, images, labels, np.full(3, 0.5, np.float32),
                   np.full(3, 0.25, np.float32))
  key = jax.random.PRNGKey(0)

  def darts_calls_onednn(m):
    d = make_darts(DartsConfig(space="darts", channels=2, cells=1, batch_size=8), m)
    text = jax.jit(d.step).lower(jax.eval_shape(d.init, key, data), data).as_text()
    return "jaxnas_onednn" in text

  def mbconv_calls_onednn(m):  # the SPOS supernet's network, as make_spos builds it
    config = one_shot.for_mesh(one_shot.SupernetConfig(space="mbconv", batch_size=8), m)
    model = one_shot.supernet_model(config, 10)
    net, x = model.network(None), jnp.zeros((8, 32, 32, 3))
    arch = model.space.from_vector(jnp.zeros(model.space.num_decisions, jnp.int32))
    v = jax.eval_shape(lambda k: net.init(k, x, arch, train=False), key)

    def loss(params, stats):
      out, _ = net.apply({"params": params, "batch_stats": stats}, x, arch, train=True,
                         mutable=["batch_stats"])
      return out.sum()

    text = jax.jit(jax.grad(loss)).lower(v["params"], v["batch_stats"]).as_text()
    return "jaxnas_onednn" in text

  assert darts_calls_onednn(None) and mbconv_calls_onednn(None)  # one device: oneDNN's
  assert not darts_calls_onednn(mesh(DATA_AXIS)) and not mbconv_calls_onednn(mesh(DATA_AXIS))


def test_execution_travels_in_the_config_and_keys_the_program_cache():
  default = ops.Execution().resolve()
  assert train_lib.resolve_plan(train_lib.TrainConfig()).execution == default
  assert train_lib.resolve_plan(train_lib.TrainConfig(), "gpu").execution == (
      ops.Execution("im2col", "window"))
  xla = train_lib.TrainConfig(execution=ops.Execution(conv="xla"))
  assert train_lib.resolve_plan(xla).execution == default._replace(conv="xla")
  assert train_lib.make_network(xla).execution.conv == "xla"
  assert hash(train_lib.resolve_plan(xla)) != hash(train_lib.resolve_plan(train_lib.TrainConfig()))
  with pytest.raises(ValueError, match="unknown conv impl"):
    train_lib.resolve_plan(train_lib.TrainConfig(execution=ops.Execution(conv="fft")))


@pytest.mark.parametrize("impl", ops.CONV_IMPLS)
def test_conv_impls_agree_under_vmap(impl):
  skip_unless_onednn(impl)
  # A population's per-member kernels: vmap over (x, w) as the vmap plan does.
  rng = np.random.default_rng(1)
  x = rng.standard_normal((3, 4, 7, 7, 6), np.float32)
  w = rng.standard_normal((3, 3, 3, 6, 5), np.float32)
  for stride in (1, 2):
    f = lambda impl: jax.vmap(functools.partial(_value_and_vjp, lambda x, w: ops.conv2d(
        x, w, stride, impl=impl)))
    y = jax.eval_shape(jax.vmap(lambda x, w: ops.conv2d(x, w, stride, impl="xla")), x, w)
    g = rng.standard_normal(y.shape, np.float32)
    chex.assert_trees_all_close(jax.jit(f(impl))(x, w, g), jax.jit(f("xla"))(x, w, g),
                                atol=1e-4, rtol=1e-5)


def test_conv_impl_choice():
  assert ops.conv_impl("cpu") == ("onednn" if native.onednn_available() else "taps")
  assert ops.conv_impl("gpu") == ops.conv_impl("tpu") == "im2col"
  assert (ops.pool_impl("cpu"), ops.pool_impl("gpu")) == ("sum", "window")
  assert ops.Execution().resolve("gpu") == ops.Execution("im2col", "window")
  assert ops.Execution(conv="gemm").resolve("gpu") == ops.Execution("gemm", "window")
  with pytest.raises(ValueError, match="unknown pool impl"):
    ops.avg_pool_3x3(jnp.zeros((1, 4, 4, 1)), impl="max")
  with pytest.raises(ValueError, match="unknown pool impl"):
    ops.Execution(pool="max").resolve()
  with pytest.raises(ValueError, match="unknown conv impl"):
    ops.conv2d(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 1)), impl="fft")


@pytest.mark.parametrize("size", [7, 8])
def test_avg_pool_2x2_equals_flax(size):
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, size, size + 1, 3), np.float32)
  g = rng.standard_normal((2, size // 2, (size + 1) // 2, 3), np.float32)
  ref = lambda x: nn.avg_pool(x, (2, 2), strides=(2, 2))
  ours = lambda x: ops.avg_pool_2x2(x, impl="sum")  # "window" is flax's pool itself
  (y, vjp), (y_ref, vjp_ref) = (jax.vjp(f, x) for f in (ours, ref))
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(vjp(g)[0], vjp_ref(g)[0], rtol=1e-6, atol=1e-6)


def test_cpu_compiler_options(monkeypatch):
  """Population programs compile at LLVM -O1 on CPU unless XLA_FLAGS sets a level."""
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
  assert train_lib.compiler_options() == {"xla_backend_optimization_level": 1}
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=3")
  assert train_lib.compiler_options() is None


def test_darts_gpu_compiler_options(monkeypatch):
  """DARTS-space programs turn Triton GEMMs off on GPU only (an XLA:GPU abort), unless
  XLA_FLAGS names the option; the option is one XLA accepts."""
  from jaxnas.models import darts_net
  monkeypatch.setenv("XLA_FLAGS", "")
  assert darts_net.compiler_options(backend="gpu") == {"xla_gpu_enable_triton_gemm": False}
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert train_lib.model_of(train_lib.TrainConfig(space="darts")).compiler_options() == {
      "xla_gpu_enable_triton_gemm": False}
  assert train_lib.model_of(train_lib.TrainConfig(space="nb201")).compiler_options() is None
  monkeypatch.undo()
  monkeypatch.setenv("XLA_FLAGS", "")
  assert darts_net.compiler_options(backend="cpu") is None
  assert train_lib.compiler_options("darts") == train_lib.compiler_options("nb201")
  # An unknown option name is an error, so this proves the name: XLA:CPU ignores its value.
  f = jax.jit(lambda x: x @ x, compiler_options=darts_net.GPU_COMPILER_OPTIONS)
  assert float(f(jnp.eye(3))[0, 0]) == 1.0
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=true")
  assert darts_net.compiler_options(backend="gpu") is None


def _value_and_vjp(f, x, w, g):
  y, vjp = jax.vjp(f, x, w)
  return (y,) + vjp(g)


def _jaxpr_macs(jaxpr):
  """Multiply-accumulates of every conv and dot in a jaxpr (an independent FLOP count)."""
  total = 0
  for eqn in jaxpr.eqns:
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      total += _jaxpr_macs(getattr(sub, "jaxpr", sub))
    if eqn.primitive.name == "conv_general_dilated":
      out = eqn.outvars[0].aval.shape
      kh, kw, cin, _ = eqn.invars[1].aval.shape
      total += int(np.prod(out)) * kh * kw * cin
    elif eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      k = int(np.prod([eqn.invars[0].aval.shape[d] for d in contract]))
      total += int(np.prod(eqn.outvars[0].aval.shape)) * k
  return total


@pytest.mark.parametrize("arch", ARCHS)
def test_cost_matches_flax_and_jaxpr(arch):
  # The jaxpr's convs as the network defines them: XLA's conv, not the CPU's forms (the
  # stem as an im2col matmul, 16-channel convs with a 17th zero channel).
  c, n, k, cin, hw = 8, 2, 10, 3, 16
  net = net_lib.NB201Network(channels=c, cells=n, num_classes=k,
                             execution=ops.Execution(conv="xla"))
  spec = net_lib.specialise(net, arch)
  x = jnp.zeros((1, hw, hw, cin))
  v = spec.init(jax.random.PRNGKey(0), x)
  n_params = sum(p.size for p in jax.tree_util.tree_leaves(v["params"]))
  params, flops = jax.jit(net_lib.cost, static_argnums=range(1, 6))(
      jnp.asarray(arch), c, n, k, cin, hw)
  assert int(params) == n_params
  jaxpr = jax.make_jaxpr(lambda v, x: spec.apply(v, x))(v, x).jaxpr
  assert int(flops) == _jaxpr_macs(jaxpr)
  # Vectorised over a population, too.
  pop = jnp.asarray(ARCHS)
  ps, _ = jax.vmap(lambda a: net_lib.cost(a, c, n, k, cin, hw))(pop)
  assert int(ps[ARCHS.index(arch)]) == n_params


def _data(n_train=512, n_val=256):
  """A few hundred real Fashion-MNIST images (the tests' subset)."""
  ds = datasets.load_fashion_mnist(FASHION_MNIST_SUBSET)
  tx, ty, vx, vy = datasets.train_val_split(ds.train_images[:n_train + n_val],
                                            ds.train_labels[:n_train + n_val],
                                            n_val / (n_train + n_val), seed=0)
  return train_lib.make_data(tx, ty, vx, vy, ds.mean, ds.std)


@pytest.mark.parametrize("space", ["nb201", "darts"])
def test_init_variables_are_drawn_like_flax_init(space):
  """``train.init_variables``: flax's tree, shapes and constants, and the initialisers'
  distributions (conv kernels U(+-1/sqrt(fan_in)), the classifier lecun_normal) from two
  RNG computations; deterministic per key; an unknown kind of leaf is refused."""
  from jaxnas.spaces import darts_space
  config = train_lib.TrainConfig(space=space, channels=8, cells=1 if space == "nb201" else 3)
  net = train_lib.make_network(config)
  arch = (jnp.asarray(ARCHS[0], jnp.int32) if space == "nb201" else
          darts_space().sample(jax.random.PRNGKey(1)))
  x = jnp.zeros((1, 12, 12, 1), jnp.float32)
  key = jax.random.PRNGKey(0)
  init = jax.jit(lambda k: train_lib.init_variables(net, k, x, arch, train=False))
  ours = init(key)
  # flax's own init, run for values only where it is quick (NB201); its tree everywhere.
  flax_own = (net.init(key, x, arch, train=False) if space == "nb201" else
              jax.eval_shape(lambda k: net.init(k, x, arch, train=False), key))
  assert jax.tree.structure(ours) == jax.tree.structure(flax_own)
  kernels = 0
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(flax_own)):
    assert a.shape == b.shape and a.dtype == b.dtype, path
    a = np.asarray(a)
    if a.ndim == 4:  # conv kernel, HWIO
      kernels += 1
      bound = 1 / np.sqrt(np.prod(a.shape[:-1]))
      assert np.abs(a).max() <= bound and np.abs(a).max() > 0.5 * bound, path
      if a.size >= 500:
        assert abs(a.std() / (bound / np.sqrt(3)) - 1) < 0.25, path  # uniform's std
    elif a.ndim == 2:  # classifier kernel: lecun_normal, std 1/sqrt(fan_in) truncated at +-2
      std = 1 / np.sqrt(a.shape[0])
      assert abs(a.std() / std - 1) < 0.3 and np.abs(a).max() <= 2 * std / 0.87962566 * 1.0001
    elif space == "nb201":
      np.testing.assert_array_equal(a, np.asarray(b), err_msg=str(path))
    else:  # BatchNorm: scale and var ones, bias and mean zeros (flax's values, checked above)
      assert np.all(a == (1.0 if path[-1].key in ("scale", "var") else 0.0)), path
  assert kernels > 10
  # Kernels are independent draws, not copies of one another.
  leaves = [np.asarray(a) for a in jax.tree.leaves(ours["params"]) if a.ndim == 4 and a.size > 50]
  assert all(not np.allclose(a.ravel()[:50], b.ravel()[:50]) for a, b in zip(leaves, leaves[1:]))
  chex.assert_trees_all_equal(ours, init(key))
  other = init(jax.random.PRNGKey(1))
  first_kernel = lambda v: next(a for a in jax.tree.leaves(v["params"]) if a.ndim == 4)
  assert not np.allclose(first_kernel(other), first_kernel(ours))

  class Odd(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x * self.param("gain", nn.initializers.ones, (3,))

  with pytest.raises(ValueError, match="no initialiser known for params/gain"):
    train_lib.init_variables(Odd(), key, jnp.zeros(3))


def test_specialised_network_starts_from_the_arch_as_data_init():
  """``sequential_static``/retrain's specialised network starts where the arch-as-data
  network does for its cell, so the two plans train the same function from the same start."""
  config = train_lib.TrainConfig(channels=8, cells=1)
  data = _data()
  key = jax.random.PRNGKey(3)
  for arch in ARCHS:
    full = train_lib.make_train_parts(config).init(jnp.asarray(arch, jnp.int32), key, data)
    spec = train_lib.make_train_parts(config, fixed_arch=arch).init(
        jnp.asarray(arch, jnp.int32), key, data)
    want = net_lib.specialise_variables({"params": full[0], "batch_stats": full[1]}, arch)
    chex.assert_trees_all_equal(want, {"params": spec[0], "batch_stats": spec[1]})


def test_short_training_learns_and_contains_nan():
  data = _data()
  config = train_lib.TrainConfig(steps=30, batch_size=64, channels=8, cells=1, plan="map",
                                 eval_batch_size=128)
  archs = jnp.asarray([(3, 1, 2, 4, 0, 3), (2, 3, 1, 3, 4, 1), (1, 3, 0, 2, 3, 1)], jnp.int32)
  key = jax.random.PRNGKey(0)
  good = train_lib.train_population_metrics(archs, key, data, config)
  acc = np.asarray(good["val_accuracy"])
  assert np.all(acc > 0.5), acc  # chance is 0.1
  losses = np.asarray(good["losses"])
  assert np.all(losses[:, -5:].mean(1) < losses[:, :5].mean(1))
  # Member 1 gets an absurd learning rate and diverges; the others are untouched.
  bad = train_lib.train_population_metrics(archs, key, data, config,
                                           lr_scales=jnp.asarray([1.0, 1e30, 1.0]))
  bad_acc = np.asarray(bad["val_accuracy"])
  assert np.isnan(bad_acc[1]) and bool(bad["failed"][1])
  np.testing.assert_allclose(bad_acc[[0, 2]], acc[[0, 2]])


def test_unknown_plan_is_refused():
  # The plans themselves agree in tests/test_accelerator_path.py (vmap + accelerator forms
  # against the CPU default).
  with pytest.raises(ValueError, match="unknown plan"):
    train_lib.resolve_plan(train_lib.TrainConfig(plan="bogus"))


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_backward_is_autodiff_of_its_forward_to_second_order(affine):
  """Training-mode BN's hand-written VJP (``ops.norm.batch_norm``) gives autodiff's
  gradients of the same forward, and so does differentiating it again (DARTS' second
  order); the module's output and running statistics are flax's ``nn.BatchNorm``'s."""
  from jaxnas.ops import norm
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.standard_normal((4, 5, 6, 7)) * 2 + 1, jnp.float32)
  w = jnp.asarray(rng.standard_normal(z.shape), jnp.float32)
  sb = (jnp.asarray(rng.standard_normal(7), jnp.float32),
        jnp.asarray(rng.standard_normal(7), jnp.float32)) if affine else (None, None)

  def autodiff(z, s, b):
    mean = jnp.mean(z, (0, 1, 2))
    var = jnp.maximum(0.0, jnp.mean(jnp.square(z), (0, 1, 2)) - jnp.square(mean))
    return norm.bn_normalize(z, mean, var, s, b)

  def grads(f):
    loss = lambda z, s, b: jnp.sum(jnp.sin(f(z, s, b) * w))
    sq = lambda z, s, b: sum(jnp.sum(g ** 2) for g in
                             jax.tree.leaves(jax.grad(loss, (0, 1, 2))(z, s, b)))
    return jax.jit(lambda z, s, b: (jax.grad(loss, (0, 1, 2))(z, s, b),
                                    jax.grad(sq, (0, 1, 2))(z, s, b)))(z, *sb)

  for a, r in zip(jax.tree.leaves(grads(lambda *a: norm.batch_norm(*a)[0])),
                  jax.tree.leaves(grads(autodiff))):
    np.testing.assert_allclose(a, r, rtol=2e-4, atol=2e-5 * float(np.abs(r).max()))

  ours = ops.BatchNorm(0.9, affine)
  ref = nn.BatchNorm(momentum=0.9, epsilon=norm.BN_EPSILON, use_scale=affine, use_bias=affine)
  v = ours.init(jax.random.PRNGKey(0), z, True)
  y, new = ours.apply(v, z, True, mutable=["batch_stats"])
  ref_vars = {"batch_stats": v["batch_stats"]["bn"]}
  if affine:
    ref_vars["params"] = v["params"]["bn"]
  y_ref, new_ref = ref.apply(ref_vars, z, use_running_average=False, mutable=["batch_stats"])
  np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(new["batch_stats"]["bn"], new_ref["batch_stats"], rtol=1e-6)


def test_elastic_batch_norm_is_flax_batch_norm_in_value_gradient_and_statistics():
  """``nn.elastic.BatchNorm`` trains through the same closed-form VJP (any epsilon): its
  output, its parameters' and input's gradients and its running statistics are flax's
  ``nn.BatchNorm``'s; in evaluation it normalises with the running statistics."""
  from jaxnas import nn as jnn
  rng = np.random.default_rng(1)
  z = jnp.asarray(rng.standard_normal((3, 4, 4, 6)) * 3 - 1, jnp.float32)
  w = jnp.asarray(rng.standard_normal(z.shape), jnp.float32)
  ours, ref = jnn.BatchNorm(0.8, epsilon=1e-3), nn.BatchNorm(momentum=0.8, epsilon=1e-3)
  v = ours.init(jax.random.PRNGKey(0), z, True)
  v = {"params": {"scale": jnp.asarray(rng.standard_normal(6), jnp.float32),
                  "bias": jnp.asarray(rng.standard_normal(6), jnp.float32)},
       "batch_stats": v["batch_stats"]}

  def loss(module, params, z, **kw):
    y, new = module.apply({"params": params, "batch_stats": v["batch_stats"]}, z, **kw,
                          mutable=["batch_stats"])
    return jnp.sum(jnp.sin(y * w)), (y, new["batch_stats"])

  (l, (y, stats)), g = jax.value_and_grad(
      lambda p, z: loss(ours, p, z, train=True), (0, 1), has_aux=True)(v["params"], z)
  (l_ref, (y_ref, stats_ref)), g_ref = jax.value_and_grad(
      lambda p, z: loss(ref, p, z, use_running_average=False), (0, 1),
      has_aux=True)(v["params"], z)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(stats, stats_ref, rtol=1e-6)
  chex.assert_trees_all_close(g, g_ref, rtol=1e-4, atol=1e-5)
  trained = {"params": v["params"], "batch_stats": stats}
  ref_vars = {"params": v["params"], "batch_stats": stats_ref}
  np.testing.assert_allclose(ours.apply(trained, z, False),
                             ref.apply(ref_vars, z, use_running_average=True),
                             rtol=1e-5, atol=1e-5)
